"""Reading and writing the files stages exchange: atomic writes, errors that name file and line."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ragtune.config import UserError


class DataError(UserError, ValueError):
    """Bad input: the message names the file and the record (or line) at fault."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes it private; the result is an ordinary file
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _leftovers(path: Path, kind: str) -> list[Path]:
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.{kind}"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    The old folder is moved aside before the new one moves in and deleted only after, so a crash
    at any moment loses neither: the next call puts a set-aside folder back if `path` is missing
    and clears temporary folders that a killed run left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in _leftovers(path, "old"):
        if not path.exists():
            os.replace(old, path)
        else:
            shutil.rmtree(old)
    for stale in _leftovers(path, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        aside = None
        if path.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, aside)  # onto the empty folder mkdtemp made
        os.replace(tmp, path)
        if aside is not None:
            shutil.rmtree(aside)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def json_error_reason(err: json.JSONDecodeError, lineno: int | None = None, colno: int | None = None) -> str:
    """The decoder's whole reason with its position: 'Invalid control character at line 3 column 17'.

    `err.msg` alone is cut short ("Invalid control character at", "Unterminated string starting at"):
    the position belongs to the sentence. `lineno`/`colno` override the decoder's (a JSONL line is
    decoded on its own, so its line is the file's line number)."""
    lineno = err.lineno if lineno is None else lineno
    colno = err.colno if colno is None else colno
    msg = err.msg
    where = f"line {lineno} column {colno}"
    reason = f"{msg} {where}" if msg.endswith(" at") else f"{msg} at {where}"
    if msg.startswith("Invalid control character") and 0 <= err.pos < len(err.doc):
        reason += f" ({err.doc[err.pos]!r} must be escaped inside a string)"
    return reason


def read_json(path: str | os.PathLike) -> Any:
    """One JSON document; a bad file raises DataError with `path:line:column:` and the whole reason."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    try:
        text = data.decode("utf-8")  # the whole file at once, so the error's offset is the file's
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte offset {err.start} of the file)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {json_error_reason(err)}") from None


def iter_jsonl(path: str | os.PathLike, blank_lines: list[int] | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) for each non-blank line; a bad line raises DataError naming it
    (`path:line:column: malformed JSON: <whole reason>`).

    Blank (whitespace-only) lines are skipped, wherever they are; pass a list as `blank_lines` and
    the line number of each one skipped is appended to it, so a caller can count and report them
    (split reports them in stats.json). They are not errors: such a line holds no record, so skipping it
    loses nothing that reading could recover, and a stray newline in a hand-edited file should not
    stop a pipeline. A record that was *replaced* by whitespace is a changed file: fetch's pinned
    sha256 catches that, and the count in the caller's stats shows it."""
    path = Path(path)
    try:
        fh = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte offset {err.start} of the line)") from None
            if not line.strip():
                if blank_lines is not None:
                    blank_lines.append(lineno)
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # without its newline: an error at its end stays on it
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}:{err.colno}: malformed JSON: "
                                f"{json_error_reason(err, lineno, err.colno)}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def require(record: dict, fields: Iterable[str], where: str) -> None:
    """Raise DataError naming `where` (file and record) for the first missing field."""
    for field in fields:
        if field not in record or record[field] is None:
            raise DataError(f"{where}: missing field '{field}'")
