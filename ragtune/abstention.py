"""Knowing when the knowledge base does not answer: a retrieval-confidence gate, calibrated on training
questions, in front of the generator.

A reading question whose article is not in the KB still gets a top passage, and a 135M generator
answers from whatever it is given. What does tell the cases apart is how much of the question the
best passage matches. For BM25 the confidence is the *coverage*: the top passage's score divided by
the sum, over the question's tokens, of the best score each token reaches on its own in any chunk
(the score a passage holding every query word at its best would get). A word no chunk holds counts
with the score it would get in a chunk holding it once (idf at document frequency 1): a name the KB
has never seen is strong evidence that the KB does not answer. Dense and hybrid retrievers use their
top-1 score (cosine, or the fused score).

Measured on 200 served and 200 unanswerable held-out CMRC questions (an unanswerable question's
article left out of the index *and* of the token bounds, as if it had never been there): ROC AUC
0.965; 0.896 when unseen words count zero.

The threshold is not tuned on eval questions: `calibrate` asks the *training* questions twice, over
the whole KB (answerable) and with their own article left out (unanswerable, the way eval builds
its unanswerable set), and takes the highest threshold that abstains on at most
`package.abstain_answerable_share` of the answerable ones. A bundle stores it in its answer
settings (`min_confidence`); below it the bundle answers prompts.NO_ANSWER without generating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ragtune.retrieval import tokenize_zh

Hits = list[tuple[str, float]]


def retrieve_excluding(index: Any, article_of: dict[str, str], queries: Sequence[str], k: int,
                       exclude: set[str] | None = None) -> list[Hits]:
    """Each query's top `k` over the KB as if `exclude`'s articles had never been added: asks for `k`
    plus their chunk count (so `k` remain whatever they held), then drops theirs."""
    if not exclude:
        return index.retrieve_many(list(queries), k)
    depth = k + sum(1 for a in article_of.values() if a in exclude)
    return [[(cid, s) for cid, s in hits if article_of.get(cid) not in exclude][:k]
            for hits in index.retrieve_many(list(queries), depth)]


class RetrievalConfidence:
    """confidence(question, hits, exclude_articles) for one retriever over one KB."""

    def __init__(self, index: Any, article_of: dict[str, str]):
        self.index, self.article_of = index, article_of
        self._best: dict[str, float] = {}  # a token's best single-token score over the whole KB

    def confidence(self, question: str, hits: Hits, exclude_articles: set[str] | None = None) -> float:
        if not hits:
            return 0.0
        if getattr(self.index, "kind", None) != "bm25":
            return float(hits[0][1])
        tokens = tokenize_zh(question, getattr(self.index, "stopwords", ()))
        bound = sum(best or self.unseen_bound for best in self._token_bests(tokens, exclude_articles))
        return float(hits[0][1]) / bound if bound > 0 else 0.0

    @property
    def unseen_bound(self) -> float:
        """BM25 (Lucene idf, as bm25s) of a word held once by one chunk of average length: idf(df=1)."""
        return math.log(1 + (len(self.article_of) - 0.5) / 1.5)

    def _token_bests(self, tokens: Sequence[str], exclude: set[str] | None) -> list[float]:
        """Each token's best score alone, over the KB without `exclude`'s articles (cached when none)."""
        if exclude:
            kept = retrieve_excluding(self.index, self.article_of, tokens, 1, exclude)
            return [float(hits[0][1]) if hits else 0.0 for hits in kept]
        missing = sorted({t for t in tokens if t not in self._best})
        if missing:
            for token, hits in zip(missing, self.index.retrieve_many(missing, 1), strict=True):
                self._best[token] = float(hits[0][1]) if hits else 0.0
        return [self._best[t] for t in tokens]


@dataclass
class Calibration:
    threshold: float
    answerable_abstain: float  # on the training questions, with their article in the KB
    unanswerable_abstain: float  # on the same questions, their article left out
    questions: int

    def as_dict(self) -> dict[str, float | int]:
        return {"min_confidence": round(self.threshold, 6), "train_answerable_abstain": round(self.answerable_abstain, 4),
                "train_unanswerable_abstain": round(self.unanswerable_abstain, 4), "train_questions": self.questions}


def calibrate(gate: RetrievalConfidence, questions: Sequence[Any], answerable_share: float, top_k: int) -> Calibration:
    """The threshold abstaining on at most `answerable_share` of `questions` (ReadingQuestions whose
    articles are in the KB), and how often it abstains on them with their article left out."""
    if not questions:
        raise ValueError("calibration needs reading questions")
    texts = [q.question for q in questions]
    answerable = [gate.confidence(t, hits) for t, hits in zip(texts, gate.index.retrieve_many(texts, top_k), strict=True)]
    unanswerable = [gate.confidence(q.question, _retrieve_without(gate, q, top_k), {q.article_id}) for q in questions]
    ranked = sorted(answerable)
    threshold = ranked[min(int(answerable_share * len(ranked)), len(ranked) - 1)]
    return Calibration(threshold, _share_below(answerable, threshold), _share_below(unanswerable, threshold), len(questions))


def _retrieve_without(gate: RetrievalConfidence, question: Any, k: int) -> Hits:
    return retrieve_excluding(gate.index, gate.article_of, [question.question], k, {question.article_id})[0]


def _share_below(values: Sequence[float], threshold: float) -> float:
    return sum(1 for v in values if v < threshold) / len(values)
