"""Datasets: parse CMRC2018 and GSM8K, split by article, chunk the knowledge base, mine negatives; the
building blocks ragtune.custom_data uses for your own documents and questions."""

from __future__ import annotations

import os
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from ragtune.config import Config
from ragtune.io import DataError, iter_jsonl, read_json
from ragtune.records import KbChunk, MathsQuestion, ReadingQuestion, Triple
from ragtune.sources import DataConfig

# --------------------------------------------------------------------------- configuration


class SplitConfig(Config):
    """`split` (conf/split/default.yaml): knowledge-base chunking, embedding triples, the leak check."""

    chunk_size: int = Field(200, gt=0, description="characters per knowledge-base chunk (whole sentences packed)")
    chunk_overlap: int = Field(50, ge=0, description="characters of sentences repeated from the previous chunk")
    hard_negatives: int = Field(7, ge=0, description="BM25-mined negatives per embedding triple")
    bm25_candidates: int = Field(30, ge=1, description="negatives are sampled from this many top BM25 hits")
    leak_min_question_chars: int = Field(
        8, ge=1, description="shorter normalised questions are not evidence of a train/eval leak")

    @model_validator(mode="after")
    def _overlap_below_size(self) -> SplitConfig:
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap ({self.chunk_overlap}) must be below chunk_size ({self.chunk_size})")
        return self


# --------------------------------------------------------------------------- CMRC2018


@dataclass
class Question:
    id: str
    question: str
    answers: list[tuple[str, int]]  # (text, answer_start), each verified against the context


@dataclass
class Article:
    id: str
    title: str
    context: str
    questions: list[Question] = field(default_factory=list)


@dataclass
class Report:
    """Every repair and drop made to noisy input, so none is silent."""

    repairs: list[dict[str, Any]] = field(default_factory=list)
    drops: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind, items in (("repaired", self.repairs), ("dropped", self.drops)):
            for item in items:
                key = f"{kind}_{item['reason']}"
                out[key] = out.get(key, 0) + 1
        return out


def _nearest(context: str, text: str, start: int) -> int:
    positions = [m.start() for m in re.finditer(re.escape(text), context)]
    return min(positions, key=lambda p: (abs(p - start), p)) if positions else -1


def check_answer(context: str, text: Any, start: Any, where: str, report: Report) -> tuple[str, int] | None:
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field 'text' has the wrong type ({type(text).__name__})")
    if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
        raise DataError(f"{where}: field 'answer_start' has the wrong type ({type(start).__name__})")
    if not text or not text.strip():
        report.drops.append({"where": where, "reason": "empty_answer"})
        return None
    if isinstance(start, int) and context[start : start + len(text)] == text:
        return text, start
    found = _nearest(context, text, start if isinstance(start, int) else 0)
    if found < 0:
        report.drops.append({"where": where, "reason": "answer_not_in_context", "text": text[:80]})
        return None
    report.repairs.append({"where": where, "reason": "answer_start_relocated", "from": start, "to": found})
    return text, found


def squad_answers(qa: Any, context: str, where: str, report: Report) -> list[tuple[str, int]]:
    """A SQuAD question's answers ({text, answer_start} each), checked against `context` and deduplicated;
    a bad answer, or a question left without one, is dropped into `report`."""
    answers: list[tuple[str, int]] = []
    for ans_idx, ans in enumerate(typed_field(qa, "answers", list, where)):
        a_where = f"{where} answer {ans_idx}"
        if not isinstance(ans, dict) or "text" not in ans:
            raise DataError(f"{a_where}: missing field 'text'")
        checked = check_answer(context, ans["text"], ans.get("answer_start"), a_where, report)
        if checked and checked not in answers:
            answers.append(checked)
    if not answers:
        report.drops.append({"where": where, "reason": "question_without_answer"})
    return answers


