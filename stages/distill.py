"""distill: chain-of-thought for GSM8K train from the configured teacher, every response cached. Without
maths questions (data=custom without maths) it writes empty outputs and says so: sft trains on reading alone."""

import json
from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.data import seeded_sample
from ragtune.io import write_json
from ragtune.teacher import (
    DistillConfig,
    Distiller,
    RationaleTeacherConfig,
    ResponseCache,
    TeacherConfig,
    alpaca_rows,
    check_enough_accepted,
    load_items,
    make_teacher,
    retry_policy,
)
from ragtune.tracking import stage_run

SOURCE = Path("data/prepared/gsm8k_train.jsonl")
OUT = Path("data/distill")


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    cfg, teacher_cfg, seed = params.group("distill", DistillConfig), params.group("teacher", TeacherConfig), params.common().seed
    items = load_items(SOURCE)
    without_rationale = 0
    if isinstance(teacher_cfg, RationaleTeacherConfig):  # the offline teacher reshapes a rationale: none, nothing to reshape
        without_rationale = sum(1 for item in items if not (item.get("rationale") or "").strip())
        items = [item for item in items if (item.get("rationale") or "").strip()]
        if without_rationale:
            print(f"distill: {without_rationale} maths questions have no worked solution (the simple {{id, question, "
                  f"answer}} format): teacher={teacher_cfg.name} cannot distill them; a model teacher can", flush=True)
    if not items:
        skip(cfg, teacher_cfg, seed, "no maths questions with a worked solution" if without_rationale
             else "no maths questions", without_rationale)
        return
    items = seeded_sample(items, cfg.max_items, seed)
    teacher = make_teacher(teacher_cfg)  # fails here, before any output, when the API key is unset
    logged = {"seed": seed, "distill": cfg.model_dump(), "teacher": teacher_cfg.model_dump()}
    with stage_run("distill", logged) as mlflow:
        # The cache is a persistent out, opened (and created) even for the offline teacher.
        with ResponseCache(OUT / "cache.jsonl") as cache:
            distiller = Distiller(teacher, cache, max_rounds=cfg.max_rounds, concurrency=cfg.concurrency,
                                  retry=retry_policy(cfg), progress=cfg.progress, seed=seed)
            result = distiller.run(items)
        stats = result.stats
        scalars = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars |= {f"errors.{k}": v for k, v in stats["errors"].items()}
        scalars |= {f"rejected.{k}": v for k, v in stats["rejected"].items()}
        mlflow.log_metrics(scalars)
        stats["skipped_without_rationale"] = without_rationale
        check_enough_accepted(stats, cfg.min_accepted_share)  # before any out is written: sft must not train on too little
        write_json(OUT / "distilled_train.json", alpaca_rows(result), indent=1)
        write_json(OUT / "left_data.json", result.left, indent=1)
        write_json(OUT / "stats.json", stats)
        for round_no, count in enumerate(stats["accepted_per_round"], start=1):
            mlflow.log_metric("accepted_in_round", count, step=round_no)
        print(json.dumps(stats, ensure_ascii=False))


def skip(cfg: DistillConfig, teacher_cfg, seed: int, reason: str, without_rationale: int) -> None:
    """Nothing to distill: empty outputs (sft then trains on reading alone), the cache kept as it is."""
    print(f"distill: {reason} in {SOURCE}: skipping (sft trains on reading alone)", flush=True)
    stats = {"items": 0, "accepted": 0, "skipped": reason, "skipped_without_rationale": without_rationale}
    logged = {"seed": seed, "distill": cfg.model_dump(), "teacher": teacher_cfg.model_dump()}
    with stage_run("distill", logged) as mlflow:
        (OUT / "cache.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (OUT / "cache.jsonl").touch()  # a persistent out: it must exist
        write_json(OUT / "distilled_train.json", [], indent=1)
        write_json(OUT / "left_data.json", [], indent=1)
        write_json(OUT / "stats.json", stats)
        mlflow.log_metrics({"items": 0, "accepted": 0})
        mlflow.set_tag("distill.skipped", reason)


if __name__ == "__main__":
    run_stage("distill", main)
