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
