"""Batched against one-by-one greedy generation on held-out CMRC prompts: same outputs, throughput ratio.

    python bench/generate.py [--n 8] [--batch-size 8] [--max-new-tokens 32] [--adapter models/sft/adapter]
"""

import argparse
import time

from ragtune.data import seeded_sample
from ragtune.records import CMRC_EVAL, ReadingQuestion, read_records
from ragtune.inference import TransformersGenerator
from ragtune.prompts import cmrc_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--base", default="models/base/generator")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()

    rows = seeded_sample(read_records(CMRC_EVAL, ReadingQuestion), args.n, args.seed)
    prompts = [cmrc_prompt(r.context, r.question) for r in rows]
    gen = TransformersGenerator(args.base, adapter_dir=args.adapter, batch_size=args.batch_size)
    tokens = lambda outs: sum(len(gen.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)  # noqa: E731

    start = time.perf_counter()
    single = [gen.generate([p], args.max_new_tokens)[0] for p in prompts]
    t_single = time.perf_counter() - start
    start = time.perf_counter()
    batched = gen.generate(prompts, args.max_new_tokens)
    t_batched = time.perf_counter() - start

    same = sum(a == b for a, b in zip(single, batched, strict=True))
    print(f"{len(prompts)} prompts, {args.max_new_tokens} new tokens max, batch {args.batch_size}")
    print(f"one by one: {t_single:.1f} s, {tokens(single) / t_single:.1f} new tokens/s")
    print(f"batched:    {t_batched:.1f} s, {tokens(batched) / t_batched:.1f} new tokens/s")
    print(f"same outputs: {same}/{len(prompts)}")
    print(f"throughput ratio (batched / one by one): {t_single / t_batched:.2f}x")
    if same != len(prompts):
        raise SystemExit("batched outputs differ from one-by-one outputs")


if __name__ == "__main__":
    main()
