"""Served-answer variants of one adapter, measured in one run: the bundle's answer settings (top_k, titles
indexed, repetition guard, forced box) changed one at a time, each scored like eval (official EM/F1, 95 %
bootstrap intervals) on the same seeded questions.

    python bench/served.py --adapter models/sft/adapter --top-k 1 2 3 --cmrc 200 --gsm8k 0
    python bench/served.py --adapter models/sft/adapter --top-k 1 --index-title 0 2 --abstain 50
    python bench/served.py --adapter none --gsm8k 100 --cmrc 0 --repeat-window 0 48 --force-box 0 1
    python bench/served.py --top-k 1 --cmrc 100 --abstain 50 --gate-share 0 0.03 0.05   # 0: no gate

Needs `dvc repro router` (data/prepared, models/router, models/base/generator). Prints one row per
variant; the README's experiment tables come from runs of this script and of `dvc exp run`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

from ragtune.abstention import RetrievalConfidence, calibrate
from ragtune.bundle import (
    AnswerSettings,
    Bundle,
    PackageConfig,
    add_adapter,
    build_bundle,
)
from ragtune.config import read_params
from ragtune.devices import placement
from ragtune.evaluate import EvalConfig, evaluate_bundle, question_sets
from ragtune.records import (
    CMRC_EVAL,
    CMRC_TRAIN,
    GSM8K_EVAL,
    KB,
    MathsQuestion,
    ReadingQuestion,
    read_kb,
    read_records,
)
from ragtune.retrieval import RetrievalConfig, build_retriever
from ragtune.stats import format_ci

BASE = Path("models/base/generator")
ROUTER = Path("models/router")


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="models/sft/adapter", help="a peft adapter, or 'none' for the base model")
    parser.add_argument("--cmrc", type=int, default=200, help="served CMRC questions")
    parser.add_argument("--gsm8k", type=int, default=0, help="served GSM8K questions")
    parser.add_argument("--abstain", type=int, default=0, help="unanswerable questions (article left out)")
    parser.add_argument("--gold", action="store_true", help="also the gold-context diagnostic")
    parser.add_argument("--top-k", type=int, nargs="+", default=[3])
    parser.add_argument("--index-title", type=int, nargs="+", default=[2])
    parser.add_argument("--repeat-window", type=int, nargs="+", default=[48])
    parser.add_argument("--force-box", type=int, nargs="+", default=[1])
    parser.add_argument("--gate-share", type=float, nargs="+", default=None,
                        help="retrieval-confidence gate calibrated to abstain on this share of training questions "
                             "(0: no gate; default: package.abstain_answerable_share)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--json", help="append one JSON line per variant to this file")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    params = read_params(args.params)
    common, package = params.common(), params.group("package", PackageConfig)
    device, dtype = placement(common.device, common.dtype)
    retrieval = params.group("retrieval", RetrievalConfig)
    cfg = EvalConfig(cmrc_samples=args.cmrc or None, gsm8k_samples=args.gsm8k or None, abstain_samples=args.abstain,
                     gold_context=args.gold, similarity=False, batch_size=args.batch_size)
    cmrc = read_records(CMRC_EVAL, ReadingQuestion) if args.cmrc else []
    gsm8k = read_records(GSM8K_EVAL, MathsQuestion) if args.gsm8k else []
    sets = question_sets(cmrc, gsm8k, cfg, common.seed)
    chunks = read_kb(KB)
    print(f"{len(sets.cmrc)} CMRC + {len(sets.gsm8k)} GSM8K served, {len(sets.unanswerable)} unanswerable; "
          f"{device}, {dtype}; adapter {args.adapter}", flush=True)
    shares = args.gate_share if args.gate_share is not None else [package.abstain_answerable_share or 0]
    train = read_records(CMRC_TRAIN, ReadingQuestion)
    generator = None
    for title, top_k, window, force, share in itertools.product(args.index_title, args.top_k, args.repeat_window,
                                                                 args.force_box, shares):
        retriever = build_retriever(retrieval.model_copy(update={"index_title": title}), chunks)
        gate = calibrate(RetrievalConfidence(retriever, {c.chunk_id: c.article_id for c in chunks}), train, share,
                         top_k).as_dict() if share else {}
        answer = AnswerSettings(top_k=top_k, max_new_tokens_maths=package.max_new_tokens_maths,
                                max_new_tokens_reading=package.max_new_tokens_reading,
                                unknown_route=package.unknown_route, repeat_window=window, force_box=bool(force),
                                min_confidence=gate.get("min_confidence"))
        with tempfile.TemporaryDirectory(prefix="served.", dir=".") as tmp:
            folder = Path(tmp) / "bundle_base"
            build_bundle(folder, kb_path=KB, base_dir=BASE, router_dir=ROUTER, retriever=retriever, answer=answer)
            if args.adapter != "none":
                add_adapter(folder, Path(tmp) / "bundle", args.adapter)
                folder = Path(tmp) / "bundle"
            bundle = Bundle.load(folder, generator=generator, device=device, dtype=dtype, batch_size=args.batch_size)
            generator = bundle.generator  # one model for every variant: only the answer settings change
            generator.repeat_window = window
            started = time.perf_counter()
            metrics, _ = evaluate_bundle(bundle, sets, cfg, common.seed, log=lambda *_: None)
        row = {"index_title": title, "top_k": top_k, "repeat_window": window, "force_box": bool(force), "gate": gate,
               "seconds": round(time.perf_counter() - started), **summary(metrics)}
        print(json.dumps(row, ensure_ascii=False), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row | {"adapter": args.adapter, "metrics": metrics}, ensure_ascii=False) + "\n")


def summary(metrics: dict) -> dict:
    out = {}
    for path in ("served.cmrc.official_em", "served.cmrc.official_f1", "served.cmrc.abstained", "served.cmrc.gold_retrieved",
                 "served.gsm8k.accuracy", "served.gsm8k.boxed", "unanswerable.abstained", "gold_context.official_em",
                 "gold_context.official_f1"):
        node = metrics
        for key in path.split("."):
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if node:
            out[path] = format_ci(node["mean"], node["low"], node["high"])
    return out


if __name__ == "__main__":
    main()
