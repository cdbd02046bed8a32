"""eval: base against tuned (base + LoRA adapter) on held-out CMRC (gold chunk / BM25 top-k as
context) and GSM8K; retrieval and router metrics beside them; table, chart, MLflow run."""

import gc
import json
import time
from pathlib import Path

from ragtune.config import read_params, run_stage, stage_parser
from ragtune.data import seeded_sample
from ragtune.devices import placement
from ragtune.evaluate import (
    EvalConfig,
    bm25_retrieval_scores,
    load_rows,
    run_cmrc,
    run_math,
    with_retrieved_contexts,
)
from ragtune.inference import load_generator
from ragtune.io import DataError, atomic_dir, read_json
from ragtune.report import bar_chart, markdown_table
from ragtune.retrieval import BM25Index, RetrievalConfig, read_kb
from ragtune.tracking import flatten, stage_run

PREPARED = Path("data/prepared")
BASE_DIR = Path("models/base/generator")
ADAPTER_DIR = Path("models/sft/adapter")
EMBEDDER_DIR = Path("models/base/embedder")
OUT = Path("reports/eval")
# Metrics other stages already measured; copied in when their stage has run.
UPSTREAM = {"embed_ft": Path("reports/embed_ft/metrics.json"), "router": Path("reports/router/metrics.json")}


def generator_configs(cfg: EvalConfig, names: list[str], device: str, dtype: str) -> dict[str, dict]:
    """name -> load_generator config: base, tuned (base + adapter), and any configured endpoints."""
    local = {"backend": "transformers", "base_dir": str(BASE_DIR), "batch_size": cfg.batch_size,
             "dtype": dtype, "device": device, "system": cfg.system}
    known = {"base": local, "tuned": local | {"adapter_dir": str(ADAPTER_DIR)}}
    known |= {name: {"backend": "openai", "system": cfg.system} | spec.model_dump() for name, spec in cfg.endpoints.items()}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"unknown generators {missing}: expected base, tuned or one of eval.endpoints")
    if "tuned" in names and not (ADAPTER_DIR / "adapter_config.json").exists():
        raise DataError(f"{ADAPTER_DIR}: no adapter (run `dvc repro sft` first, or pass --generators base)")
    return {n: known[n] for n in names}


def upstream_metrics() -> dict:
    """Numeric metrics of embed_ft and router when present (the router's error list is left out)."""
    out = {}
    for name, path in UPSTREAM.items():
        if path.exists():
            data = read_json(path)
            out[name] = {k: v for k, v in flatten(data).items() if isinstance(v, int | float) and "errors" not in k}
    return out


def main(argv=None) -> None:
    ap = stage_parser(__doc__)
    ap.add_argument("--generators", help="comma-separated: base, tuned, or names under eval.endpoints "
                    "(default: eval.generators and every eval.endpoints name)")
    args = ap.parse_args(argv)
    params = read_params(args.params)
    cfg, common = params.group("eval", EvalConfig), params.common()
    retrieval = params.group("retrieval", RetrievalConfig)
    seed, top_k = common.seed, retrieval.top_k
    device, dtype = placement(common.device, common.dtype)
    args.generators = args.generators or ",".join(cfg.generators + list(cfg.endpoints))
    generators = generator_configs(cfg, [n for n in args.generators.split(",") if n], device, dtype)

    started = time.perf_counter()
    cmrc_all = load_rows(PREPARED / "cmrc_eval.jsonl", ("id", "question", "answers", "gold_chunk_id", "context"))
    gsm8k = seeded_sample(load_rows(PREPARED / "gsm8k_eval.jsonl", ("id", "question", "answer")),
                          cfg.gsm8k_samples, seed)
    chunk_ids, texts = read_kb(PREPARED / "kb.jsonl")
    index = BM25Index(chunk_ids, texts, retrieval.stopwords)
    kb = dict(zip(chunk_ids, texts, strict=True))
    cmrc = seeded_sample(cmrc_all, cfg.cmrc_samples, seed)
    contexts = {"cmrc_gold": cmrc, "cmrc_retrieved": with_retrieved_contexts(cmrc, kb, index, top_k)}

    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(str(EMBEDDER_DIR), device=device)
    results, timings, predictions = {}, {}, {}
    for name, gen_cfg in generators.items():
        generator = load_generator(gen_cfg)
        results[name] = {}
        for task, rows in contexts.items():
            predictions[f"{name}_{task}"], results[name][task] = run_cmrc(
                generator, rows, cfg.cmrc_max_new_tokens, embedder)
        predictions[f"{name}_gsm8k"], results[name]["gsm8k"] = run_math(generator, gsm8k, cfg.gsm8k_max_new_tokens)
        for task, summary in results[name].items():
            timings[f"{name}.{task}"] = summary.pop("seconds")
            print(f"{name} {task}: " + json.dumps(summary), flush=True)
        del generator
        gc.collect()

    metrics = dict(results)
    retrieval = {f"bm25_top{top_k}_context_has_gold": sum(
        r["gold_chunk_id"] in r["retrieved_ids"] for r in contexts["cmrc_retrieved"]) / max(1, len(cmrc))}
    retrieval["bm25"] = bm25_retrieval_scores(cmrc_all, index, cfg.retrieval_cutoff)
    metrics["retrieval"] = retrieval
    metrics |= upstream_metrics()
    wall = time.perf_counter() - started

    references = cfg.references
    sizes = f"CMRC {len(cmrc)} of {len(cmrc_all)} held-out trial questions, GSM8K {len(gsm8k)} test questions"
    report = "\n".join([
        "# ragtune eval: base against tuned",
        "",
        f"{sizes}; greedy decoding, {cfg.cmrc_max_new_tokens} / {cfg.gsm8k_max_new_tokens} new tokens "
        f"(CMRC / GSM8K); top-k context: BM25 top {top_k} chunks of data/prepared/kb.jsonl. Percent.",
        "",
        markdown_table(results, references),
        f"Retrieval (BM25, all {len(cmrc_all)} questions): "
        + ", ".join(f"{k} {v:.3f}" for k, v in retrieval["bm25"].items() if k != "queries"),
        "",
        *([f"Router (reports/router/metrics.json): accuracy {metrics['router'].get('accuracy')}", ""]
          if "router" in metrics else []),
        f"Wall time {wall:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
    ])
    with atomic_dir(OUT) as tmp:
        (tmp / "predictions").mkdir()
        for name, rows in predictions.items():
            with open(tmp / "predictions" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (tmp / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
        (tmp / "report.md").write_text(report, encoding="utf-8")
        bar_chart(results, tmp / "comparison.png", title=sizes)

    logged = {"seed": seed, "eval": cfg.model_dump(), "retrieval.top_k": top_k, "generators": ",".join(generators),
              "device": device, "dtype": dtype}
    with stage_run("eval", logged) as mlflow:
        numbers = {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, int | float)}
        mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in numbers.items()})
        mlflow.log_metrics({f"seconds.{k}": v for k, v in timings.items()} | {"seconds.wall": wall})
        mlflow.log_artifacts(str(OUT))  # predictions/, report.md, comparison.png, metrics.json
    print(report)


if __name__ == "__main__":
    run_stage("eval", main)
