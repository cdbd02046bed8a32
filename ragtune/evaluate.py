"""Scoring the served assistant: a bundle's own answer path, end to end, on held-out questions.

Three question sets, seeded and the same for every bundle (so base and tuned are compared question by
question):
- served: held-out CMRC trial and GSM8K test questions, mixed; the bundle routes, retrieves, prompts
  and generates exactly as `ragtune serve` does. A misrouted question is scored on the answer it got.
- unanswerable: other held-out CMRC questions, asked with their own article left out of retrieval: the
  assistant should abstain (prompts.NO_ANSWER).
- gold context (diagnostic): the served CMRC questions answered from their gold chunk alone, through
  the same template, budget and generator (isolates the model from routing and retrieval).
Reading answers are scored with CMRC2018's official EM and F1 (ragtune.metrics); every mean carries a
seeded 95 % bootstrap interval (ragtune.stats); retrieval hit@k/MRR/nDCG of the bundle's retriever on
every held-out question use the one definition of a relevant chunk (ReadingQuestion.gold_chunk_ids).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from ragtune.config import Config
from ragtune.data import seeded_sample
from ragtune.metrics import (
    cmrc_official_em,
    cmrc_official_f1,
    contained,
    math_answer,
    normalize_number,
    retrieval_metrics,
    semantic_similarity,
    strict_exact_match,
)
from ragtune.records import MathsQuestion, ReadingQuestion
from ragtune.router import MATHS, READING
from ragtune.stats import bootstrap_ci, paired_bootstrap_diff

# The seed's published GPU numbers (internlm2-chat-7b, CMRC trial with the gold passage, its own metric
# definitions: its EM is the strict one; GSM8K test accuracy). Shown as reference rows, never compared.
SEED_REFERENCES = {
    "seed: internlm2-chat-7b base (GPU, gold passage)": {
        "gold_context.strict_em": 0.0210, "gold_context.similarity": 0.7451, "gold_context.containment": 0.0519,
        "served.gsm8k.accuracy": 0.2509},
    "seed: internlm2-chat-7b LoRA (GPU, gold passage)": {
        "gold_context.strict_em": 0.3972, "gold_context.similarity": 0.8619, "gold_context.containment": 0.9491},
    "seed: DeepSeek online model (600B+)": {"gold_context.strict_em": 0.05, "gold_context.similarity": 0.7485},
    "seed: distilled without CoT / with CoT (GSM8K)": {"served.gsm8k.accuracy": 0.7210,
                                                      "note": "63.61 % without chain of thought"},
    "seed: teacher DeepSeek-R1 (GSM8K)": {"served.gsm8k.accuracy": 0.9105},
}


class EndpointConfig(Config):
    """An OpenAI-compatible endpoint scored beside the bundles."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="the model name the endpoint serves")
    mode: Literal["generator", "assistant"] = Field(
        "generator", description="generator: the bundle routes, retrieves and prompts, the endpoint writes the answers "
                                 "(vLLM, an online model); assistant: the endpoint answers the question itself "
                                 "(another `ragtune serve`; served rows only)")
    api_key_env: str | None = Field(None, description="environment variable holding the API key (null: none needed)")
    timeout: float = Field(120.0, gt=0, description="seconds per request")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")


class EvalConfig(Config):
    """`eval` (conf/eval/default.yaml): what is scored, on how many held-out questions, and how."""

    cmrc_samples: int | None = Field(None, gt=0, description="served CMRC questions (seeded subset; null: every held-out one)")
    gsm8k_samples: int | None = Field(None, gt=0, description="served GSM8K questions (seeded subset; null: all)")
    abstain_samples: int | None = Field(100, ge=0, description="CMRC questions asked with their article left out of "
                                                               "retrieval (seeded; null: all, 0: none)")
    gold_context: bool = Field(True, description="also answer the served CMRC questions from their gold chunk (diagnostic)")
    similarity: bool = Field(True, description="also score the seed's semantic similarity (models/base/embedder)")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="the bundle's generator in process, or a managed `vllm serve` (the `vllm` group)")
    batch_size: int = Field(8, ge=1, description="prompts per batched generate call (in process)")
    bootstrap_resamples: int = Field(2000, ge=100, description="resamples of every 95 % bootstrap interval")
    retrieval_cutoff: int = Field(10, ge=1, description="MRR and nDCG cut-off of the retrieval diagnostic")
    endpoints: dict[str, EndpointConfig] = Field({}, description="name -> an OpenAI-compatible endpoint scored as an extra row")
    references: dict[str, dict[str, float | str] | str] = Field(
        SEED_REFERENCES, description="reference rows of the report: name -> {set.metric: value} (not measured here)")
    log_model: bool = Field(True, description="log the scored bundle to MLflow as a pyfunc model, with these metrics")


@dataclass
class QuestionSets:
    """The seeded question sets every bundle answers."""

    cmrc: list[ReadingQuestion]
    gsm8k: list[MathsQuestion]
    unanswerable: list[ReadingQuestion]
    all_cmrc: list[ReadingQuestion]  # for the retrieval diagnostic

    def sizes(self) -> dict[str, int]:
        return {"cmrc": len(self.cmrc), "gsm8k": len(self.gsm8k), "unanswerable": len(self.unanswerable),
                "retrieval": len(self.all_cmrc)}


