"""embed_ft: FlagEmbedding triples in, a few real training steps, the saved model reloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ragtune.embedding import (
    EmbedFtConfig,
    evaluate,
    extend_cjk_vocabulary,
    fine_tune,
    triples_dataset,
    unknown_fraction,
)
from ragtune.io import DataError
from ragtune.records import ReadingQuestion, Triple, read_records, write_records
from ragtune.retrieval import DenseIndex, load_embedder

ROOT = Path(__file__).resolve().parents[1]

TRIPLES = [
    Triple(query="猫喜欢吃什么？", pos=["猫喜欢吃鱼。"], neg=["狗喜欢啃骨头。", "长城很长。"], prompt=""),
    Triple(query="宋朝的首都在哪里？", pos=["宋朝的首都是汴京。"], neg=["北京是中国的首都。"], prompt=""),
    Triple(query="长城有多长？", pos=["长城很长，有两万多公里。"], neg=["猫喜欢吃鱼。"], prompt=""),
    Triple(query="谁写了红楼梦？", pos=["红楼梦的作者是曹雪芹。"], neg=["西游记的作者是吴承恩。"], prompt=""),
]
TRAIN_CFG = EmbedFtConfig(negatives=1, batch_size=4, epochs=1, max_steps=3, lr=1e-3, warmup_ratio=0.0, temperature=0.05,
                          cached=False, mini_batch_size=2, max_seq_length=32, logging_steps=1)


@pytest.fixture(scope="module")
def embedder(embedder_dir) -> Path:
    """models/base/embedder as fetch builds it (conftest: from its package when not fetched)."""
    return embedder_dir


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_triples_are_validated_and_shaped(tmp_path):
    write_records(tmp_path / "t.jsonl", TRIPLES)
    rows = read_records(tmp_path / "t.jsonl", Triple)[:3]
    dataset = triples_dataset(rows, negatives=2, seed=1)
    assert dataset.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    for row in dataset:  # topped-up negatives never repeat the row's positive
        assert row["positive"] not in (row["negative_1"], row["negative_2"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [TRIPLES[0].model_dump(), {"query": "猫", "pos": [], "neg": [], "prompt": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'pos'"):
        read_records(bad, Triple)


def test_vocabulary_extension_starts_equal_to_the_base(embedder):
    model = load_embedder(embedder)
    texts = [t for r in TRIPLES for t in [r.query, *r.pos, *r.neg]]
    before = model.encode(texts, normalize_embeddings=True)
    unknown_before = unknown_fraction(model, texts)
    added = extend_cjk_vocabulary(model, texts, min_count=1)
    assert added > 0
    assert unknown_fraction(model, texts) < unknown_before
    # New rows are the [UNK] embedding: the same vectors until training moves them.
    np.testing.assert_allclose(model.encode(texts, normalize_embeddings=True), before, atol=1e-5)


def test_a_few_steps_change_the_embeddings_and_the_model_reloads(tmp_path, embedder):
    model = load_embedder(embedder)
    extend_cjk_vocabulary(model, [t for r in TRIPLES for t in [r.query, *r.pos]], min_count=1)
    probe = ["猫喜欢吃鱼。", "宋朝的首都在哪里？"]
    before = model.encode(probe, normalize_embeddings=True)
    summary = fine_tune(model, TRIPLES, TRAIN_CFG, work_dir=tmp_path / "work", seed=0)
    assert summary["steps"] == 3 and np.isfinite(summary["train_loss"])
    after = model.encode(probe, normalize_embeddings=True)
    assert np.abs(after - before).max() > 1e-3
    model.save(str(tmp_path / "tuned"))
    reloaded = load_embedder(tmp_path / "tuned")
    np.testing.assert_allclose(reloaded.encode(probe, normalize_embeddings=True), after, atol=1e-5)
    index = DenseIndex(["c0", "c1"], ["猫喜欢吃鱼。", "宋朝的首都是汴京。"], reloaded)
    question = ReadingQuestion(id="q", question="猫喜欢吃什么？", answers=["鱼"], article_id="a", gold_chunk_ids=["c0"],
                               context="猫喜欢吃鱼。")
    metrics = evaluate(index, [question], cutoff=2, ks=(1,))
    assert set(metrics) >= {"hit@1", "mrr@2", "ndcg@2", "queries", "queries_per_s"}
