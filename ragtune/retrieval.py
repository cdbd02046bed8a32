"""Retrieval over the knowledge base: BM25 for Chinese (bm25s + jieba)."""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

_PUNCT_OR_SPACE = re.compile(r"^[\s\W_]+$", re.UNICODE)


def tokenize_zh(text: str, stopwords: Iterable[str] = ()) -> list[str]:
    """jieba words, lower-cased, punctuation and spaces dropped, one-character words kept.

    bm25s's own tokenizer uses the pattern r"(?u)\\b\\w\\w+\\b", which drops every
    one-character token: in Chinese that loses words such as 书, 猫 or 宋.
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)
    stop = set(stopwords)
    text = unicodedata.normalize("NFKC", text).lower()
    return [t for t in jieba.lcut(text) if t.strip() and not _PUNCT_OR_SPACE.match(t) and t not in stop]


class BM25Index:
    """bm25s over jieba tokens; `retrieve(query, k)` returns [(chunk_id, score)], best first."""

    def __init__(self, chunk_ids: Sequence[str], texts: Sequence[str], stopwords: Iterable[str] = ()):
        import bm25s

        if len(chunk_ids) != len(texts):
            raise ValueError("chunk_ids and texts differ in length")
        self.chunk_ids = list(chunk_ids)
        self.stopwords = list(stopwords)
        self._bm25 = bm25s.BM25()
        self._bm25.index([tokenize_zh(t, self.stopwords) or [""] for t in texts], show_progress=False)

    def retrieve_many(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.chunk_ids))
        tokens = [tokenize_zh(q, self.stopwords) or [""] for q in queries]
        docs, scores = self._bm25.retrieve(tokens, k=k, show_progress=False)
        return [
            [(self.chunk_ids[int(d)], float(s)) for d, s in zip(row_docs, row_scores, strict=True)]
            for row_docs, row_scores in zip(np.asarray(docs), np.asarray(scores), strict=True)
        ]

    def retrieve(self, query: str, k: int) -> list[tuple[str, float]]:
        return self.retrieve_many([query], k)[0]
