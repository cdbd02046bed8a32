"""Your own documents and questions (data=custom): what split makes of the files fetch copied to
data/raw/custom/ (ragtune.sources.CustomDataConfig) — the same data/prepared files as CMRC2018 + GSM8K.

Documents (.txt, .md, .html, .pdf with pypdf installed, or a JSONL of {id, title, text}) become KB chunks
(ragtune.data.chunk_article, ids `<doc id>-<n>`); a reading question (SQuAD JSON, v2's unanswerable ones
kept out and reported, or JSONL {id, question, answers[], context?}) is placed in one document, by its
context or, without one, by its answer text; maths questions (GSM8K JSONL or {id, question, answer})
keep GSM8K's rationale ('' in the simple format). Every malformed record names its file and line or id;
every drop is counted in stats.json.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragtune.data import (
    GSM8K_FINAL,
    SENTENCE_END_ANY,
    Article,
    Chunk,
    Report,
    SplitConfig,
    answer_window,
    check_answer,
    chunk_article,
    find_leaks,
    gold_chunks,
    mine_hard_negatives,
    squad_answers,
    typed_field,
)
from ragtune.io import DataError, iter_jsonl, read_json
from ragtune.records import KbChunk, MathsQuestion, ReadingQuestion
from ragtune.sources import CustomDataConfig

DOCUMENT_TYPES = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
                  ".pdf": "pdf"}
ANSWER_PLACEMENT_RULE = (
    "a question without a context goes to the one document holding any of its answers verbatim; its gold chunks "
    "are every chunk of that document holding one, its context the one sharing most words with the question; "
    "answers found in no document: dropped (answer_not_found); in several documents: dropped "
    "(answer_in_several_documents)")


def decode_document(data: bytes, path: str | os.PathLike) -> str:
    """UTF-8 text (a byte-order mark dropped, line ends made '\\n'); other bytes name the file's line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte offset {err.start} of the file)") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def split_title(text: str, kind: str) -> tuple[str, str]:
    """(title, text) of a .md file (a first line '# Title') or a .txt file (a first line followed by a
    blank line); a file without one has no title and all of it is text."""
    lines = text.strip().split("\n")
    first, rest = lines[0].strip(), "\n".join(lines[1:]).strip()
    if kind == "markdown" and first.startswith("# "):
        return first[2:].strip(), rest
    if kind == "text" and len(lines) > 2 and not lines[1].strip():
        return first, rest
    return "", text.strip()


_HTML_SKIP = {"script", "style", "noscript", "template", "svg"}
_HTML_BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
               "article", "header", "footer", "blockquote", "pre", "hr", "dd", "dt", "dl", "main", "nav", "aside",
               "figure", "figcaption", "caption", "td", "th"}


