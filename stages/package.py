"""package: the RAG bundle (KB + BM25 index, router, adapter, base reference, prompts, manifest),
also logged to MLflow as a pyfunc model."""

import json
from pathlib import Path

from ragtune.bundle import build_bundle, log_pyfunc_model
from ragtune.config import load_params
from ragtune.tracking import stage_run

OUT = Path("bundle")


def main() -> None:
    params = load_params()
    cfg = params["package"]
    with stage_run("package", {"package": cfg, "retrieval.stopwords": params["retrieval"]["stopwords"]}) as mlflow:
        manifest = build_bundle(
            OUT,
            kb_path=Path("data/prepared/kb.jsonl"),
            base_dir=Path("models/base/generator"),
            router_dir=Path("models/router"),
            adapter_dir=Path("models/sft/adapter"),
            metrics_path=Path("reports/eval/metrics.json"),
            router_metrics_path=Path("reports/router/metrics.json"),
            answer={k: cfg[k] for k in ("top_k", "max_new_tokens_maths", "max_new_tokens_reading", "unknown_route")},
            copy_base=bool(cfg.get("copy_base", False)),
            stopwords=params["retrieval"]["stopwords"] or (),
        )
        mlflow.log_dict(manifest, "bundle_manifest.json")
        mlflow.set_tag("bundle.digest", manifest["digest"])
        if cfg.get("log_model", True):
            log_pyfunc_model(mlflow, OUT, Path("models/base/generator"))
        print(json.dumps({"digest": manifest["digest"], "kb_chunks": manifest["kb"]["chunks"],
                          "metrics_source": manifest["metrics_source"]}))


if __name__ == "__main__":
    main()
