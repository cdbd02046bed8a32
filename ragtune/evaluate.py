"""Evaluation tasks: held-out CMRC (gold chunk or retrieved top-k as context) and GSM8K, per example
and summarised, for any generator from `ragtune.inference`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from ragtune.config import Config
from ragtune.io import iter_jsonl, require
from ragtune.metrics import (
    cmrc_example_scores,
    math_example_scores,
    mean_scores,
    retrieval_metrics,
    semantic_similarity,
)
from ragtune.prompts import cmrc_prompt, math_prompt

class EndpointConfig(Config):
    """An OpenAI-compatible generator evaluated beside base and tuned (vLLM, DeepSeek, `ragtune serve`)."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the endpoint serves")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (null: none needed)")
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")


class EvalConfig(Config):
    """`eval` (conf/eval/default.yaml): what is scored and on how many held-out questions."""

    generators: list[str] = Field(["base", "tuned"], description="base, tuned (base + models/sft/adapter)")
    cmrc_samples: int | None = Field(None, gt=0, description="seeded subset of the CMRC eval questions (null: all)")
    gsm8k_samples: int | None = Field(None, gt=0, description="seeded subset of the GSM8K eval questions (null: all)")
    cmrc_max_new_tokens: int = Field(64, ge=1, description="new tokens per CMRC answer")
    gsm8k_max_new_tokens: int = Field(256, ge=1, description="new tokens per GSM8K answer (room for the chain of thought)")
    batch_size: int = Field(8, ge=1, description="prompts per batched generate call")
    system: str | None = Field(None, description="system prompt (null: the chat template's default)")
    retrieval_cutoff: int = Field(10, ge=1, description="BM25 hit@k / MRR / nDCG cut-off")
    endpoints: dict[str, EndpointConfig] = Field({}, description="name -> an OpenAI-compatible generator scored as an extra row")
    references: dict[str, dict[str, float] | str] = Field(
        {"seed_gpu": "the seed's GPU numbers are not published in this repo"},
        description="reference rows of the report: name -> {task.metric: value} or a note")


CMRC_KEYS = ["official_em", "official_f1", "strict_em", "normalized_em", "containment", "similarity"]
# How `math_answer` reads an answer; all but 'boxed' and 'no_box' are format failures.
MATH_FORMATS = ["boxed", "no_box", "no_number", "conflicting_boxes", "unparsable_box"]
FORMAT_FAILURES = {"no_number", "conflicting_boxes", "unparsable_box"}


def load_rows(path: str | Path, fields: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for lineno, rec in iter_jsonl(path):
        require(rec, fields, f"{path}:{lineno}")
        rows.append(rec)
    return rows


def with_retrieved_contexts(rows: list[dict], kb: dict[str, str], index, top_k: int) -> list[dict]:
    """Copies of the CMRC rows whose `context` is the top-k retrieved chunks, joined by newlines."""
    hits = index.retrieve_many([r["question"] for r in rows], top_k)
    out = []
    for row, ranked in zip(rows, hits, strict=True):
        ids = [chunk_id for chunk_id, _ in ranked]
        out.append(dict(row, context="\n".join(kb[i] for i in ids), retrieved_ids=ids))
    return out


def bm25_retrieval_scores(rows: list[dict], index, cutoff: int = 10) -> dict[str, float]:
    """hit@k, MRR and nDCG of BM25 for the CMRC rows' questions against their gold chunk."""
    hits = index.retrieve_many([r["question"] for r in rows], cutoff)
    ranked = [[chunk_id for chunk_id, _ in h] for h in hits]
    return retrieval_metrics(ranked, [[r["gold_chunk_id"]] for r in rows], cutoff=cutoff)


def run_cmrc(generator, rows: list[dict], max_new_tokens: int, embedder) -> tuple[list[dict], dict[str, float]]:
    """Answer each row from its `context`; per-example rows and the means of CMRC_KEYS."""
    start = time.perf_counter()
    predictions = generator.generate([cmrc_prompt(r["context"], r["question"]) for r in rows], max_new_tokens)
    seconds = time.perf_counter() - start
    similarity = semantic_similarity(embedder, predictions, [r["answers"] for r in rows])
    examples = []
    for row, pred, sim in zip(rows, predictions, similarity, strict=True):
        scores = cmrc_example_scores(pred, row["answers"], row["context"]) | {"similarity": sim}
        example = {"id": row["id"], "question": row["question"], "answers": row["answers"], "prediction": pred}
        if "retrieved_ids" in row:
            example["retrieved_ids"] = row["retrieved_ids"]
            example["gold_retrieved"] = row["gold_chunk_id"] in row["retrieved_ids"]
        examples.append(example | scores)
    summary = mean_scores(examples, CMRC_KEYS) | {"n": len(examples), "seconds": round(seconds, 1)}
    return examples, summary


def run_math(generator, rows: list[dict], max_new_tokens: int) -> tuple[list[dict], dict[str, float]]:
    """GSM8K accuracy of the final answer; how each answer was read is counted per format."""
    start = time.perf_counter()
    predictions = generator.generate([math_prompt(r["question"]) for r in rows], max_new_tokens)
    seconds = time.perf_counter() - start
    examples = [
        {"id": r["id"], "question": r["question"], "gold": r["answer"], "prediction": p}
        | math_example_scores(p, r["answer"])
        for r, p in zip(rows, predictions, strict=True)
    ]
    formats = Counter(e["format"] for e in examples)
    summary: dict[str, float] = {"accuracy": mean_scores(examples, ["correct"])["correct"], "n": len(examples)}
    summary["format_failures"] = sum(formats[f] for f in FORMAT_FAILURES)
    summary |= {f"format_{f}": formats[f] for f in MATH_FORMATS}
    summary["seconds"] = round(seconds, 1)
    return examples, summary
