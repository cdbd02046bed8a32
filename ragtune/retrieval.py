"""Retrieval over the knowledge base: BM25 for Chinese (bm25s + jieba), a dense retriever
(sentence-transformers) and their reciprocal-rank fusion, behind one interface:

    retriever.retrieve(query, k) -> [(chunk_id, score)], best first
    retriever.retrieve_many(queries, k) -> one such list per query
    retriever.save(folder); load_retriever(folder) -> the same retriever

Every saved folder holds `retriever.json` naming its kind, so `load_retriever` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import Field

from ragtune.config import Config
from ragtune.io import DataError

_PUNCT_OR_SPACE = re.compile(r"^[\s\W_]+$", re.UNICODE)
MANIFEST = "retriever.json"
Hits = list[tuple[str, float]]


class RetrievalConfig(Config):
    """`retrieval` (conf/retrieval/default.yaml): the served retriever, which eval scores through the bundle."""

    kind: Literal["bm25", "dense", "hybrid"] = Field(
        "bm25", description="bm25 (jieba tokens), dense (the tuned embedder) or hybrid (reciprocal-rank fusion of both)")
    top_k: int = Field(3, ge=1, le=20, description="passages handed to the generator per reading question")
    stopwords: list[str] = Field([], description="tokens BM25 ignores (split's negative mining uses the same list)")
    rrf_k: int = Field(60, ge=1, description="hybrid: score = sum over retrievers of weight / (rrf_k + rank)")
    candidates: int = Field(50, ge=1, description="hybrid: hits asked of each retriever before fusing")
    bm25_weight: float = Field(1.0, ge=0, description="hybrid: weight of BM25's ranks")
    dense_weight: float = Field(1.0, ge=0, description="hybrid: weight of the dense retriever's ranks")
    batch_size: int = Field(64, ge=1, description="dense: texts per encoding batch")
    index_title: int = Field(2, ge=0, le=5, description="the document's title is indexed this many times with each "
                                                       "chunk (0: the chunk's text alone); passages stay the text")


# A word of an alphabetic script (letters and digits, inner apostrophes kept): CJK characters are left out,
# so "LED灯组" gives "led" and leaves "灯组" to jieba.
_CJK_RANGES = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003ffff"
_WORD = re.compile(rf"[^\W_{_CJK_RANGES}]+(?:'[^\W_{_CJK_RANGES}]+)*")
_ASCII_WORD = re.compile(r"[a-z0-9]+")


def tokenize_zh(text: str, stopwords: Iterable[str] = ()) -> list[str]:
    """jieba words, lower-cased, punctuation and spaces dropped, one-character words kept; English
    (and other alphabetic) words whole.

    bm25s's own tokenizer uses the pattern r"(?u)\\b\\w\\w+\\b", which drops every
    one-character token: in Chinese that loses words such as 书, 猫 or 宋. jieba splits words of
    a-z fine, but cuts a word at any other letter ("café" -> "caf", "é") and at an apostrophe
    ("bakery's" -> "bakery", "s"): such words are taken whole here, a possessive 's dropped.
    Text without them is cut by jieba exactly as before.
    """
    import jieba

    jieba.setLogLevel(logging.WARNING)
    stop = set(stopwords)
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    tokens, pos = [], 0
    for match in _WORD.finditer(text):
        word = match.group()
        if _ASCII_WORD.fullmatch(word):
            continue  # jieba's own: the same tokens as ever
        tokens += jieba.lcut(text[pos:match.start()]) if match.start() > pos else []
        tokens.append(word[:-2] if word.endswith("'s") else word)
        pos = match.end()
    tokens += jieba.lcut(text[pos:]) if pos < len(text) else []
    return [t for t in tokens if t.strip() and not _PUNCT_OR_SPACE.match(t) and t not in stop]


class Retriever(Protocol):
    chunk_ids: list[str]

    def retrieve_many(self, queries: Sequence[str], k: int) -> list[Hits]: ...

    def retrieve(self, query: str, k: int) -> Hits: ...

    def save(self, folder: str | Path) -> None: ...


def _write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _read_manifest(folder: Path, kind: str | None = None) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: not found (not a saved retriever folder)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if kind and manifest.get("kind") != kind:
        raise DataError(f"{path}: holds a '{manifest.get('kind')}' retriever, not '{kind}'")
    return manifest


class BM25Index:
    """bm25s over jieba tokens. Chunks sharing no token with the query (score 0) are never returned."""

    kind = "bm25"

    def __init__(self, chunk_ids: Sequence[str], texts: Sequence[str], stopwords: Iterable[str] = ()):
        import bm25s

        if len(chunk_ids) != len(texts):
            raise ValueError("chunk_ids and texts differ in length")
        self.chunk_ids = list(chunk_ids)
        self.stopwords = list(stopwords)
        self._bm25 = bm25s.BM25()
        self._bm25.index([tokenize_zh(t, self.stopwords) for t in texts], show_progress=False)

    def retrieve_many(self, queries: Sequence[str], k: int) -> list[Hits]:
        k = min(k, len(self.chunk_ids))
        results: list[Hits] = [[] for _ in queries]
        vocab = self._bm25.vocab_dict
        # Only tokens the corpus has can score; a query with none of them has no hits (bm25s
        # would fail on an empty query).
        tokens = [[t for t in tokenize_zh(q, self.stopwords) if t and t in vocab] for q in queries]
        asked = [i for i, t in enumerate(tokens) if t]
        if not asked or k <= 0:
            return results
        docs, scores = self._bm25.retrieve([tokens[i] for i in asked], k=k, show_progress=False)
        for i, row_docs, row_scores in zip(asked, np.asarray(docs), np.asarray(scores), strict=True):
            results[i] = [(self.chunk_ids[int(d)], float(s)) for d, s in zip(row_docs, row_scores, strict=True) if s > 0]
        return results

    def retrieve(self, query: str, k: int) -> Hits:
        return self.retrieve_many([query], k)[0]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        self._bm25.save(str(folder / "bm25"), show_progress=False)
        (folder / "chunk_ids.json").write_text(json.dumps(self.chunk_ids, ensure_ascii=False), encoding="utf-8")
        _write_manifest(folder, {"kind": self.kind, "stopwords": self.stopwords, "chunks": len(self.chunk_ids)})

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> BM25Index:  # noqa: ARG003 (one signature for every kind)
        import bm25s

        folder = Path(folder)
        manifest = _read_manifest(folder, cls.kind)
        index = cls.__new__(cls)
        index.chunk_ids = json.loads((folder / "chunk_ids.json").read_text(encoding="utf-8"))
        index.stopwords = list(manifest.get("stopwords") or [])
        index._bm25 = bm25s.BM25.load(str(folder / "bm25"), show_progress=False)
        return index


def load_embedder(model: Any, device: str = "cpu"):
    """A SentenceTransformer from a folder path (on `device`), or `model` itself if it already is one."""
    if isinstance(model, (str, Path)):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(model), device=device, local_files_only=True)
    return model


class DenseIndex:
    """Cosine similarity of normalised sentence-transformers embeddings; queries get `query_prompt`
    prepended (bge's retrieval instruction), chunks are encoded as they are."""

    kind = "dense"

    def __init__(
        self,
        chunk_ids: Sequence[str],
        texts: Sequence[str],
        model: Any,
        query_prompt: str = "",
        batch_size: int = 64,
        embeddings: np.ndarray | None = None,
    ):
        if len(chunk_ids) != len(texts) and embeddings is None:
            raise ValueError("chunk_ids and texts differ in length")
        self.chunk_ids = list(chunk_ids)
        self.model = load_embedder(model)
        self.query_prompt = query_prompt or ""
        self.batch_size = batch_size
        if embeddings is None:
            embeddings = self.encode(list(texts))
        if len(embeddings) != len(self.chunk_ids):
            raise ValueError(f"{len(embeddings)} embeddings for {len(self.chunk_ids)} chunks")
        self.embeddings = np.asarray(embeddings, dtype=np.float32)

    def encode(self, texts: Sequence[str], prompt: str = "") -> np.ndarray:
        return self.model.encode(
            list(texts),
            prompt=prompt or None,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)

    def retrieve_many(self, queries: Sequence[str], k: int) -> list[Hits]:
        k = min(k, len(self.chunk_ids))
        if not queries or k <= 0:
            return [[] for _ in queries]
        scores = self.encode(queries, self.query_prompt) @ self.embeddings.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        results = []
        for row, candidates in zip(scores, top, strict=True):
            order = candidates[np.argsort(-row[candidates], kind="stable")]
            results.append([(self.chunk_ids[int(i)], float(row[i])) for i in order])
        return results

    def retrieve(self, query: str, k: int) -> Hits:
        return self.retrieve_many([query], k)[0]

    def save(self, folder: str | Path, include_model: bool = True) -> None:
        """Embeddings, chunk ids and (by default) a copy of the model, so the folder stands alone."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "embeddings.npy", self.embeddings)
        (folder / "chunk_ids.json").write_text(json.dumps(self.chunk_ids, ensure_ascii=False), encoding="utf-8")
        if include_model:
            if (folder / "model").exists():
                shutil.rmtree(folder / "model")
            self.model.save(str(folder / "model"))
        _write_manifest(
            folder,
            {
                "kind": self.kind,
                "query_prompt": self.query_prompt,
                "model": "model" if include_model else None,
                "dim": int(self.embeddings.shape[1]),
                "chunks": len(self.chunk_ids),
            },
        )

    @classmethod
    def load(cls, folder: str | Path, model: Any = None, device: str = "cpu") -> DenseIndex:
        """`model` (a folder or SentenceTransformer) is needed only if the folder holds none."""
        folder = Path(folder)
        manifest = _read_manifest(folder, cls.kind)
        if model is None:
            if not manifest.get("model"):
                raise DataError(f"{folder / MANIFEST}: no model saved with the index; pass model=")
            model = load_embedder(folder / manifest["model"], device)
        chunk_ids = json.loads((folder / "chunk_ids.json").read_text(encoding="utf-8"))
        return cls(chunk_ids, [], model, manifest.get("query_prompt", ""), embeddings=np.load(folder / "embeddings.npy"))


class HybridIndex:
    """Reciprocal-rank fusion: score = sum over retrievers of weight / (rrf_k + rank), each retriever
    asked for its top `candidates`."""

    kind = "hybrid"

    def __init__(
        self,
        retrievers: Sequence[Retriever],
        weights: Sequence[float] | None = None,
        rrf_k: int = 60,
        candidates: int = 50,
    ):
        if not retrievers:
            raise ValueError("a hybrid needs at least one retriever")
        self.retrievers = list(retrievers)
        self.weights = list(weights) if weights else [1.0] * len(self.retrievers)
        if len(self.weights) != len(self.retrievers):
            raise ValueError("one weight per retriever")
        self.rrf_k = rrf_k
        self.candidates = candidates
        self.chunk_ids = self.retrievers[0].chunk_ids

    def retrieve_many(self, queries: Sequence[str], k: int) -> list[Hits]:
        depth = max(k, self.candidates)
        per_retriever = [r.retrieve_many(queries, depth) for r in self.retrievers]
        results = []
        for i in range(len(queries)):
            fused: dict[str, float] = {}
            for weight, hits in zip(self.weights, per_retriever, strict=True):
                for rank, (chunk_id, _) in enumerate(hits[i], start=1):
                    fused[chunk_id] = fused.get(chunk_id, 0.0) + weight / (self.rrf_k + rank)
            results.append(sorted(fused.items(), key=lambda item: -item[1])[:k])
        return results

    def retrieve(self, query: str, k: int) -> Hits:
        return self.retrieve_many([query], k)[0]

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        parts = []
        for i, retriever in enumerate(self.retrievers):
            name = f"{i}_{retriever.kind}"
            retriever.save(folder / name)
            parts.append(name)
        _write_manifest(
            folder,
            {"kind": self.kind, "parts": parts, "weights": self.weights, "rrf_k": self.rrf_k, "candidates": self.candidates},
        )

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> HybridIndex:
        folder = Path(folder)
        manifest = _read_manifest(folder, cls.kind)
        parts = [load_retriever(folder / name, device) for name in manifest["parts"]]
        return cls(parts, manifest["weights"], manifest["rrf_k"], manifest["candidates"])


_KINDS = {cls.kind: cls for cls in (BM25Index, DenseIndex, HybridIndex)}


def load_retriever(folder: str | Path, device: str = "cpu") -> Retriever:
    """Whatever retriever `save` wrote to `folder` (its retriever.json names the kind); a dense model
    runs on `device`."""
    kind = _read_manifest(Path(folder)).get("kind")
    if kind not in _KINDS:
        raise DataError(f"{Path(folder) / MANIFEST}: unknown retriever kind '{kind}' (expected {sorted(_KINDS)})")
    return _KINDS[kind].load(folder, device=device)


def indexed_texts(chunks: Sequence[Any], index_title: int) -> list[str]:
    """What a retriever indexes for each chunk (KbChunk): its title `index_title` times, then its text.
    Questions name their subject ("《战国无双3》是由…"), which often only the title carries: on CMRC
    trial BM25 hit@1 goes from 0.747 (text alone) to 0.822 (title twice)."""
    return [" ".join([c.title] * index_title + [c.text]) if c.title else c.text for c in chunks]


def build_retriever(
    cfg: RetrievalConfig,
    chunks: Sequence[Any],
    *,
    embedder: Any = None,
    query_prompt: str = "",
    device: str = "cpu",
) -> Retriever:
    """The retriever `cfg.kind` names over the chunks (KbChunk: titles indexed per cfg.index_title); dense
    and hybrid need `embedder` (a folder, loaded on `device`, or a SentenceTransformer)."""
    chunk_ids, texts = [c.chunk_id for c in chunks], indexed_texts(chunks, cfg.index_title)
    if cfg.kind == "bm25":
        return BM25Index(chunk_ids, texts, cfg.stopwords)
    if embedder is None:
        raise ValueError(f"a {cfg.kind} retriever needs an embedder (folder or SentenceTransformer)")
    dense = DenseIndex(chunk_ids, texts, load_embedder(embedder, device), query_prompt, batch_size=cfg.batch_size)
    if cfg.kind == "dense":
        return dense
    bm25 = BM25Index(chunk_ids, texts, cfg.stopwords)
    return HybridIndex([bm25, dense], [cfg.bm25_weight, cfg.dense_weight], cfg.rrf_k, cfg.candidates)