def load_cmrc(path: str | os.PathLike, report: Report, seen_ids: dict[str, str] | None = None) -> list[Article]:
    """Parse a SQuAD-style CMRC2018 file, validating every record; bad structure raises DataError.
    `seen_ids` (paragraph id -> where) carries the ids of files already loaded: ids key the KB's
    chunks, so a repeated one would silently mix two passages."""
    path = Path(path)
    seen_ids = {} if seen_ids is None else seen_ids
    root = read_json(path)
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DataError(f"{path}: expected a JSON object with a 'data' list (SQuAD format)")
    drops_before = len(report.drops)
    articles = []
    for a_idx, entry in enumerate(root["data"]):
        for p_idx, para in enumerate(typed_field(entry, "paragraphs", list, f"{path}: data[{a_idx}]")):
            where = f"{path}: data[{a_idx}].paragraphs[{p_idx}]"
            context = typed_field(para, "context", str, where)
            if not context.strip():
                raise DataError(f"{where}: empty 'context'")
            article_id = str(typed_field(para, "id", (str, int), where))
            if article_id in seen_ids:
                raise DataError(f"{where}: paragraph id '{article_id}' repeats {seen_ids[article_id]}")
            seen_ids[article_id] = where
            article = Article(id=article_id, title=str(entry.get("title", "")), context=context)
            for q_idx, qa in enumerate(typed_field(para, "qas", list, where)):
                q_where = f"{where}.qas[{q_idx}]"
                qid = str(typed_field(qa, "id", (str, int), q_where))
                q_where = f"{path}: question {qid}"
                question = typed_field(qa, "question", str, q_where)
                if not question.strip():
                    report.drops.append({"where": q_where, "reason": "empty_question"})
                    continue
                if not (answers := squad_answers(qa, context, q_where, report)):
                    continue
                article.questions.append(Question(id=qid, question=question.strip(), answers=answers))
            articles.append(article)
    if not any(a.questions for a in articles):
        dropped = len(report.drops) - drops_before
        raise DataError(f"{path}: no usable question ({len(articles)} paragraphs, {dropped} questions or answers dropped)")
    return articles


def typed_field(record: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        raise DataError(f"{where}: missing field '{name}'")
    if not isinstance(record[name], kind):
        raise DataError(f"{where}: field '{name}' has the wrong type ({type(record[name]).__name__})")
    return record[name]


# --------------------------------------------------------------------------- GSM8K

_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
GSM8K_FINAL = re.compile(r"-?\d[\d,]*(\.\d+)?")  # every final answer of GSM8K's train and test


def load_gsm8k(path: str | os.PathLike, split_name: str, blank_lines: list[int] | None = None) -> list[dict[str, str]]:
    """GSM8K JSONL -> {id, question, rationale, answer}; the answer is the text after '####'.

    Whitespace-only lines hold no record and are skipped; the line number of each is appended to
    `blank_lines` when given, so the caller can report them (split's stats.json does)."""
    rows = []
    for lineno, rec in iter_jsonl(path, blank_lines):
        question, answer = (typed_field(rec, name, str, f"{path}:{lineno}") for name in ("question", "answer"))
        if not question.strip():
            raise DataError(f"{path}:{lineno}: empty 'question'")
        rationale, marker, final = answer.rpartition("####")
        if not marker or not GSM8K_FINAL.fullmatch(final.strip()):
            raise DataError(f"{path}:{lineno}: answer has no '#### <number>' line (got {final.strip()[:40]!r})")
        rows.append(
            {
                "id": f"gsm8k-{split_name}-{len(rows)}",
                "question": question.strip(),
                "rationale": rationale.strip(),
                "answer": final.strip(),
            }
        )
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def strip_calculator_notes(rationale: str) -> str:
    """'48/2 = <<48/2=24>>24' -> '48/2 = 24'."""
    return _CALCULATOR_NOTE.sub("", rationale)


# --------------------------------------------------------------------------- splitting and leaks


def normalize_text(text: str) -> str:
    """NFKC, lower case, no spaces or punctuation: what 'the same text' means for leak checks."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def find_leaks(
    train_questions: Iterable[str],
    eval_questions: Iterable[tuple[str, str]],
    train_contexts: Iterable[str] = (),
    eval_contexts: Iterable[tuple[str, str]] = (),
    min_question_chars: int = 8,
) -> list[str]:
    """Eval items whose question (or context) text also appears in train, after normalisation.

    Questions match when equal (short generic questions below `min_question_chars` are not
    evidence of a leak); an eval context leaks when it appears inside any train context.
    """
    seen_questions = {normalize_text(q) for q in train_questions}
    joined_contexts = "\x00".join(normalize_text(c) for c in train_contexts)
    leaks = []
    for item_id, question in eval_questions:
        norm = normalize_text(question)
        if len(norm) >= min_question_chars and norm in seen_questions:
            leaks.append(f"{item_id}: question also in train: {question[:60]!r}")
    for item_id, context in eval_contexts:
        norm = normalize_text(context)
        if norm and norm in joined_contexts:
            leaks.append(f"{item_id}: context also in train: {context[:60]!r}")
    return leaks


def seeded_sample(items: Sequence[Any], n: int | None, seed: int) -> list[Any]:
    """A seeded random sample of `n` items (all of them when n is None or too large), order kept."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def split_articles(articles: Sequence[Article], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out whole articles (never single questions) for evaluation."""
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(articles) * eval_fraction)
    held = set(order[:n_eval])
    return [a for i, a in enumerate(articles) if i not in held], [a for i, a in enumerate(articles) if i in held]


# --------------------------------------------------------------------------- chunking

