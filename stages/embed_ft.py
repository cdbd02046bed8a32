"""embed_ft: contrastive fine-tune of the embedder; retrieval metrics of BM25, base and tuned embedders."""

import json
import os
import random
import shutil
import tempfile
import sys
import time
from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.devices import (
    exit_with_launcher,
    pin_training_gpu,
    relaunch_under_accelerate,
    resolve_device,
    under_accelerate,
)
from ragtune.data import seeded_sample
from ragtune.embedding import EmbedFtConfig, evaluate, extend_cjk_vocabulary, fine_tune, unknown_fraction
from ragtune.io import atomic_dir, write_json
from ragtune.models import EmbedderConfig
from ragtune.records import CMRC_EVAL, EMBED_TRAIN, KB, ReadingQuestion, Triple, read_kb, read_records
from ragtune.retrieval import BM25Index, DenseIndex, HybridIndex, RetrievalConfig, indexed_texts, load_embedder
from ragtune.tracking import stage_run

BASE = Path("models/base/embedder")
OUT = Path("models/embed_ft")
METRICS = Path("reports/embed_ft/metrics.json")


def select_kb(ids, texts, eval_rows, max_chunks, seed):
    """The whole KB, or (max_chunks set) the eval questions' gold chunks plus a seeded sample of others."""
    if not max_chunks or max_chunks >= len(ids):
        return ids, texts
    gold = {g for r in eval_rows for g in r.gold_chunk_ids}
    others = [i for i, c in enumerate(ids) if c not in gold]
    keep = {i for i, c in enumerate(ids) if c in gold}
    keep |= set(random.Random(seed).sample(others, max(0, min(len(others), max_chunks - len(keep)))))
    order = sorted(keep)
    return [ids[i] for i in order], [texts[i] for i in order]


def mlflow_name(name: str) -> str:
    return name.replace("@", "_at_")


def read_inputs(cfg: EmbedFtConfig, seed: int, index_title: int):
    """The training triples, the scored questions and the (selected) KB, indexed as the served retriever indexes it."""
    rows = seeded_sample(read_records(EMBED_TRAIN, Triple), cfg.max_samples, seed)
    eval_rows = seeded_sample(read_records(CMRC_EVAL, ReadingQuestion), cfg.eval.max_queries, seed)
    chunks = read_kb(KB)
    kb_ids, kb_texts = [c.chunk_id for c in chunks], indexed_texts(chunks, index_title)
    kb_ids, kb_texts = select_kb(kb_ids, kb_texts, eval_rows, cfg.eval.max_chunks, seed)
    return rows, eval_rows, kb_ids, kb_texts


def train_model(cfg: EmbedFtConfig, rows, kb_texts, seed: int, device: str):
    """The base embedder, its vocabulary extended (when asked), fine-tuned: (model, added tokens, summary)."""
    model = load_embedder(BASE, device)
    added = 0
    if cfg.extend_vocab:
        corpus = [r.query for r in rows] + [t for r in rows for t in r.pos + r.neg] + kb_texts
        added = extend_cjk_vocabulary(model, corpus, cfg.vocab_min_count)
    with tempfile.TemporaryDirectory(prefix="embed_ft.") as work:
        summary = fine_tune(model, rows, cfg, work_dir=work, seed=seed, device=device)
    return model, added, summary


