"""distill: chain-of-thought for GSM8K train from the configured teacher, every response cached."""

import json
from pathlib import Path

from ragtune.config import load_params
from ragtune.data import seeded_sample
from ragtune.io import write_json
from ragtune.teacher import (
    Distiller,
    ResponseCache,
    TeacherConfigError,
    alpaca_rows,
    load_items,
    make_teacher,
    retry_policy,
)
from ragtune.tracking import stage_run

SOURCE = Path("data/prepared/gsm8k_train.jsonl")
OUT = Path("data/distill")


def main() -> None:
    try:
        run(load_params())
    except TeacherConfigError as err:  # a config problem, not a bug: one clear line, no traceback
        raise SystemExit(f"distill: {err}") from None


def run(params: dict) -> None:
    cfg, teacher_cfg, seed = params["distill"], params["teacher"], params["seed"]
    items = seeded_sample(load_items(SOURCE), cfg.get("max_items"), seed)
    teacher = make_teacher(teacher_cfg)  # fails here, before any output, when the API key is unset
    with stage_run("distill", {"seed": seed, "distill": cfg, "teacher": teacher_cfg}) as mlflow:
        # The cache is a persistent out, opened (and created) even for the offline teacher.
        with ResponseCache(OUT / "cache.jsonl") as cache:
            distiller = Distiller(
                teacher,
                cache,
                max_rounds=cfg["max_rounds"],
                concurrency=cfg["concurrency"],
                retry=retry_policy(cfg),
                progress=cfg.get("progress", True),
                seed=seed,
            )
            result = distiller.run(items)
        write_json(OUT / "distilled_train.json", alpaca_rows(result), indent=1)
        write_json(OUT / "left_data.json", result.left, indent=1)
        write_json(OUT / "stats.json", result.stats)
        stats = result.stats
        scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars |= {f"errors.{k}": v for k, v in stats["errors"].items()}
        scalars |= {f"rejected.{k}": v for k, v in stats["rejected"].items()}
        mlflow.log_metrics(scalars)
        for round_no, count in enumerate(stats["accepted_per_round"], start=1):
            mlflow.log_metric("accepted_in_round", count, step=round_no)
        print(json.dumps(stats, ensure_ascii=False))


if __name__ == "__main__":
    main()
