"""package_base: the base bundle (KB + the served retriever, router, prompts, a reference to the base
generator, manifest): what eval_base scores, and what package adds the adapter to."""

import json
from pathlib import Path

from ragtune.bundle import PackageConfig, build_bundle
from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import resolve_device
from ragtune.models import EmbedderConfig
from ragtune.records import KB, read_kb
from ragtune.retrieval import RetrievalConfig, build_retriever
from ragtune.tracking import stage_run

OUT = Path("bundle_base")
BASE = Path("models/base/generator")
EMBED_FT = Path("models/embed_ft")  # the tuned embedder: used when the served retriever is dense or hybrid
ROUTER = Path("models/router")
ROUTER_METRICS = Path("reports/router/metrics.json")


def main() -> None:
    params = read_params(stage_parser(__doc__).parse_args().params)
    cfg, retrieval = params.group("package", PackageConfig), params.group("retrieval", RetrievalConfig)
    query_prompt = params.group("embedder", EmbedderConfig).query_prompt
    device = resolve_device(params.common().device)
    logged = {"package": cfg.model_dump(), "retrieval": retrieval.model_dump(), "embedder.query_prompt": query_prompt}
    with stage_run("package_base", logged) as mlflow:
        chunks = read_kb(KB)
        retriever = build_retriever(retrieval, chunks,
                                    embedder=None if retrieval.kind == "bm25" else str(EMBED_FT),
                                    query_prompt=query_prompt, device=device)
        manifest = build_bundle(OUT, kb_path=KB, base_dir=BASE, router_dir=ROUTER, retriever=retriever,
                                answer=cfg.answer_settings(retrieval.top_k), router_metrics_path=ROUTER_METRICS,
                                copy_base=cfg.copy_base)
        mlflow.log_dict(manifest, "bundle_manifest.json")
        mlflow.set_tag("bundle.digest", manifest["digest"])
        print(json.dumps({"digest": manifest["digest"], "retriever": manifest["retriever"],
                          "kb_chunks": manifest["kb"]["chunks"]}))


if __name__ == "__main__":
    run_stage("package_base", main)
