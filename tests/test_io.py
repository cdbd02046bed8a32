"""Atomic folder replacement: a failure or a crash at any moment loses neither old nor new output."""

from __future__ import annotations

import pytest

from ragtune.io import atomic_dir


def make(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "f.txt").write_text(text)


def test_success_replaces_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "prepared"
    make(out, "old")
    with atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("new")
    assert (out / "f.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "prepared"
    make(out, "old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "f.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "f.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_crash_leftovers_are_restored_or_cleared(tmp_path):
    out = tmp_path / "prepared"
    # a kill -9 after the old folder was set aside, before the new one moved in
    make(tmp_path / ".prepared.abc.old", "old")
    make(tmp_path / ".prepared.def.tmp", "half-written")
    with pytest.raises(RuntimeError), atomic_dir(out):
        raise RuntimeError("this run fails too")
    assert (out / "f.txt").read_text() == "old"  # the set-aside output came back
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


# --------------------------------------------------------------------------- JSON and JSONL errors, blank lines


def test_read_json_error_carries_the_whole_reason_with_line_and_column(tmp_path):
    from ragtune.io import DataError, read_json

    path = tmp_path / "file.json"
    # line 3, column 17: a raw tab inside a string (JSON wants it escaped as \t)
    path.write_text('{\n  "a": 1,\n  "question": "x\ty"\n}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_json(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3:17: malformed JSON: Invalid control character at line 3 column 17")
    assert "'\\t' must be escaped" in message
    path.write_text('{"a": "never closed}', encoding="utf-8")
    with pytest.raises(DataError, match=r"file.json:1:7: malformed JSON: Unterminated string starting at line 1 column 7$"):
        read_json(path)
    path.write_text('{"a": 1,\n "b": }', encoding="utf-8")
    with pytest.raises(DataError, match=r"file.json:2:7: malformed JSON: Expecting value at line 2 column 7$"):
        read_json(path)
    path.write_bytes(b'{\n"a": 1,\n"b": "\xff"}')  # the byte offset is the file's, not a read buffer's
    with pytest.raises(DataError, match=r"file.json:3: not UTF-8 text \(invalid start byte at byte offset 16 of the file\)"):
        read_json(path)


def test_jsonl_error_names_the_file_line_and_column_with_the_whole_reason(tmp_path):
    from ragtune.io import DataError, read_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": 1}\n\n{"q": "a\tb"}\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(f"{path}:3:9: malformed JSON: Invalid control character at line 3 column 9")
    path.write_text('{"q": 1}\n{"q": 2} {"q": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl:2:10: malformed JSON: Extra data at line 2 column 10$"):
        read_jsonl(path)


def test_blank_lines_are_skipped_and_counted_wherever_they_are(tmp_path):
    from ragtune.io import iter_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_text('{"q": 1}\n   \n{"q": 2}\n\t\r\n{"q": 3}\n\n', encoding="utf-8")
    blank: list[int] = []
    assert [(n, r["q"]) for n, r in iter_jsonl(path, blank)] == [(1, 1), (3, 2), (5, 3)]
    assert blank == [2, 4, 6]  # the middle ones and the trailing one, by line number
    assert [r["q"] for _, r in iter_jsonl(path)] == [1, 2, 3]  # callers that do not ask are unchanged


def test_split_stats_report_blank_gsm8k_lines(tmp_path):
    """A whitespace-only line in GSM8K train (where a record was) shows in split's stats, not only
    as one record fewer."""
    from ragtune.data import load_gsm8k
    from tests.test_split import raw_dir, run_prepare

    raw = raw_dir(tmp_path)
    train = raw / "gsm8k" / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    lines[2] = "   \n"  # the third record blanked out
    train.write_text("".join(lines))
    blank: list[int] = []
    assert len(load_gsm8k(train, "train", blank)) == len(lines) - 1 and blank == [3]

    _, stats = run_prepare(raw)
    assert stats["gsm8k"]["train"] == len(lines) - 1
    assert stats["gsm8k"]["blank_lines_skipped"] == 1
    assert stats["gsm8k"]["blank_lines"] == {"train": [3], "eval": []}
    clean, clean_stats = run_prepare(raw_dir(tmp_path / "clean"))
    assert clean_stats["gsm8k"]["blank_lines_skipped"] == 0


def test_jsonl_line_cut_short_is_reported_at_its_end(tmp_path):
    from ragtune.io import DataError, read_jsonl

    path = tmp_path / "cut.jsonl"
    path.write_text('{"q": 1}\n{"q": \n{"q": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"cut.jsonl:2:7: malformed JSON: Expecting value at line 2 column 7$"):
        read_jsonl(path)