def question_sets(cmrc: Sequence[ReadingQuestion], gsm8k: Sequence[MathsQuestion], cfg: EvalConfig, seed: int) -> QuestionSets:
    """The served samples, and an independent seeded sample for the unanswerable set (it may share
    questions with the served one: asked without their article, they are other questions)."""
    served = seeded_sample(list(cmrc), cfg.cmrc_samples, seed)
    unanswerable = seeded_sample(list(cmrc), cfg.abstain_samples, seed + 1) if cfg.abstain_samples != 0 else []
    return QuestionSets(served, seeded_sample(list(gsm8k), cfg.gsm8k_samples, seed), unanswerable, list(cmrc))


# --------------------------------------------------------------------------- per-question scores


def score_reading(question: ReadingQuestion, result: dict[str, Any]) -> dict[str, Any]:
    """Official EM/F1 of the answer the assistant gave (a number when it was routed to maths)."""
    prediction = str(result["answer"])
    context = "\n".join(s["text"] for s in result.get("sources") or [])
    return {
        "official_em": float(cmrc_official_em(prediction, question.answers)),
        "official_f1": cmrc_official_f1(prediction, question.answers),
        "strict_em": float(strict_exact_match(prediction, question.answers)),
        "containment": float(contained(prediction, context)),
        "abstained": float(bool(result.get("abstained"))),
        "routed_right": float(result["route"] == READING),
        "gold_retrieved": float(any(s["chunk_id"] in question.gold_chunk_ids for s in result.get("sources") or [])),
    }