_SENTENCE_END = re.compile(r"[。！？；!?;\n]+")
# Your own documents (data=custom) may be English: a full stop followed by a space ends a sentence too
# (CMRC keeps the pattern above, so its chunks and their ids stay as they were).
SENTENCE_END_ANY = re.compile(r"[。！？；!?;\n]+|\.(?:\s+|$)")


@dataclass
class Chunk:
    chunk_id: str
    article_id: str
    title: str
    start: int
    end: int
    text: str


def chunk_article(article: Article, size: int, overlap: int, sentence_end: re.Pattern = _SENTENCE_END) -> list[Chunk]:
    """Pack whole sentences into chunks of at most `size` characters, each starting `overlap`
    characters' worth of sentences before the previous one ended. Ids are `<article>-<n>`:
    stable across runs for the same text and settings. A sentence longer than `size` is cut.
    `sentence_end` matches what ends a sentence (SENTENCE_END_ANY adds English full stops)."""
    if size <= 0 or not 0 <= overlap < size:
        raise ValueError(f"chunking needs size > 0 and 0 <= overlap < size, got {size}, {overlap}")
    text = article.context
    bounds, pos = [], 0  # sentence (start, end) spans, long ones cut at `size`
    for match in sentence_end.finditer(text):
        bounds.append((pos, match.end()))
        pos = match.end()
    if pos < len(text):
        bounds.append((pos, len(text)))
    spans = [(s, min(s + size, e)) for b0, e in bounds for s in range(b0, e, size)]
    chunks, i = [], 0
    while i < len(spans):
        start, j = spans[i][0], i
        while j + 1 < len(spans) and spans[j + 1][1] - start <= size:
            j += 1
        end = spans[j][1]
        chunks.append((start, end))
        if j + 1 >= len(spans):
            break
        # next chunk starts at the earliest sentence within `overlap` of this chunk's end
        nxt, following_end = j + 1, spans[j + 1][1]
        while nxt - 1 > i and end - spans[nxt - 1][0] <= overlap and following_end - spans[nxt - 1][0] <= size:
            nxt -= 1
        i = nxt
    return [
        Chunk(f"{article.id}-{n}", article.id, article.title, s, e, text[s:e]) for n, (s, e) in enumerate(chunks)
    ]


def gold_chunks(chunks: Sequence[Chunk], start: int, length: int) -> list[Chunk]:
    """Chunks that hold the whole answer span; if none does, the one overlapping it most."""
    end = start + length
    holding = [c for c in chunks if c.start <= start and end <= c.end]
    if holding:
        return holding
    best = max(chunks, key=lambda c: min(end, c.end) - max(start, c.start))
    return [best]


def answer_window(context: str, start: int, length: int, size: int) -> str:
    """A window of at least `size` characters of `context` around (and always holding) the answer."""
    pad = max(0, size - length) // 2
    lo = max(0, start - pad)
    hi = min(len(context), max(start + length, lo + size))
    return context[max(0, min(lo, hi - size)) : hi]


# --------------------------------------------------------------------------- records the stages exchange


def build_cmrc_records(
    train: Sequence[Article], evaluation: Sequence[Article], size: int, overlap: int
) -> tuple[list[Chunk], list[ReadingQuestion], list[ReadingQuestion], int]:
    """KB chunks for every article, and a ReadingQuestion per train and eval question; also how many
    contexts had to be a window of the article because no single chunk holds the answer."""
    chunks_of = {article.id: chunk_article(article, size, overlap) for article in [*train, *evaluation]}
    windows = 0

    def record(article: Article, q: Question) -> ReadingQuestion:
        nonlocal windows
        chunks = chunks_of[article.id]
        text, start = q.answers[0]
        first = gold_chunks(chunks, start, len(text))[0]
        context = first.text if text in first.text else answer_window(article.context, start, len(text), size)
        windows += text not in first.text
        gold_ids = sorted({c.chunk_id for t, s in q.answers for c in gold_chunks(chunks, s, len(t))})
        return ReadingQuestion(id=q.id, question=q.question, answers=[t for t, _ in q.answers],
                               article_id=article.id, gold_chunk_ids=gold_ids, context=context)

    train_rows = [record(a, q) for a in train for q in a.questions]
    eval_rows = [record(a, q) for a in evaluation for q in a.questions]
    kb = [c for article in [*train, *evaluation] for c in chunks_of[article.id]]
    return kb, train_rows, eval_rows, windows


