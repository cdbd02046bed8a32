"""Retrieval: Chinese tokenisation, BM25 / dense / hybrid indexes and their save-load round trips,
and the retrieval metrics on hand-computed rankings."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ragtune.io import DataError
from ragtune.metrics import hit_at, ndcg_at, reciprocal_rank, retrieval_metrics
from ragtune.records import KbChunk, read_kb
from ragtune.retrieval import (
    BM25Index,
    DenseIndex,
    HybridIndex,
    RetrievalConfig,
    build_retriever,
    indexed_texts,
    load_retriever,
    tokenize_zh,
)

ROOT = Path(__file__).resolve().parents[1]

CHUNKS = {
    "c0": "宋朝的首都是汴京，后来迁到临安。",
    "c1": "猫是一种常见的宠物，喜欢吃鱼。",
    "c2": "书是人类进步的阶梯，也讲长城的历史。",
    "c3": "北京是中国的首都，有故宫和天安门。",
    "c4": "The quick brown fox jumps over the lazy dog.",
}
QUERIES = ["宋朝的首都在哪里？", "猫喜欢吃什么？", "哪本书讲长城？", "中国的首都是哪里"]


@pytest.fixture(scope="module")
def embedder(embedder_dir) -> Path:
    """models/base/embedder as fetch builds it (conftest: from its package when not fetched)."""
    return embedder_dir


def test_single_characters_survive_tokenisation():
    tokens = tokenize_zh("猫和书，宋。")
    for char in ("猫", "书", "宋"):
        assert char in tokens
    assert "，" not in tokens and "。" not in tokens
    assert "和" not in tokenize_zh("猫和书", stopwords=["和"])


def test_bm25_finds_one_character_words_and_drops_zero_scores():
    index = BM25Index(list(CHUNKS), list(CHUNKS.values()))
    assert index.retrieve("猫", 3)[0][0] == "c1"
    assert index.retrieve("书", 3)[0][0] == "c2"
    # Only chunks sharing a token with the query come back; none for an unknown word or punctuation.
    assert all(score > 0 for _, score in index.retrieve("猫", 5))
    assert len(index.retrieve("猫", 5)) < len(CHUNKS)
    assert index.retrieve("量子", 5) == []
    assert index.retrieve("？！", 5) == []
    assert index.retrieve_many([], 5) == []


def test_bm25_save_load_round_trip(tmp_path):
    index = BM25Index(list(CHUNKS), list(CHUNKS.values()), stopwords=["的"])
    index.save(tmp_path / "bm25")
    loaded = load_retriever(tmp_path / "bm25")
    assert isinstance(loaded, BM25Index)
    assert loaded.stopwords == ["的"] and loaded.chunk_ids == list(CHUNKS)
    assert loaded.retrieve_many(QUERIES, 5) == index.retrieve_many(QUERIES, 5)


def test_dense_and_hybrid_save_load_round_trip(tmp_path, embedder):
    dense = DenseIndex(list(CHUNKS), list(CHUNKS.values()), embedder, query_prompt="查询：")
    hits = dense.retrieve_many(QUERIES, 3)
    assert all(len(h) == 3 for h in hits)
    assert all(a[1] >= b[1] for h in hits for a, b in zip(h, h[1:]))  # best first
    dense.save(tmp_path / "dense")
    loaded = load_retriever(tmp_path / "dense")
    assert isinstance(loaded, DenseIndex) and loaded.query_prompt == "查询："
    again = loaded.retrieve_many(QUERIES, 3)
    assert [[c for c, _ in h] for h in again] == [[c for c, _ in h] for h in hits]
    assert all(abs(a[1] - b[1]) < 1e-5 for h, g in zip(hits, again) for a, b in zip(h, g))

    hybrid = HybridIndex([BM25Index(list(CHUNKS), list(CHUNKS.values())), loaded], rrf_k=60, candidates=5)
    fused = hybrid.retrieve_many(QUERIES, 2)
    assert fused[1][0][0] == "c1"
    hybrid.save(tmp_path / "hybrid")
    assert load_retriever(tmp_path / "hybrid").retrieve_many(QUERIES, 2) == fused


def test_build_retriever_and_errors(tmp_path):
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"chunk_id": "a", "article_id": "x", "title": "", "text": "猫"}\n'
                  '{"chunk_id": "b", "article_id": "x", "title": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"kb.jsonl:2: missing field 'text'"):
        read_kb(kb)
    chunks = [KbChunk(chunk_id="a", article_id="x", title="", text="猫"),
              KbChunk(chunk_id="b", article_id="y", title="宋朝", text="狗")]
    retriever = build_retriever(RetrievalConfig(kind="bm25"), chunks)
    assert retriever.retrieve("狗", 1) == [("b", pytest.approx(retriever.retrieve("狗", 1)[0][1]))]
    assert retriever.retrieve("宋朝的狗", 2)[0][0] == "b"  # the title is indexed with the chunk
    assert build_retriever(RetrievalConfig(kind="bm25", index_title=0), chunks).retrieve("宋朝", 1) == []
    assert indexed_texts(chunks, 2) == ["猫", "宋朝 宋朝 狗"]
    with pytest.raises(ValueError, match="needs an embedder"):
        build_retriever(RetrievalConfig(kind="dense"), chunks[:1])
    with pytest.raises(DataError, match="not a saved retriever"):
        load_retriever(tmp_path)


def test_retrieval_metrics_hand_computed():
    ranked = [["a", "b", "c"], ["x", "y", "g"], ["x", "y", "z"], ["g1", "n", "g2"]]
    gold = [["a"], ["g"], ["g"], ["g1", "g2"]]
    assert hit_at(ranked[1], gold[1], 1) == 0.0 and hit_at(ranked[1], gold[1], 3) == 1.0
    assert reciprocal_rank(ranked[1], gold[1]) == pytest.approx(1 / 3)
    assert ndcg_at(ranked[1], gold[1]) == pytest.approx(1 / math.log2(4))
    # two gold ids at ranks 1 and 3: (1 + 1/log2 4) / (1 + 1/log2 3)
    assert ndcg_at(ranked[3], gold[3]) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    m = retrieval_metrics(ranked, gold, ks=(1, 3, 5), cutoff=10)
    assert m["hit@1"] == pytest.approx(2 / 4)
    assert m["hit@3"] == pytest.approx(3 / 4)
    assert m["hit@5"] == pytest.approx(3 / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5 + 0 + 1.5 / (1 + 1 / math.log2(3))) / 4)
    assert m["queries"] == 4
    # The cutoff limits MRR: a hit at rank 3 does not count at cutoff 2.
    assert retrieval_metrics([["x", "y", "g"]], [["g"]], cutoff=2)["mrr@2"] == 0.0
    with pytest.raises(ValueError):
        retrieval_metrics([["a"]], [])
