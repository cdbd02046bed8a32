"""router: fit the maths/reading router on train questions, measure it on held-out questions."""

import json
from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.io import write_json
from ragtune.router import RouterConfig, build_router, evaluate_router
from ragtune.tracking import stage_run

PREPARED = Path("data/prepared")
OUT = Path("models/router")
METRICS = Path("reports/router/metrics.json")
def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    cfg, seed = params.group("router", RouterConfig), params.common().seed
    with stage_run("router", {"router": cfg.model_dump(), "seed": seed}) as mlflow:
        router, info = build_router(cfg, PREPARED, seed)
        metrics = evaluate_router(router, PREPARED)
        if metrics["empty_sets"]:
            print(f"router: no held-out questions in {', '.join(metrics['empty_sets'])}: scored on the other sets", flush=True)
        router.save(OUT, {"seed": seed, **info})
        write_json(METRICS, metrics)
        numbers = {"router.accuracy": metrics["accuracy"], "router.cross_language_accuracy": metrics["cross_language_accuracy"]}
        numbers |= {f"router.{name}.accuracy": s["accuracy"] for name, s in metrics["sets"].items()}
        mlflow.log_metrics({k: v for k, v in numbers.items() if v is not None})
        print(json.dumps({k: v for k, v in metrics.items() if k != "errors"}, ensure_ascii=False))


if __name__ == "__main__":
    run_stage("router", main)