def score_maths(question: MathsQuestion, result: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of the final answer read from the text (whatever the route), and whether it was boxed."""
    value, how = math_answer(result["text"])
    return {
        "accuracy": float(value is not None and value == normalize_number(question.answer)),
        "boxed": float("\\boxed{" in result["text"]),
        "routed_right": float(result["route"] == MATHS),
        "format": how,
        "answer": value,
    }


def prediction_row(kind: str, question: Any, result: dict[str, Any], scores: dict[str, Any]) -> dict[str, Any]:
    golds = question.answers if isinstance(question, ReadingQuestion) else [question.answer]
    row = {"set": kind, "id": question.id, "question": question.question, "golds": golds, "route": result["route"],
           "answer": result["answer"], "text": result["text"],
           "sources": [s["chunk_id"] for s in result.get("sources") or []]}
    for key in ("route_note", "context_note", "abstained"):
        if key in result:
            row[key] = result[key]
    return row | scores


# --------------------------------------------------------------------------- one bundle


def interval(values: Sequence[float], seed: int, resamples: int) -> dict[str, float]:
    mean, low, high = bootstrap_ci(list(values), seed=seed, resamples=resamples)
    return {"mean": round(mean, 6), "low": round(low, 6), "high": round(high, 6), "n": len(values)}


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str], seed: int, resamples: int) -> dict[str, Any]:
    return {key: interval([r[key] for r in rows], seed, resamples) for key in keys} if rows else {}


def evaluate_bundle(bundle, sets: QuestionSets, cfg: EvalConfig, seed: int, embedder=None,
                    log=print) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every metric of one bundle (means with intervals) and the per-question rows."""
    timings, rows = {}, {}
    served = [(q, READING) for q in sets.cmrc] + [(q, MATHS) for q in sets.gsm8k]
    random.Random(seed).shuffle(served)  # the server sees them mixed; scoring does not depend on the order
    started = time.perf_counter()
    results = bundle.answer_many([q.question for q, _ in served])
    timings["served"] = time.perf_counter() - started
    by_id = {q.id: r for (q, _), r in zip(served, results, strict=True)}
    rows["served_cmrc"] = [prediction_row("served_cmrc", q, by_id[q.id], score_reading(q, by_id[q.id])) for q in sets.cmrc]
    rows["served_gsm8k"] = [prediction_row("served_gsm8k", q, by_id[q.id], score_maths(q, by_id[q.id])) for q in sets.gsm8k]
    log(f"eval: served {len(served)} questions in {timings['served']:.0f} s")

    if sets.unanswerable and getattr(bundle, "supports_exclusion", True):
        started = time.perf_counter()
        answers = bundle.answer_many([q.question for q in sets.unanswerable],
                                     exclude_articles=[{q.article_id} for q in sets.unanswerable])
        timings["unanswerable"] = time.perf_counter() - started
        rows["unanswerable"] = [prediction_row("unanswerable", q, r, score_reading(q, r))
                                for q, r in zip(sets.unanswerable, answers, strict=True)]
        log(f"eval: {len(answers)} unanswerable questions in {timings['unanswerable']:.0f} s")
    if cfg.gold_context and hasattr(bundle, "prepare_with_passages"):
        started = time.perf_counter()
        answers = bundle.answer_prepared([bundle.prepare_with_passages(q.question, [q.context]) for q in sets.cmrc])
        timings["gold_context"] = time.perf_counter() - started
        rows["gold_context"] = [prediction_row("gold_context", q, r, score_reading(q, r) | {"routed_right": 1.0})
                                for q, r in zip(sets.cmrc, answers, strict=True)]
        log(f"eval: {len(answers)} gold-context answers in {timings['gold_context']:.0f} s")
    if embedder is not None:
        for name in ("served_cmrc", "gold_context"):
            if name in rows:
                scores = semantic_similarity(embedder, [str(r["answer"]) for r in rows[name]], [r["golds"] for r in rows[name]])
                for row, score in zip(rows[name], scores, strict=True):
                    row["similarity"] = score
    return metrics_of(rows, bundle, sets, cfg, seed) | {"seconds": {k: round(v, 1) for k, v in timings.items()}}, rows


READING_KEYS = ["official_em", "official_f1", "strict_em", "containment", "abstained", "gold_retrieved"]


def metrics_of(rows: dict[str, list[dict]], bundle, sets: QuestionSets, cfg: EvalConfig, seed: int) -> dict[str, Any]:
    b = cfg.bootstrap_resamples
    reading = READING_KEYS + (["similarity"] if rows["served_cmrc"] and "similarity" in rows["served_cmrc"][0] else [])
    served = rows["served_cmrc"] + rows["served_gsm8k"]
    metrics: dict[str, Any] = {
        "served": {
            "cmrc": summarize(rows["served_cmrc"], reading, seed, b),
            "gsm8k": summarize(rows["served_gsm8k"], ["accuracy", "boxed"], seed, b),
            "router": summarize(served, ["routed_right"], seed, b),
        },
        "questions": sets.sizes(),
    }
    if "unanswerable" in rows:
        metrics["unanswerable"] = summarize(rows["unanswerable"], ["abstained", "official_f1"], seed, b)
    if "gold_context" in rows:
        gold_keys = [k for k in reading if k not in ("abstained", "gold_retrieved")] + ["abstained"]
        metrics["gold_context"] = summarize(rows["gold_context"], gold_keys, seed, b)
    if hasattr(bundle, "index"):
        ranked = bundle.index.retrieve_many([q.question for q in sets.all_cmrc], cfg.retrieval_cutoff)
        metrics["retrieval"] = retrieval_metrics([[cid for cid, _ in hits] for hits in ranked],
                                                 [q.gold_chunk_ids for q in sets.all_cmrc], cutoff=cfg.retrieval_cutoff)
        metrics["retrieval"]["kind"] = getattr(bundle.index, "kind", "unknown")
    return metrics


# --------------------------------------------------------------------------- two bundles


PAIRED = [("served_cmrc", "official_em"), ("served_cmrc", "official_f1"), ("served_gsm8k", "accuracy"),
          ("served_gsm8k", "boxed"), ("unanswerable", "abstained"), ("served_cmrc", "abstained"),
          ("gold_context", "official_em"), ("gold_context", "official_f1")]


def paired_differences(base_rows: dict[str, list[dict]], tuned_rows: dict[str, list[dict]], seed: int,
                       resamples: int) -> dict[str, dict[str, float]]:
    """tuned − base for each headline metric, over the same questions, with a paired bootstrap interval."""
    out = {}
    for name, key in PAIRED:
        if name not in base_rows or name not in tuned_rows:
            continue
        base = {r["id"]: r[key] for r in base_rows[name]}
        tuned = {r["id"]: r[key] for r in tuned_rows[name]}
        if set(base) != set(tuned):
            raise ValueError(f"{name}: base and tuned were scored on different questions")
        ids = sorted(base)
        diff = paired_bootstrap_diff([base[i] for i in ids], [tuned[i] for i in ids], seed=seed, resamples=resamples)
        out[f"{name}.{key}"] = {k: round(v, 6) for k, v in diff.items()} | {"n": len(ids)}
    return out


class AssistantEndpoint:
    """A whole assistant behind an OpenAI-compatible API (another `ragtune serve`), asked question by
    question; its route and sources come from the `ragtune` extra of the reply when it sends one."""

    supports_exclusion = False

    def __init__(self, cfg: EndpointConfig):
        import os

        from openai import OpenAI

        key = os.environ.get(cfg.api_key_env or "") if cfg.api_key_env else "EMPTY"
        self.cfg, self.client = cfg, OpenAI(base_url=cfg.base_url, api_key=key or "EMPTY", timeout=cfg.timeout)

    def _one(self, question: str) -> dict[str, Any]:
        from ragtune.prompts import is_abstention

        reply = self.client.chat.completions.create(model=self.cfg.model, temperature=0.0,
                                                    messages=[{"role": "user", "content": question}])
        text = (reply.choices[0].message.content or "").strip()
        extra = (reply.model_extra or {}).get("ragtune") or {}
        route = extra.get("route") or READING
        final = extra.get("final_answer")
        return {"route": route, "text": text, "answer": final if final is not None else text,
                "sources": extra.get("sources") or [], "abstained": route == READING and is_abstention(text)}

    def answer_many(self, questions: Sequence[str], **_: Any) -> list[dict[str, Any]]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            return list(pool.map(self._one, questions))