def main() -> None:
    args = stage_parser(__doc__).parse_args()
    params = read_params(args.params)
    cfg, common = params.group("embed_ft", EmbedFtConfig), params.common()
    if cfg.launcher == "accelerate" and not under_accelerate():
        sys.exit(relaunch_under_accelerate("embed_ft", cfg.accelerate_config, __file__, sys.argv[1:]))
    if under_accelerate():
        exit_with_launcher("embed_ft")
    # one GPU for a single process (before anything asks CUDA)
    seed, device = common.seed, resolve_device(pin_training_gpu(common.device))
    query_prompt = params.group("embedder", EmbedderConfig).query_prompt
    retrieval = params.group("retrieval", RetrievalConfig)
    eval_cfg = cfg.eval
    if int(os.environ.get("RANK", "0")) != 0:  # other accelerate processes train alongside; rank 0 scores and writes
        rows, _, _, kb_texts = read_inputs(cfg, seed, retrieval.index_title)
        if rows:
            train_model(cfg, rows, kb_texts, seed, device)
        return
    logged = {"seed": seed, "device": device, "embed_ft": cfg.model_dump(), "embedder": {"query_prompt": query_prompt},
              "retrieval": retrieval.model_dump()}
    with stage_run("embed_ft", logged) as mlflow:
        start = time.time()
        rows, eval_rows, kb_ids, kb_texts = read_inputs(cfg, seed, retrieval.index_title)
        score = {"cutoff": eval_cfg.cutoff, "ks": tuple(eval_cfg.ks)}
        if not rows:  # your own data without reading questions: nothing to train on
            skip_training(f"no training triples in {EMBED_TRAIN} (no reading questions to train on)", mlflow,
                          BM25Index(kb_ids, kb_texts, retrieval.stopwords), eval_rows, score, len(kb_ids), start)
            return
        if not eval_rows:
            print(f"embed_ft: no held-out reading questions in {CMRC_EVAL}: the retrieval metrics score nothing", flush=True)

        # Training first: under a launcher the other ranks wait for rank 0 to join them.
        model, added, summary = train_model(cfg, rows, kb_texts, seed, device)
        unk_tuned = unknown_fraction(model, kb_texts[:500])

        bm25 = BM25Index(kb_ids, kb_texts, retrieval.stopwords)
        results = {"bm25": evaluate(bm25, eval_rows, **score)}

        base_model = load_embedder(BASE, device)
        base_model.max_seq_length = cfg.max_seq_length
        unk_base = unknown_fraction(base_model, kb_texts[:500])
        base_index = DenseIndex(kb_ids, kb_texts, base_model, query_prompt)
        results["base"] = evaluate(base_index, eval_rows, **score)
        del base_index, base_model
        for entry in summary.pop("log_history"):
            if "loss" in entry:
                mlflow.log_metric("train_loss", float(entry["loss"]), step=int(entry["step"]))
        tuned_index = DenseIndex(kb_ids, kb_texts, model, query_prompt)
        results["tuned"] = evaluate(tuned_index, eval_rows, **score)
        hybrid = HybridIndex([bm25, tuned_index], [retrieval.bm25_weight, retrieval.dense_weight],
                             retrieval.rrf_k, retrieval.candidates)
        results["hybrid_bm25_tuned"] = evaluate(hybrid, eval_rows, **score)

        with atomic_dir(OUT) as tmp:
            model.save(str(tmp))
        report = {
            **results,
            "lift_hit@1": round(results["tuned"]["hit@1"] - results["base"]["hit@1"], 4),
            "train": summary,
            "vocab": {"added_cjk_tokens": added, "unk_fraction_base": round(unk_base, 4),
                      "unk_fraction_tuned": round(unk_tuned, 4)},
            "kb_chunks": len(kb_ids),
            "eval_queries": len(eval_rows),
            "seconds": round(time.time() - start, 1),
        }
        write_json(METRICS, report)
        flat = {f"{name}.{mlflow_name(k)}": v for name, m in results.items() for k, v in m.items()}
        flat |= {"lift_hit_at_1": report["lift_hit@1"], "train_seconds": summary["seconds"],
                 "added_cjk_tokens": added, "unk_fraction_tuned": unk_tuned, "seconds": report["seconds"]}
        mlflow.log_metrics(flat)
        if cfg.log_model:
            # log_artifacts has no `name=` (that is log_model's); the folder lands under embed_ft_model/.
            mlflow.log_artifacts(str(OUT), artifact_path="embed_ft_model")
        print(json.dumps({k: v for k, v in report.items() if k != "train"} | {"train": summary}, ensure_ascii=False))


def skip_training(reason: str, mlflow, bm25, eval_rows, score, kb_chunks: int, start: float) -> None:
    """No training: the base embedder is copied as the 'tuned' one (the served retriever may use it) and the
    metrics say why."""
    print(f"embed_ft: {reason}: skipping training; {OUT} is a copy of {BASE}", flush=True)
    with atomic_dir(OUT) as tmp:
        shutil.copytree(BASE, tmp, dirs_exist_ok=True)
    report = {"skipped": reason, "bm25": evaluate(bm25, eval_rows, **score), "kb_chunks": kb_chunks,
              "eval_queries": len(eval_rows), "seconds": round(time.time() - start, 1)}
    write_json(METRICS, report)
    mlflow.set_tag("embed_ft.skipped", reason)
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    run_stage("embed_ft", main)
