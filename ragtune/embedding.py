"""Contrastive fine-tune of the embedder on FlagEmbedding-format triples {query, pos[], neg[], prompt},
with sentence-transformers' trainer (FlagEmbedding 1.4.2 does not import beside transformers 5),
and the retrieval evaluation of BM25 and dense retrievers over the whole knowledge base.

The loss is (Cached)MultipleNegativesRankingLoss: for each query, its positive against the other
queries' positives and every hard negative in the batch (in-batch negatives) and its own hard
negatives, softmax at `scale = 1 / temperature` — FlagEmbedding's objective with group size
`1 + negatives`.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ragtune.config import Config
from ragtune.metrics import retrieval_metrics
from ragtune.records import ReadingQuestion, Triple

# CJK ideographs (unified, extension A, compatibility): the characters an English vocabulary lacks.
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


# --------------------------------------------------------------------------- configuration


class RetrievalEvalSettings(Config):
    """How embed_ft scores retrievers on the held-out questions."""

    max_queries: int | None = Field(None, gt=0, description="retrieval_eval questions scored (seeded subset); null = all")
    max_chunks: int | None = Field(None, gt=0, description="KB chunks searched (gold chunks always kept); null = the whole KB")
    cutoff: int = Field(10, ge=1, description="MRR@cutoff and nDCG@cutoff")
    ks: list[int] = Field([1, 3, 5], min_length=1, description="hit@k for each k")


class EmbedFtConfig(Config):
    """`embed_ft` (conf/embed_ft/default.yaml): the contrastive fine-tune of the embedder."""

    launcher: Literal["python", "accelerate"] = Field(
        "python", description="python, or accelerate: the stage re-runs itself under `accelerate launch`")
    accelerate_config: str = Field("conf/accelerate/multi_gpu.yaml", description="accelerate's config file (launcher=accelerate)")
    lr: float = Field(2.0e-5, gt=0, description="learning rate")
    max_samples: int | None = Field(None, gt=0, description="training triples used (a seeded subset); null = all")
    negatives: int = Field(7, ge=0, description="hard negatives per query (group size 1 + negatives), plus in-batch negatives")
    batch_size: int = Field(32, ge=1, description="queries per batch (in-batch negatives grow with it)")
    cached: bool = Field(False, description="CachedMultipleNegativesRankingLoss: big batches at the memory of mini_batch_size")
    mini_batch_size: int = Field(16, ge=1, description="cached loss: texts encoded at once")
    epochs: float = Field(1, gt=0, description="passes over the triples")
    max_steps: int | None = Field(None, gt=0, description="overrides epochs when set")
    temperature: float = Field(0.05, gt=0, description="softmax temperature; the loss scale is 1 / temperature")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the steps spent warming up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_seq_length: int = Field(256, ge=8, description="tokens for queries and passages, in training and evaluation")
    extend_vocab: bool = Field(False, description="first add the CJK characters the tokenizer maps to [UNK] as tokens")
    vocab_min_count: int = Field(2, ge=1, description="extend_vocab: characters seen at least this often")
    logging_steps: int = Field(10, ge=1, description="steps between logged losses")
    log_model: bool = Field(False, description="also log models/embed_ft to MLflow (about 90 MB)")
    eval: RetrievalEvalSettings = Field(RetrievalEvalSettings(), description="the retrieval scoring")


# --------------------------------------------------------------------------- data


def triples_dataset(rows: Sequence[Triple], negatives: int, seed: int = 0):
    """A datasets.Dataset (anchor, positive, negative_1..n) for MultipleNegativesRankingLoss: the
    record's prompt prepended to the query, one positive and `negatives` hard negatives drawn with a
    seed (rows with fewer negatives are topped up from other rows' negatives so columns stay full)."""
    from datasets import Dataset

    rng = random.Random(seed)
    pool = [n for r in rows for n in r.neg] or [p for r in rows for p in r.pos]
    columns: dict[str, list[str]] = {"anchor": [], "positive": []}
    for i in range(negatives):
        columns[f"negative_{i + 1}"] = []
    for row in rows:
        positive = rng.choice(row.pos)
        negs = rng.sample(row.neg, min(negatives, len(row.neg)))
        while len(negs) < negatives:
            extra = rng.choice(pool)
            if extra not in row.pos:
                negs.append(extra)
        columns["anchor"].append(row.prompt + row.query)
        columns["positive"].append(positive)
        for i, text in enumerate(negs):
            columns[f"negative_{i + 1}"].append(text)
    return Dataset.from_dict(columns)


# --------------------------------------------------------------------------- vocabulary


def unknown_fraction(model, texts: Sequence[str]) -> float:
    """Share of the tokenizer's tokens over `texts` that are [UNK]."""
    tokenizer = model.tokenizer
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    return sum(x.count(tokenizer.unk_token_id) for x in ids) / total if total else 0.0


def extend_cjk_vocabulary(model, texts: Sequence[str], min_count: int = 2) -> int:
    """Add every CJK character seen at least `min_count` times in `texts` that the tokenizer maps to
    [UNK] as a token of its own, and grow the word embeddings to match. New rows start as the [UNK]
    embedding, so the extended model encodes exactly like the base one until training moves them.
    Returns the number of tokens added."""
    import torch

    tokenizer = model.tokenizer
    counts: dict[str, int] = {}
    for text in texts:
        for char in _CJK.findall(text):
            counts[char] = counts.get(char, 0) + 1
    vocab = tokenizer.get_vocab()
    missing = sorted(c for c, n in counts.items() if n >= min_count and c not in vocab)
    if not missing:
        return 0
    added = tokenizer.add_tokens(missing)
    encoder = model[0].auto_model
    unk_row = encoder.get_input_embeddings().weight[tokenizer.unk_token_id].detach().clone()
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        encoder.get_input_embeddings().weight[-added:] = unk_row
    return added


# --------------------------------------------------------------------------- training


def fine_tune(model, rows: Sequence[Triple], cfg: EmbedFtConfig, *, work_dir: str | Path,
              seed: int, device: str = "cpu", callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train `model` (a SentenceTransformer, changed in place) on the triples; returns a summary."""
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    model.max_seq_length = cfg.max_seq_length
    dataset = triples_dataset(rows, cfg.negatives, seed)
    scale = 1.0 / cfg.temperature
    if cfg.cached:
        loss = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=cfg.mini_batch_size)
    else:
        loss = MultipleNegativesRankingLoss(model, scale=scale)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        weight_decay=cfg.weight_decay,
        # Two copies of one text in a batch would be scored as each other's negatives.
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=list(callbacks)
    )
    start = time.time()
    result = trainer.train()
    return {
        "train_loss": float(result.training_loss),
        "steps": int(result.global_step),
        "examples": len(dataset),
        "seconds": round(time.time() - start, 1),
        "log_history": trainer.state.log_history,
    }


# --------------------------------------------------------------------------- evaluation


def evaluate(retriever, eval_rows: Sequence[ReadingQuestion], cutoff: int = 10,
             ks: Sequence[int] = (1, 3, 5)) -> dict[str, float]:
    """retrieval_metrics of `retriever` on held-out questions (relevant: their gold_chunk_ids), plus queries/s."""
    start = time.time()
    hits = retriever.retrieve_many([r.question for r in eval_rows], cutoff)
    seconds = max(time.time() - start, 1e-9)
    ranked = [[chunk_id for chunk_id, _ in h] for h in hits]
    metrics = retrieval_metrics(ranked, [list(r.gold_chunk_ids) for r in eval_rows], tuple(ks), cutoff)
    metrics["queries_per_s"] = round(len(eval_rows) / seconds, 1)
    return metrics