def html_text(html: str) -> tuple[str, str]:
    """(title, text) of an HTML page with the standard library's parser: <title> (else the first <h1>) and
    the visible text, one line per block element; scripts and styles dropped."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.parts: list[str] = []
            self.title: list[str] = []
            self.h1: list[str] = []
            self.skip, self.inside = 0, None

        def handle_starttag(self, tag, attrs):
            if tag in _HTML_SKIP:
                self.skip += 1
            elif tag == "title" or (tag == "h1" and not self.h1):
                self.inside = tag
            if tag in _HTML_BLOCK:
                self.parts.append("\n")

        def handle_endtag(self, tag):
            if tag in _HTML_SKIP:
                self.skip = max(0, self.skip - 1)
            elif tag == self.inside:
                self.inside = None
            if tag in _HTML_BLOCK:
                self.parts.append("\n")

        def handle_data(self, data):
            if self.skip:
                return
            if self.inside == "title":
                self.title.append(data)
                return
            if self.inside == "h1":
                self.h1.append(data)
            self.parts.append(data)

    parser = Text()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"\s+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    title = re.sub(r"\s+", " ", "".join(parser.title) or "".join(parser.h1)).strip()
    return title, "\n".join(line for line in lines if line)


def pdf_text(path: Path) -> tuple[str, str]:
    """(title, text) of a PDF through pypdf (its metadata title; pages' text, a blank line between pages).
    pypdf is optional: without it a .pdf is refused with what to do."""
    try:
        import pypdf
    except ImportError:
        raise DataError(f"{path}: a .pdf document needs the pypdf package, which is not installed "
                        "(`pip install pypdf`); or convert it to .txt") from None
    try:
        reader = pypdf.PdfReader(str(path))
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except Exception as err:  # pypdf raises many kinds on a damaged file
        raise DataError(f"{path}: not a readable PDF ({type(err).__name__}: {err})") from None
    text = "\n\n".join(p for p in pages if p).replace("\r\n", "\n")
    return str(title).strip(), text


def read_document_file(path: Path) -> tuple[str, str]:
    """(title, text) of one document file, by its extension."""
    kind = DOCUMENT_TYPES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported document type '{path.suffix or '(no extension)'}' (documents are "
                        f"{', '.join(sorted(DOCUMENT_TYPES))} files): convert it or move it out of the folder")
    if kind == "pdf":
        return pdf_text(path)
    text = decode_document(path.read_bytes(), path)
    return html_text(text) if kind == "html" else split_title(text, kind)


def load_documents(path: Path, report: Report) -> list[Article]:
    """The knowledge base's documents: every file of a folder (id: the file name without its extension) or
    each line of a JSONL file {id, title?, text}. Empty documents are dropped and reported; a repeated id,
    a bad record or no usable document at all is a DataError naming the file and line."""
    docs: list[Article] = []
    where_of: dict[str, str] = {}

    def add(doc_id: str, title: str, text: str, where: str) -> None:
        if not doc_id.strip():
            raise DataError(f"{where}: empty document id")
        if doc_id in where_of:
            raise DataError(f"{where}: document id '{doc_id}' repeats {where_of[doc_id]}")
        where_of[doc_id] = where
        if not text.strip():
            report.drops.append({"where": where, "reason": "empty_document"})
            return
        docs.append(Article(id=doc_id, title=title.strip(), context=text.strip()))

    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        for file in files:
            title, text = read_document_file(file)
            add(file.stem, title, text, str(file))
        seen = len(files)
    elif path.suffix.lower() == ".jsonl":
        seen = 0
        for lineno, rec in iter_jsonl(path):
            where = f"{path}:{lineno}"
            doc_id = typed_field(rec, "id", (str, int), where)
            text = typed_field(rec, "text", str, where)
            title = rec.get("title") or ""
            if not isinstance(title, str):
                raise DataError(f"{where}: field 'title' has the wrong type ({type(title).__name__})")
            add(str(doc_id), title, text.replace("\r\n", "\n"), f"{where} (document {doc_id})")
            seen += 1
    elif path.exists():
        raise DataError(f"{path}: documents must be a folder of files or a .jsonl file of {{id, title, text}}")
    else:
        raise DataError(f"{path}: not found (run fetch)")
    if not docs:
        raise DataError(f"{path}: no usable document ({seen} read, all empty)" if seen else f"{path}: no document")
    return docs


@dataclass
class OwnQuestion:
    """A reading question as read from a file, then placed in a document."""

    id: str
    question: str
    where: str  # file and line, or file and question id: for every message about it
    file: str
    answers: list[tuple[str, int]]  # (text, start in `context`); start -1 without a context
    context: str | None = None
    context_id: str | None = None  # SQuAD's paragraph id: the document it names
    context_title: str = ""
    new_doc_id: str = ""  # the id its context gets if no document holds it
    doc: str | None = None  # placed: the document's id, the context's offset in it, the gold chunks
    offset: int = 0
    gold: list[str] = field(default_factory=list)
    best: str | None = None  # placed by answer: the chunk used as its context


def _unanswerable(out: list[dict[str, Any]], qid: str, question: str, where: str) -> None:
    out.append({"id": qid, "question": question.strip(), "where": where})


def load_squad(path: Path, report: Report, unanswerable: list[dict[str, Any]]) -> list[OwnQuestion]:
    """SQuAD JSON (v1.1, or v2 with `is_impossible`): every question with its paragraph as context; v2's
    unanswerable questions are kept out (listed in `unanswerable`)."""
    root = read_json(path)
    if not isinstance(root, dict) or not isinstance(root.get("data"), list):
        raise DataError(f"{path}: expected a JSON object with a 'data' list (SQuAD format)")
    out = []
    for a_idx, entry in enumerate(root["data"]):
        title = entry.get("title", "") if isinstance(entry, dict) else ""
        for p_idx, para in enumerate(typed_field(entry, "paragraphs", list, f"{path}: data[{a_idx}]")):
            where = f"{path}: data[{a_idx}].paragraphs[{p_idx}]"
            context = typed_field(para, "context", str, where).replace("\r\n", "\n")
            if not context.strip():
                raise DataError(f"{where}: empty 'context'")
            pid = para.get("id")
            if pid is not None and (isinstance(pid, bool) or not isinstance(pid, (str, int))):
                raise DataError(f"{where}: field 'id' has the wrong type ({type(pid).__name__})")
            for q_idx, qa in enumerate(typed_field(para, "qas", list, where)):
                qid = str(typed_field(qa, "id", (str, int), f"{where}.qas[{q_idx}]"))
                q_where = f"{path}: question {qid}"
                question = typed_field(qa, "question", str, q_where)
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise DataError(f"{q_where}: field 'is_impossible' has the wrong type ({type(impossible).__name__})")
                if not question.strip():
                    report.drops.append({"where": q_where, "reason": "empty_question"})
                    continue
                if impossible:
                    _unanswerable(unanswerable, qid, question, q_where)
                    continue
                if not (answers := squad_answers(qa, context, q_where, report)):
                    continue
                out.append(OwnQuestion(id=qid, question=question.strip(), where=q_where, file=str(path),
                                       answers=answers, context=context,
                                       context_id=None if pid is None else str(pid), context_title=str(title or ""),
                                       new_doc_id=f"{path.stem}-{a_idx}-{p_idx}"))
    return out


def load_reading_jsonl(path: Path, report: Report, unanswerable: list[dict[str, Any]],
                       blank_lines: list[int]) -> list[OwnQuestion]:
    """JSONL {id, question, answers[], context?}: answers are strings (or SQuAD's {text, answer_start});
    without an id a question is `<file stem>-<line>`; `answers: []` or `is_impossible: true` is unanswerable."""
    import hashlib

    out = []
    for lineno, rec in iter_jsonl(path, blank_lines):
        where = f"{path}:{lineno}"
        raw_id = rec.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip()):
            raise DataError(f"{where}: field 'id' must be a non-empty string or an integer")
        qid = f"{path.stem}-{lineno}" if raw_id is None else str(raw_id)
        question = typed_field(rec, "question", str, where)
        where = f"{path}:{lineno} (question {qid})"
        context = rec.get("context")
        if context is not None:
            if not isinstance(context, str):
                raise DataError(f"{where}: field 'context' has the wrong type ({type(context).__name__})")
            if not context.strip():
                raise DataError(f"{where}: empty 'context' (leave the field out when there is none)")
            context = context.replace("\r\n", "\n")
        if "answers" not in rec:
            raise DataError(f"{where}: missing field 'answers'")
        raw_answers = [rec["answers"]] if isinstance(rec["answers"], str) else rec["answers"]
        if not isinstance(raw_answers, list):
            raise DataError(f"{where}: field 'answers' has the wrong type ({type(raw_answers).__name__})")
        impossible = rec.get("is_impossible", False)
        if not isinstance(impossible, bool):
            raise DataError(f"{where}: field 'is_impossible' has the wrong type ({type(impossible).__name__})")
        if not question.strip():
            report.drops.append({"where": where, "reason": "empty_question"})
            continue
        if impossible or not raw_answers:
            _unanswerable(unanswerable, qid, question, where)
            continue
        answers: list[tuple[str, int]] = []
        for ans_idx, ans in enumerate(raw_answers):
            a_where = f"{where} answer {ans_idx}"
            text, start = (ans.get("text"), ans.get("answer_start")) if isinstance(ans, dict) else (ans, None)
            if text is not None and not isinstance(text, str):
                raise DataError(f"{a_where}: an answer must be a string (got {type(text).__name__})")
            if not text or not text.strip():
                report.drops.append({"where": a_where, "reason": "empty_answer"})
                continue
            if context is None:
                checked = (text, -1)
            elif start is None:
                pos = context.find(text)
                if pos < 0:
                    report.drops.append({"where": a_where, "reason": "answer_not_in_context", "text": text[:80]})
                    continue
                checked = (text, pos)
            else:
                checked = check_answer(context, text, start, a_where, report)
            if checked and checked[0] not in [t for t, _ in answers]:
                answers.append(checked)
        if not answers:
            report.drops.append({"where": where, "reason": "question_without_answer"})
            continue
        new_id = "context-" + hashlib.sha1(context.encode("utf-8")).hexdigest()[:10] if context else ""
        out.append(OwnQuestion(id=qid, question=question.strip(), where=where, file=str(path), answers=answers,
                               context=context, new_doc_id=new_id))
    return out


def load_reading(path: Path, report: Report, unanswerable: list[dict[str, Any]],
                 blank_lines: list[int]) -> list[OwnQuestion]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_squad(path, report, unanswerable)
    if suffix == ".jsonl":
        return load_reading_jsonl(path, report, unanswerable, blank_lines)
    raise DataError(f"{path}: reading questions are SQuAD JSON (.json) or JSONL (.jsonl), not '{path.suffix}'")


def load_maths(path: Path, blank_lines: list[int]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Maths JSONL: GSM8K's {question, answer: '<worked solution>\\n#### N'} or {id?, question, answer: N}
    (the number alone: an empty rationale); ids default to `<file stem>-<line>`. A final answer that is
    not a number is a DataError naming the line."""
    if path.suffix.lower() != ".jsonl":
        raise DataError(f"{path}: maths questions are JSONL (.jsonl), not '{path.suffix}'")
    rows, formats = [], {"gsm8k": 0, "simple": 0}
    for lineno, rec in iter_jsonl(path, blank_lines):
        where = f"{path}:{lineno}"
        raw_id = rec.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or not str(raw_id).strip()):
            raise DataError(f"{where}: field 'id' must be a non-empty string or an integer")
        question = typed_field(rec, "question", str, where)
        answer = rec.get("answer")
        if answer is None:
            raise DataError(f"{where}: missing field 'answer'")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' has the wrong type ({type(answer).__name__})")
        if not question.strip():
            raise DataError(f"{where}: empty 'question'")
        rationale, marker, final = answer.rpartition("####")
        formats["gsm8k" if marker else "simple"] += 1
        final = final.strip()
        if not GSM8K_FINAL.fullmatch(final):
            raise DataError(f"{where}: the final answer is not a number (got {final[:40]!r}; GSM8K format ends "
                            "with '#### <number>', the simple format's answer is the number alone)")
        rows.append({"id": f"{path.stem}-{lineno}" if raw_id is None else str(raw_id), "question": question.strip(),
                     "rationale": rationale.strip(), "answer": final, "where": where})
    if not rows:
        raise DataError(f"{path}: no records")
    return rows, formats


class _Holders:
    """Which documents hold a text verbatim: one search through all of them joined (a NUL between two
    documents, so no match spans two), stopping at the second document found."""

    def __init__(self, docs: Sequence[Article]):
        import bisect

        self._bisect, self.ids = bisect.bisect_right, [d.id for d in docs]
        self.starts, pos = [], 0
        for d in docs:
            self.starts.append(pos)
            pos += len(d.context) + 1
        self.joined = "\x00".join(d.context for d in docs)

    def __call__(self, text: str, limit: int = 2) -> list[str]:
        found: list[str] = []
        pos = self.joined.find(text)
        while pos >= 0 and len(found) < limit:
            i = self._bisect(self.starts, pos) - 1
            found.append(self.ids[i])
            following = self.starts[i + 1] if i + 1 < len(self.starts) else len(self.joined)
            pos = self.joined.find(text, following)
        return found


def _place_by_context(questions: list[OwnQuestion], docs: dict[str, Article], report: Report,
                      counts: dict[str, int]) -> list[OwnQuestion]:
    """Each question with a context goes to the document its paragraph id names, else the one document
    whose text holds the context verbatim; a context no document holds becomes a document itself, one
    several documents hold is ambiguous (its questions dropped and reported). Contexts are searched for
    in your documents; a context that became a document is found again only when repeated exactly."""
    holders_in = _Holders(list(docs.values()))
    found: dict[str, str | None] = {}  # context -> its document (None: several)
    kept = []
    for q in questions:
        if q.context is None:
            kept.append(q)
            continue
        if q.context_id is not None and q.context_id in docs:
            pos = docs[q.context_id].context.find(q.context)
            if pos < 0:
                raise DataError(f"{q.where}: its paragraph id '{q.context_id}' names a document whose text does "
                                "not contain the paragraph's context")
            q.doc, q.offset = q.context_id, pos
            counts["placed_by_context"] += 1
            kept.append(q)
            continue
        if q.context not in found:
            holders = holders_in(q.context)
            if len(holders) > 1:
                found[q.context] = None
            elif holders:
                found[q.context] = holders[0]
            else:
                new_id = q.context_id or q.new_doc_id
                if new_id in docs:
                    raise DataError(f"{q.where}: its context is in no document and would become document "
                                    f"'{new_id}', an id already used")
                docs[new_id] = Article(id=new_id, title=q.context_title, context=q.context)
                found[q.context] = new_id
                counts["documents_from_contexts"] += 1
        doc = found[q.context]
        if doc is None:
            report.drops.append({"where": q.where, "reason": "context_in_several_documents"})
            continue
        q.doc, q.offset = doc, docs[doc].context.find(q.context)
        counts["placed_by_context"] += 1
        kept.append(q)
    return kept


def _place_by_answer(questions: list[OwnQuestion], docs: dict[str, Article], chunks_of: dict[str, list[Chunk]],
                     report: Report, counts: dict[str, int], stopwords: Sequence[str]) -> list[OwnQuestion]:
    """ANSWER_PLACEMENT_RULE, for the questions without a context."""
    from ragtune.retrieval import tokenize_zh

    tokens: dict[str, set[str]] = {}
    holders_of = _Holders(list(docs.values()))
    kept = []
    for q in questions:
        if q.context is not None:
            kept.append(q)
            continue
        texts = [t for t, _ in q.answers]
        holders = list(dict.fromkeys(d for t in texts for d in holders_of(t)))
        if not holders:
            report.drops.append({"where": q.where, "reason": "answer_not_found", "text": texts[0][:80]})
            continue
        if len(holders) > 1:
            report.drops.append({"where": q.where, "reason": "answer_in_several_documents",
                                 "documents": holders[:5]})
            continue
        doc = docs[holders[0]]
        for text in texts:
            if text not in doc.context:
                report.drops.append({"where": q.where, "reason": "answer_not_found", "text": text[:80]})
        texts = [t for t in texts if t in doc.context]
        chunks = chunks_of[doc.id]
        holding = [c for c in chunks if any(t in c.text for t in texts)]
        if holding:
            asked = set(tokenize_zh(q.question, stopwords))
            for c in holding:
                if c.chunk_id not in tokens:
                    tokens[c.chunk_id] = set(tokenize_zh(c.text, stopwords))
            best = max(holding, key=lambda c: (len(asked & tokens[c.chunk_id]), -chunks.index(c)))
            q.gold, q.best = [c.chunk_id for c in holding], best.chunk_id
            counts["answer_in_several_chunks"] += len(holding) > 1
        answers = []
        for text in texts:
            best_chunk = next((c for c in holding if c.chunk_id == q.best), None)
            start = (best_chunk.start + best_chunk.text.index(text) if best_chunk is not None and text in best_chunk.text
                     else doc.context.index(text))
            answers.append((text, start))
        q.answers, q.doc, q.offset = answers, doc.id, 0
        counts["placed_by_answer"] += 1
        kept.append(q)
    return kept


def _reading_row(q: OwnQuestion, doc: Article, chunks: list[Chunk], size: int) -> tuple[ReadingQuestion, bool]:
    """The ReadingQuestion of a placed question, and whether its context had to be a window of the document."""
    answers = [(t, q.offset + s) for t, s in q.answers]
    text, start = answers[0]
    gold = q.gold or sorted({c.chunk_id for t, s in answers for c in gold_chunks(chunks, s, len(t))})
    first = next((c for c in chunks if c.chunk_id == q.best), None) or gold_chunks(chunks, start, len(text))[0]
    window = text not in first.text
    context = answer_window(doc.context, start, len(text), size) if window else first.text
    return ReadingQuestion(id=q.id, question=q.question, answers=[t for t, _ in answers], article_id=doc.id,
                           gold_chunk_ids=gold, context=context), window


def _hold_out(items: Sequence[Any], fraction: float, seed: int) -> set[int]:
    """Indices of a seeded `fraction` of `items`: at least one (and never all) when the fraction is above 0
    and there are two or more."""
    n = len(items)
    if fraction <= 0 or n < 2:
        return set()
    n_eval = min(max(1, round(n * fraction)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return set(order[:n_eval])


def prepare_custom(
    raw_dir: Path,
    *,
    data: CustomDataConfig,
    split: SplitConfig,
    stopwords: Sequence[str] = (),
    query_prompt: str = "",
    seed: int,
):
    """prepare() for data=custom: the files fetch copied to `raw_dir`/custom/, as the same data/prepared
    files CMRC2018 + GSM8K give (kb, cmrc_train/eval, gsm8k_train/eval, embed_train) and stats."""
    from ragtune.sources import CUSTOM_RAW

    base = raw_dir / CUSTOM_RAW
    report = Report()
    counts = {"placed_by_context": 0, "placed_by_answer": 0, "answer_in_several_chunks": 0,
              "documents_from_contexts": 0}
    docs = {d.id: d for d in load_documents(base / data.documents, report)} if data.documents else {}
    documents_read = len(docs)
    unanswerable: list[dict[str, Any]] = []
    blank: list[int] = []
    reading = {"train": [], "eval": []}
    for part, files in (("train", data.reading), ("eval", data.reading_eval)):
        for rel in files:
            reading[part] += load_reading(base / rel, report, unanswerable, blank)
    questions = reading["train"] + reading["eval"]
    seen: dict[str, str] = {}
    for q in questions:
        if q.id in seen:
            raise DataError(f"{q.where}: question id '{q.id}' repeats {seen[q.id]}")
        seen[q.id] = q.where
    for item in unanswerable:
        if item["id"] in seen:
            raise DataError(f"{item['where']}: question id '{item['id']}' repeats {seen[item['id']]}")
        seen[item["id"]] = item["where"]

    questions = _place_by_context(questions, docs, report, counts)
    if not docs:
        missing = "data.documents is null" if not data.documents else "the documents are empty"
        raise DataError(f"no knowledge base: {missing} and no reading question has a context "
                        "(give data.documents, or reading questions with contexts)")
    size, overlap = split.chunk_size, split.chunk_overlap
    chunks_of = {doc_id: chunk_article(doc, size, overlap, SENTENCE_END_ANY) for doc_id, doc in docs.items()}
    questions = _place_by_answer(questions, docs, chunks_of, report, counts, stopwords)
    placed_ids = {q.id for q in questions}
    for part, files in (("train", data.reading), ("eval", data.reading_eval)):
        for rel in files:
            path = str(base / rel)
            if not any(q.file == path and q.id in placed_ids for q in reading[part]):
                reasons: dict[str, int] = {}
                for drop in report.drops:
                    if str(drop["where"]).startswith(path):
                        reasons[drop["reason"]] = reasons.get(drop["reason"], 0) + 1
                impossible = sum(1 for u in unanswerable if u["where"].startswith(path))
                why = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
                raise DataError(f"{path}: no usable question (dropped: {why or 'none'}; unanswerable: {impossible})")
    eval_files = {str(base / rel) for rel in data.reading_eval}

    # held out: the user's eval files, else whole documents (never single questions)
    if data.reading_eval:
        train_q = [q for q in questions if q.file not in eval_files]
        eval_q = [q for q in questions if q.file in eval_files]
        eval_docs: set[str] = set()
        held_out = "reading_eval"
    else:
        with_questions = list(dict.fromkeys(q.doc for q in questions))
        eval_docs = {with_questions[i] for i in _hold_out(with_questions, data.eval_fraction, seed)}
        train_q = [q for q in questions if q.doc not in eval_docs]
        eval_q = [q for q in questions if q.doc in eval_docs]
        held_out = f"eval_fraction {data.eval_fraction} of the {len(with_questions)} documents holding questions"

    maths_blank: list[int] = []
    maths_formats = {"gsm8k": 0, "simple": 0}
    maths_parts: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    for part, files in (("train", data.maths), ("eval", data.maths_eval)):
        for rel in files:
            rows, formats = load_maths(base / rel, maths_blank)
            maths_parts[part] += rows
            maths_formats = {k: maths_formats[k] + formats[k] for k in maths_formats}
    maths_seen: dict[str, str] = {}
    for row in maths_parts["train"] + maths_parts["eval"]:
        if row["id"] in maths_seen:
            raise DataError(f"{row['where']}: maths question id '{row['id']}' repeats {maths_seen[row['id']]}")
        maths_seen[row["id"]] = row["where"]
    if not data.maths_eval:
        held = _hold_out(maths_parts["train"], data.maths_eval_fraction, seed)
        maths_parts = {"train": [r for i, r in enumerate(maths_parts["train"]) if i not in held],
                       "eval": [r for i, r in enumerate(maths_parts["train"]) if i in held]}

    if not train_q and not maths_parts["train"]:
        raise DataError("nothing to train on: no reading question is left for training and there are no maths "
                        "questions (give data.reading or data.maths)")

    min_chars = split.leak_min_question_chars
    train_docs = list(dict.fromkeys(q.doc for q in train_q))
    leaks = find_leaks(
        [q.question for q in train_q],
        [(q.id, q.question) for q in eval_q],
        [docs[d].context for d in train_docs] if eval_docs else (),
        [(d, docs[d].context) for d in sorted(eval_docs)],
        min_chars,
    )
    leaks += find_leaks([r["question"] for r in maths_parts["train"]],
                        [(r["id"], r["question"]) for r in maths_parts["eval"]], min_question_chars=min_chars)
    if leaks:
        shown = "\n  ".join(leaks[:10])
        raise DataError(f"{len(leaks)} eval items leak into train (first {min(10, len(leaks))}):\n  {shown}")

    windows = 0

    def rows_of(part: list[OwnQuestion]) -> list[ReadingQuestion]:
        nonlocal windows
        out = []
        for q in part:
            row, window = _reading_row(q, docs[q.doc], chunks_of[q.doc], size)
            windows += window
            out.append(row)
        return out

    train_rows, eval_rows = rows_of(train_q), rows_of(eval_q)
    kb = [c for doc_id in docs for c in chunks_of[doc_id]]
    triples = mine_hard_negatives(train_rows, kb, n_negatives=split.hard_negatives, n_candidates=split.bm25_candidates,
                                  prompt=query_prompt, seed=seed, stopwords=stopwords) if train_rows else []
    outputs = {
        "kb.jsonl": [KbChunk(chunk_id=c.chunk_id, article_id=c.article_id, title=c.title, text=c.text) for c in kb],
        "cmrc_train.jsonl": train_rows,
        "cmrc_eval.jsonl": eval_rows,
        "gsm8k_train.jsonl": [MathsQuestion(**{k: r[k] for k in ("id", "question", "rationale", "answer")})
                              for r in maths_parts["train"]],
        "gsm8k_eval.jsonl": [MathsQuestion(**{k: r[k] for k in ("id", "question", "answer")}) for r in maths_parts["eval"]],
        "embed_train.jsonl": triples,
    }
    drop_counts = report.counts()
    stats = {
        "data": "custom",
        "documents": {
            "read": documents_read,
            "from_contexts": counts["documents_from_contexts"],
            "dropped_empty": drop_counts.get("dropped_empty_document", 0),
            "in_kb": len(docs),
            "kb_chunks": len(kb),
            "train_documents": len(train_docs),
            "eval_documents": len(eval_docs) if eval_docs else len({q.doc for q in eval_q}),
        },
        "reading": {
            "held_out": held_out,
            "train_questions": len(train_rows),
            "eval_questions": len(eval_rows),
            "placed_by_context": counts["placed_by_context"],
            "placed_by_answer": counts["placed_by_answer"],
            "answer_in_several_chunks": counts["answer_in_several_chunks"],
            "answer_placement_rule": ANSWER_PLACEMENT_RULE,
            "unanswerable_kept_out": len(unanswerable),
            "contexts_from_answer_window": windows,
            "blank_lines_skipped": len(blank),
            **{k: v for k, v in drop_counts.items() if k != "dropped_empty_document"},
        },
        "maths": {
            "train": len(maths_parts["train"]),
            "eval": len(maths_parts["eval"]),
            "held_out": "maths_eval" if data.maths_eval else f"maths_eval_fraction {data.maths_eval_fraction}",
            "gsm8k_format": maths_formats["gsm8k"],
            "simple_format": maths_formats["simple"],
            "blank_lines_skipped": len(maths_blank),
        },
        "embed_triples": len(triples),
        "embed_triples_without_negatives": sum(1 for t in triples if not t.neg),
        "leak_check": {"passed": True, "leaks": 0, "contexts_checked": bool(eval_docs)},
        "unanswerable": unanswerable,
        "repairs": report.repairs,
        "drops": report.drops,
    }
    return outputs, stats