def mine_hard_negatives(
    questions: Sequence[ReadingQuestion],
    kb: Sequence[Chunk],
    *,
    n_negatives: int,
    n_candidates: int,
    prompt: str,
    seed: int,
    stopwords: Iterable[str] = (),
) -> list[Triple]:
    """FlagEmbedding triples {query, pos, neg, prompt}: BM25's top candidates among the chunks of
    the questions' (train) articles, minus the positives and any chunk holding a gold answer,
    sampled with a seed."""
    from ragtune.retrieval import BM25Index

    articles = {q.article_id for q in questions}
    pool = [c for c in kb if c.article_id in articles]
    by_id = {c.chunk_id: c for c in pool}
    index = BM25Index([c.chunk_id for c in pool], [c.text for c in pool], stopwords)
    rng = random.Random(seed)
    hits_all = index.retrieve_many([q.question for q in questions], n_candidates + 8)
    triples = []
    for q, hits in zip(questions, hits_all, strict=True):
        candidates = [
            cid for cid, _ in hits
            if cid not in q.gold_chunk_ids and not any(a in by_id[cid].text for a in q.answers)
        ][:n_candidates]
        negatives = rng.sample(candidates, min(n_negatives, len(candidates)))
        triples.append(Triple(query=q.question, pos=[by_id[g].text for g in q.gold_chunk_ids if g in by_id],
                              neg=[by_id[cid].text for cid in negatives], prompt=prompt))
    return triples


# --------------------------------------------------------------------------- the split stage's whole job


def prepare(
    raw_dir: Path,
    *,
    data: DataConfig,
    split: SplitConfig,
    stopwords: Sequence[str] = (),
    query_prompt: str = "",
    seed: int,
):
    """Everything split writes for CMRC2018 + GSM8K, as {file name: rows}, plus its stats (your own data:
    ragtune.custom_data.prepare_custom). Raises DataError on bad input or on a train/eval leak, before
    anything is written."""
    report, seen_ids = Report(), {}
    train = [a for f in data.cmrc_train for a in load_cmrc(raw_dir / f, report, seen_ids)]
    if data.cmrc_eval:
        evaluation = [a for f in data.cmrc_eval for a in load_cmrc(raw_dir / f, report, seen_ids)]
    else:
        train, evaluation = split_articles(train, data.cmrc_eval_fraction, seed)
    gsm_blank: dict[str, list[int]] = {"train": [], "eval": []}  # line numbers of blank lines skipped
    gsm_train = load_gsm8k(raw_dir / data.gsm8k_train, "train", gsm_blank["train"])
    gsm_eval = load_gsm8k(raw_dir / data.gsm8k_eval, "test", gsm_blank["eval"])

    min_chars = split.leak_min_question_chars
    leaks = find_leaks(
        [q.question for a in train for q in a.questions],
        [(q.id, q.question) for a in evaluation for q in a.questions],
        [a.context for a in train],
        [(a.id, a.context) for a in evaluation],
        min_chars,
    )
    leaks += find_leaks(
        [r["question"] for r in gsm_train], [(r["id"], r["question"]) for r in gsm_eval], min_question_chars=min_chars
    )
    if leaks:
        shown = "\n  ".join(leaks[:10])
        raise DataError(f"{len(leaks)} eval items leak into train (first {min(10, len(leaks))}):\n  {shown}")

    kb, train_rows, eval_rows, windows = build_cmrc_records(train, evaluation, split.chunk_size, split.chunk_overlap)
    triples = mine_hard_negatives(train_rows, kb, n_negatives=split.hard_negatives, n_candidates=split.bm25_candidates,
                                  prompt=query_prompt, seed=seed, stopwords=stopwords)
    outputs = {
        "kb.jsonl": [KbChunk(chunk_id=c.chunk_id, article_id=c.article_id, title=c.title, text=c.text) for c in kb],
        "cmrc_train.jsonl": train_rows,
        "cmrc_eval.jsonl": eval_rows,
        "gsm8k_train.jsonl": [MathsQuestion(**r) for r in gsm_train],
        "gsm8k_eval.jsonl": [MathsQuestion(**{k: r[k] for k in ("id", "question", "answer")}) for r in gsm_eval],
        "embed_train.jsonl": triples,
    }
    stats = {
        "cmrc": {
            "train_articles": len(train),
            "eval_articles": len(evaluation),
            "train_questions": len(train_rows),
            "eval_questions": len(eval_rows),
            "kb_chunks": len(kb),
            "contexts_from_answer_window": windows,
            **report.counts(),
        },
        "gsm8k": {
            "train": len(gsm_train),
            "eval": len(gsm_eval),
            # whitespace-only lines skipped in the JSONL files (no record on them), and where (the first 20 per file)
            "blank_lines_skipped": sum(len(lines) for lines in gsm_blank.values()),
            "blank_lines": {name: lines[:20] for name, lines in gsm_blank.items()},
        },
        "embed_triples": len(triples),
        "embed_triples_without_negatives": sum(1 for t in triples if not t.neg),
        "leak_check": {"passed": True, "leaks": 0},
        "repairs": report.repairs,
        "drops": report.drops,
    }
    return outputs, stats
