"""Data sources: the configured datasets, copied from a mirror folder or downloaded, each file checked
against its pinned sha256 and written atomically."""

from __future__ import annotations

import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from ragtune.config import Config
from ragtune.io import DataError, atomic_path, sha256_file

MIRROR_ENV = "RAGTUNE_DATA_MIRROR"
RAW = Path("data/raw")  # fetch's out: every dataset file under <dataset>/<file>


class DatasetSpec(Config):
    """One dataset's files: where to download them and the sha256 each must have."""

    base_url: str = Field(description="download location of the files when the mirror lacks them")
    files: dict[str, str | None] = Field(
        description="file name -> pinned sha256 (null: recorded on the first fetch, then pinned by dvc.lock)")

    @field_validator("files")
    @classmethod
    def _hex_digests(cls, files: dict[str, str | None]) -> dict[str, str | None]:
        bad = [name for name, sha in files.items() if sha is not None and not re.fullmatch(r"[0-9a-f]{64}", sha)]
        if bad:
            raise ValueError(f"not a sha256 hex digest for {bad}")
        return files


class DataConfig(Config):
    """`data` (conf/data/*.yaml, a choice: cmrc_dev, cmrc_full): which files fetch gets and split reads.
    Every option states every key: there are no defaults to fall back on."""

    mirror: str | None = Field(description="a folder holding the files under their dataset/file names; RAGTUNE_DATA_MIRROR wins")
    datasets: dict[str, DatasetSpec] = Field(description="dataset name -> its files, fetched into data/raw/<name>/")
    cmrc_train: list[str] = Field(min_length=1, description="SQuAD-style files (under data/raw) whose articles train")
    cmrc_eval: list[str] = Field(description="SQuAD-style files held out for eval; empty: hold out cmrc_eval_fraction of train's articles")
    cmrc_eval_fraction: float = Field(ge=0, lt=1, description="share of train articles held out when cmrc_eval is empty")
    gsm8k_train: str = Field(description="GSM8K-format JSONL (under data/raw) distilled and trained on")
    gsm8k_eval: str = Field(description="GSM8K-format JSONL held out for eval")

    @model_validator(mode="after")
    def _some_eval(self) -> DataConfig:
        if not self.cmrc_eval and self.cmrc_eval_fraction <= 0:
            raise ValueError("cmrc_eval is empty and cmrc_eval_fraction is 0: nothing would be held out")
        return self


def resolve_mirror(configured: str | None) -> Path | None:
    """The mirror folder: RAGTUNE_DATA_MIRROR wins over `data.mirror`; None means download."""
    value = os.environ.get(MIRROR_ENV) or configured
    return Path(value).expanduser().resolve() if value else None


def fetch_file(
    relpath: str, url: str, expected_sha256: str | None, dest: Path, mirror: Path | None, timeout: float = 60
) -> dict[str, str]:
    """Copy `relpath` from the mirror (or download `url`), verify its sha256, write `dest` atomically."""
    source = mirror / relpath if mirror else None
    with atomic_path(dest) as tmp:
        if source is not None and source.is_file():
            shutil.copyfile(source, tmp)
            origin = str(source)
        else:
            where = f"not in the mirror {mirror}, and " if mirror else ""
            if mirror:
                print(f"fetch: {relpath} is not in the mirror {mirror}; downloading {url}", file=sys.stderr)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
                    shutil.copyfileobj(resp, fh)
            except OSError as err:
                raise DataError(f"{relpath}: {where}download from {url} failed: {err}") from None
            origin = url
        actual = sha256_file(tmp)
        if expected_sha256 and actual != expected_sha256:
            source_note = "" if origin == url else f" (its canonical URL: {url})"
            raise DataError(f"{relpath}: checksum mismatch for {origin}{source_note}: expected sha256 "
                            f"{expected_sha256}, got {actual}")
    return {"file": relpath, "sha256": actual, "source": origin, "verified": bool(expected_sha256)}


def fetch_datasets(datasets: Mapping[str, DatasetSpec], out_dir: Path, mirror: Path | None) -> list[dict[str, str]]:
    """Fetch every file of every dataset; `datasets` is `data.datasets` from params."""
    fetched = []
    for name, spec in datasets.items():
        for filename, sha in spec.files.items():
            relpath = f"{name}/{filename}"
            url = spec.base_url.rstrip("/") + "/" + filename
            fetched.append(fetch_file(relpath, url, sha, out_dir / relpath, mirror))
    return fetched
