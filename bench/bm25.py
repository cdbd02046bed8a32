"""ragtune's BM25-zh (bm25s) against rank-bm25's BM25Okapi on the same jieba tokens, the real KB
(data/prepared/kb.jsonl) and the held-out questions (data/prepared/cmrc_eval.jsonl).

    python bench/bm25.py [--queries N]

Prints queries/s of each (tokenisation included for both, measured in this one run), their ratio,
and hit@1/3/5, MRR@10, nDCG@10 of both. Run `dvc repro split` first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ragtune.data import seeded_sample
from ragtune.metrics import retrieval_metrics
from ragtune.records import ReadingQuestion, read_kb, read_records
from ragtune.retrieval import BM25Index, tokenize_zh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kb", default="data/prepared/kb.jsonl")
    parser.add_argument("--eval", default="data/prepared/cmrc_eval.jsonl")
    parser.add_argument("--queries", type=int, default=None, help="seeded subset of the questions")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    from rank_bm25 import BM25Okapi

    chunks = read_kb(args.kb)
    ids, texts = [c.chunk_id for c in chunks], [c.text for c in chunks]
    rows = seeded_sample(read_records(args.eval, ReadingQuestion), args.queries, seed=0)
    queries, gold = [r.question for r in rows], [r.gold_chunk_ids for r in rows]
    tokenize_zh("预热")  # jieba loads its dictionary once; keep that out of both timings

    start = time.perf_counter()
    ours = BM25Index(ids, texts)
    ours_index_s = time.perf_counter() - start
    start = time.perf_counter()
    ours_ranked = [[c for c, _ in hits] for hits in ours.retrieve_many(queries, args.k)]
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    theirs = BM25Okapi([tokenize_zh(t) for t in texts])
    theirs_index_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs_ranked = []
    for query in queries:
        scores = theirs.get_scores(tokenize_zh(query))
        top = np.argsort(-scores, kind="stable")[: args.k]
        theirs_ranked.append([ids[i] for i in top if scores[i] > 0])
    theirs_s = time.perf_counter() - start

    n = len(queries)
    print(f"KB chunks: {len(ids)}  questions: {n}  (jieba tokens for both, tokenisation timed for both)")
    print(f"{'':22}{'index s':>9}{'queries/s':>11}  " + "  ".join(f"{m:>8}" for m in ("hit@1", "hit@3", "hit@5", "mrr@10", "ndcg@10")))
    for name, index_s, query_s, ranked in (
        ("ragtune BM25 (bm25s)", ours_index_s, ours_s, ours_ranked),
        ("rank-bm25 BM25Okapi", theirs_index_s, theirs_s, theirs_ranked),
    ):
        m = retrieval_metrics(ranked, gold)
        print(f"{name:22}{index_s:9.2f}{n / query_s:11.0f}  " + "  ".join(f"{m[k]:8.3f}" for k in ("hit@1", "hit@3", "hit@5", "mrr@10", "ndcg@10")))
    print(f"queries/s ratio (ragtune / rank-bm25): {theirs_s / ours_s:.1f}x")
    same_top1 = sum(a[:1] == b[:1] for a, b in zip(ours_ranked, theirs_ranked)) / n
    print(f"same top-1 chunk: {same_top1:.3f}")


if __name__ == "__main__":
    main()
