"""SFT contexts built the way the served path builds them: retrieval-augmented fine-tuning (RAFT).

The bundle answers a reading question from the retriever's top-k passages. A model trained only on
the gold passage meets two or three distractors for the first time when it is served, so most
training examples here are what serving produces: the served retriever's top-k for the training
question over the *training* knowledge base (eval articles never appear), in the served order or
shuffled, with the gold chunk put in when the retriever missed it. Distractors never hold a gold
answer, and passages are whole chunks: the answer is never cut out of its passage. A share of
examples gets the gold chunk alone, and a share gets only passages of other articles, with the
fixed abstention reply (prompts.NO_ANSWER) as the target: knowing when the passages do not answer.

    kind: gold        the chunk holding the answer (the old recipe)
          window      a window of `window_chars` characters of it around the answer
          retrieved   RAFT, as above
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import Field, model_validator

from ragtune.config import Config
from ragtune.data import answer_window
from ragtune.prompts import NO_ANSWER, cmrc_prompt, join_passages
from ragtune.records import AlpacaRecord, KbChunk, ReadingQuestion


class ContextSettings(Config):
    """How sft builds the context of each CMRC training example."""

    kind: Literal["gold", "window", "retrieved"] = Field(
        "retrieved", description="gold chunk, a window around the answer, or the served retriever's top-k (RAFT)")
    window_chars: int = Field(120, ge=20, description="kind=window: characters of the gold chunk kept around the answer")
    top_k: int | None = Field(None, ge=1, le=20, description="kind=retrieved: passages per example (null: retrieval.top_k, as served)")
    gold_only_share: float = Field(0.2, ge=0, le=1, description="kind=retrieved: share of examples given the gold chunk alone")
    abstain_share: float = Field(0.1, ge=0, le=1, description="kind=retrieved: share given only other articles' passages, "
                                                              "taught to answer prompts.NO_ANSWER")
    order: Literal["served", "shuffled"] = Field("served", description="kind=retrieved: passages in the retriever's order or shuffled")
    target: Literal["first", "longest"] = Field(
        "first", description="which gold answer is the target: the first, or the longest (trial's golds are long)")

    @model_validator(mode="after")
    def _shares(self) -> ContextSettings:
        if self.gold_only_share + self.abstain_share > 1:
            raise ValueError("gold_only_share + abstain_share must not exceed 1")
        return self


def target_answer(question: ReadingQuestion, which: str) -> str:
    return max(question.answers, key=len) if which == "longest" else question.answers[0]


def holds_answer(text: str, question: ReadingQuestion) -> bool:
    return any(answer in text for answer in question.answers)


def build_contexts(
    questions: Sequence[ReadingQuestion],
    chunks: Sequence[KbChunk],
    settings: ContextSettings,
    *,
    retriever=None,
    top_k: int,
    seed: int,
    fits: Callable[[str], bool] = lambda prompt: True,
) -> tuple[list[AlpacaRecord], Counter]:
    """One Alpaca record per question (prompts.cmrc_prompt, the answer as output) and counts of what
    was built. `chunks` are the training articles' chunks; `retriever` searches exactly those
    (needed for kind=retrieved); `fits(prompt)` says whether a prompt fits the token budget: when it
    does not, the lowest-ranked distractors are dropped first, never the gold passage."""
    by_id = {c.chunk_id: c for c in chunks}
    rng = random.Random(seed)
    counts: Counter = Counter()
    if settings.kind != "retrieved":
        return [_single(q, settings, by_id, counts) for q in questions], counts
    if retriever is None:
        raise ValueError("contexts of kind 'retrieved' need the served retriever")
    depth = top_k + 12  # room to skip distractors that hold the answer, and other articles for abstention
    hits = retriever.retrieve_many([q.question for q in questions], depth)
    records = []
    for q, ranked in zip(questions, hits, strict=True):
        draw = rng.random()
        if draw < settings.abstain_share:
            passages = [by_id[c].text for c, _ in ranked
                        if by_id[c].article_id != q.article_id and not holds_answer(by_id[c].text, q)][:top_k]
            if passages:
                records.append(_record(q, passages, NO_ANSWER, settings, rng, fits, gold=None))
                counts["abstain"] += 1
                continue
        answer = target_answer(q, settings.target)
        gold = _gold_text(q, by_id, answer)
        answer = answer if answer in gold else q.answers[0]  # the target always comes from its passage
        if draw < settings.abstain_share + settings.gold_only_share:
            records.append(AlpacaRecord(instruction=cmrc_prompt(gold, q.question), output=answer))
            counts["gold_only"] += 1
            continue
        ids = [c for c, _ in ranked]
        distractors = [by_id[c].text for c in ids if c not in q.gold_chunk_ids and not holds_answer(by_id[c].text, q)]
        gold_rank = next((i for i, c in enumerate(ids[:top_k]) if c in q.gold_chunk_ids and holds_answer(by_id[c].text, q)), None)
        if gold_rank is None:
            counts["gold_inserted"] += 1
            gold_rank = rng.randrange(top_k)
        passages = distractors[: top_k - 1]
        passages.insert(min(gold_rank, len(passages)), gold)
        records.append(_record(q, passages, answer, settings, rng, fits, gold=gold))
        counts["retrieved"] += 1
    return records, counts


def _gold_text(q: ReadingQuestion, by_id: dict[str, KbChunk], answer: str) -> str:
    """The first gold chunk holding `answer` verbatim (else split's context, which holds the first answer)."""
    for chunk_id in q.gold_chunk_ids:
        if chunk_id in by_id and answer in by_id[chunk_id].text:
            return by_id[chunk_id].text
    return q.context


def _record(q: ReadingQuestion, passages: list[str], output: str, settings: ContextSettings, rng: random.Random,
            fits: Callable[[str], bool], gold: str | None) -> AlpacaRecord:
    if settings.order == "shuffled":
        rng.shuffle(passages)
    while len(passages) > 1 and not fits(cmrc_prompt(join_passages(passages), q.question)):
        drop = max(i for i, p in enumerate(passages) if p != gold)  # the lowest-ranked distractor
        passages.pop(drop)
    return AlpacaRecord(instruction=cmrc_prompt(join_passages(passages), q.question), output=output)


def _single(q: ReadingQuestion, settings: ContextSettings, by_id: dict[str, KbChunk], counts: Counter) -> AlpacaRecord:
    """kind gold or window: the gold chunk, or a window of it around the target answer."""
    answer = target_answer(q, settings.target)
    context = _gold_text(q, by_id, answer)
    answer = answer if answer in context else q.answers[0]
    if settings.kind == "window" and len(context) > settings.window_chars and answer in context:
        context = answer_window(context, context.index(answer), len(answer), settings.window_chars)
    counts[settings.kind] += 1
    return AlpacaRecord(instruction=cmrc_prompt(context, q.question), output=answer)
