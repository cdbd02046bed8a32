"""package: the RAG bundle (KB + BM25 index, router, adapter, base reference, prompts, manifest),
also logged to MLflow as a pyfunc model."""

import json
from pathlib import Path

from ragtune.bundle import PackageConfig, build_bundle, log_pyfunc_model
from ragtune.config import read_params, run_stage, stage_parser
from ragtune.retrieval import RetrievalConfig
from ragtune.tracking import stage_run

OUT = Path("bundle")
BASE = Path("models/base/generator")


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    cfg, retrieval = params.group("package", PackageConfig), params.group("retrieval", RetrievalConfig)
    logged = {"package": cfg.model_dump(), "retrieval": {"top_k": retrieval.top_k, "stopwords": retrieval.stopwords}}
    with stage_run("package", logged) as mlflow:
        manifest = build_bundle(
            OUT,
            kb_path=Path("data/prepared/kb.jsonl"),
            base_dir=BASE,
            router_dir=Path("models/router"),
            adapter_dir=Path("models/sft/adapter"),
            metrics_path=Path("reports/eval/metrics.json"),
            router_metrics_path=Path("reports/router/metrics.json"),
            answer=cfg.answer_settings(retrieval.top_k),
            copy_base=cfg.copy_base,
            stopwords=retrieval.stopwords,
        )
        mlflow.log_dict(manifest, "bundle_manifest.json")
        mlflow.set_tag("bundle.digest", manifest["digest"])
        if cfg.log_model:
            log_pyfunc_model(mlflow, OUT, BASE)
        print(json.dumps({"digest": manifest["digest"], "kb_chunks": manifest["kb"]["chunks"],
                          "metrics_source": manifest["metrics_source"]}))


if __name__ == "__main__":
    run_stage("package", main)
