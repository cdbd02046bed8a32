"""The records stages exchange through files: each file's schema, and the one reader and writer of it.

    data/prepared/kb.jsonl              KbChunk            the knowledge base, chunked by split
    data/prepared/cmrc_train.jsonl      ReadingQuestion    train questions (sft builds its contexts from them)
    data/prepared/cmrc_eval.jsonl       ReadingQuestion    held-out questions (eval, embed_ft, router)
    data/prepared/gsm8k_train.jsonl     MathsQuestion      with GSM8K's rationale (distill, router)
    data/prepared/gsm8k_eval.jsonl      MathsQuestion      held out (eval, router)
    data/prepared/embed_train.jsonl     Triple             FlagEmbedding's {query, pos, neg, prompt}
    data/distill/distilled_train.json   AlpacaRecord       a JSON list (LLaMA-Factory's Alpaca format)

A reading question's `gold_chunk_ids` are every chunk that holds a gold answer at its annotated place:
the one definition of a relevant chunk that split, embed_ft and eval share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ragtune.io import DataError, atomic_path, iter_jsonl, read_json

PREPARED = Path("data/prepared")
KB = PREPARED / "kb.jsonl"
CMRC_TRAIN = PREPARED / "cmrc_train.jsonl"
CMRC_EVAL = PREPARED / "cmrc_eval.jsonl"
GSM8K_TRAIN = PREPARED / "gsm8k_train.jsonl"
GSM8K_EVAL = PREPARED / "gsm8k_eval.jsonl"
EMBED_TRAIN = PREPARED / "embed_train.jsonl"
DISTILLED = Path("data/distill/distilled_train.json")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NonEmpty = Field(min_length=1)


class KbChunk(Record):
    chunk_id: str = Field(min_length=1, description="<article>-<n>, stable for the same text and chunking")
    article_id: str = Field(min_length=1, description="the document the chunk was cut from")
    title: str = Field(description="the document's title ('' when it has none)")
    text: str = Field(min_length=1, description="whole sentences, at most split.chunk_size characters")


class ReadingQuestion(Record):
    id: str = Field(min_length=1, description="the dataset's question id")
    question: str = Field(min_length=1, description="the question text")
    answers: list[str] = Field(min_length=1, description="gold answers, each a span of the article")
    article_id: str = Field(min_length=1, description="the article holding the answers")
    gold_chunk_ids: list[str] = Field(min_length=1, description="every chunk holding a gold answer")
    context: str = Field(min_length=1, description="the chunk holding the first answer (the gold-context diagnostic)")


class MathsQuestion(Record):
    id: str = Field(min_length=1, description="gsm8k-<split>-<n>")
    question: str = Field(min_length=1, description="the word problem")
    answer: str = Field(min_length=1, description="the final answer (GSM8K's text after ####)")
    rationale: str = Field("", description="GSM8K's worked solution (train only)")


class Triple(Record):
    query: str = Field(min_length=1, description="a train question")
    pos: list[str] = Field(min_length=1, description="chunks holding its answer")
    neg: list[str] = Field(description="BM25-mined train chunks that do not hold it")
    prompt: str = Field(description="the embedder's query instruction")


class AlpacaRecord(Record):
    instruction: str = Field(min_length=1, description="the user turn")
    input: str = Field("", description="appended to the instruction when not empty")
    output: str = Field(min_length=1, description="the assistant turn to learn")


R = TypeVar("R", bound=Record)


def _problem(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown field '{where}'"
    if first["type"] == "missing":
        return f"missing field '{where}'"
    return f"field '{where}': {first['msg']}"


def read_records(path: str | os.PathLike, cls: type[R]) -> list[R]:
    """Every line of a JSONL file as `cls`; a bad line raises DataError naming file and line."""
    rows = []
    for lineno, raw in iter_jsonl(path):
        try:
            rows.append(cls.model_validate(raw))
        except ValidationError as err:
            raise DataError(f"{path}:{lineno}: {_problem(err)}") from None
    return rows


def write_records(path: str | os.PathLike, rows: Iterable[Record]) -> int:
    """JSONL, one record per line, written atomically; returns the count."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row.model_dump(), ensure_ascii=False) + "\n")
            count += 1
    return count


def read_kb(path: str | os.PathLike = KB) -> list[KbChunk]:
    """The knowledge base; empty, or a chunk id used twice, is an error naming the line."""
    chunks, seen = [], set()
    for lineno, raw in iter_jsonl(path):
        try:
            chunk = KbChunk.model_validate(raw)
        except ValidationError as err:
            raise DataError(f"{path}:{lineno}: {_problem(err)}") from None
        if chunk.chunk_id in seen:
            raise DataError(f"{path}:{lineno}: chunk_id '{chunk.chunk_id}' repeated")
        seen.add(chunk.chunk_id)
        chunks.append(chunk)
    if not chunks:
        raise DataError(f"{path}: no chunks")
    return chunks


def read_alpaca(path: str | os.PathLike, required: bool = True) -> list[AlpacaRecord]:
    """An Alpaca JSON list; a missing optional file is an empty list."""
    path = Path(path)
    if not path.exists() and not required:
        return []
    records = read_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of Alpaca records")
    out = []
    for i, raw in enumerate(records):
        try:
            record = AlpacaRecord.model_validate(raw)
        except ValidationError as err:
            raise DataError(f"{path}: record {i}: {_problem(err)}") from None
        if not record.output.strip():
            raise DataError(f"{path}: record {i}: empty 'output'")
        out.append(record)
    return out


def write_alpaca(path: str | os.PathLike, rows: Sequence[AlpacaRecord]) -> None:
    from ragtune.io import write_json

    write_json(path, [r.model_dump() for r in rows], indent=1)
