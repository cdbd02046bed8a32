"""package_base: the base bundle (KB + the served retriever, router, prompts, a reference to the base
generator, manifest): what eval_base scores, and what package adds the adapter to. The retrieval-
confidence gate's threshold is calibrated here on the training reading questions (ragtune.abstention)."""

import json
from pathlib import Path

from ragtune.abstention import RetrievalConfidence, calibrate
from ragtune.bundle import PackageConfig, build_bundle
from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import resolve_device
from ragtune.models import EmbedderConfig
from ragtune.records import CMRC_TRAIN, KB, ReadingQuestion, read_kb, read_records
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
        gate = abstention_gate(cfg, retrieval, retriever, chunks)
        if gate:
            mlflow.log_metrics({k: v for k, v in gate.items() if k != "train_questions"})
        manifest = build_bundle(OUT, kb_path=KB, base_dir=BASE, router_dir=ROUTER, retriever=retriever,
                                answer=cfg.answer_settings(retrieval.top_k, gate.get("min_confidence")),
                                router_metrics_path=ROUTER_METRICS, copy_base=cfg.copy_base)
        mlflow.log_dict(manifest, "bundle_manifest.json")
        mlflow.set_tag("bundle.digest", manifest["digest"])
        print(json.dumps({"digest": manifest["digest"], "retriever": manifest["retriever"],
                          "kb_chunks": manifest["kb"]["chunks"]}))


def abstention_gate(cfg: PackageConfig, retrieval: RetrievalConfig, retriever, chunks) -> dict:
    """The calibrated threshold and its rates on the training questions ({} when the gate is off, or
    there are no training reading questions to calibrate on)."""
    questions = read_records(CMRC_TRAIN, ReadingQuestion)
    if cfg.abstain_answerable_share is None or not questions:
        print("package_base: no retrieval-confidence gate" + ("" if questions else f" (no reading questions in {CMRC_TRAIN})"))
        return {}
    confidence = RetrievalConfidence(retriever, {c.chunk_id: c.article_id for c in chunks})
    gate = calibrate(confidence, questions, cfg.abstain_answerable_share, retrieval.top_k).as_dict()
    print(f"package_base: retrieval-confidence gate {json.dumps(gate)}", flush=True)
    return gate


if __name__ == "__main__":
    run_stage("package_base", main)
