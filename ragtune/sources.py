"""Data sources: the configured datasets, copied from a mirror folder or downloaded, each file checked
against its pinned sha256 and written atomically; or (data=custom) a team's own files, copied from a
folder inside the project with their sha256 recorded.

`data` is a choice (conf/data/*.yaml) tagged by `kind`: `cmrc_gsm8k` (DataConfig: CMRC2018 + GSM8K)
or `custom` (CustomDataConfig: documents, reading and maths questions in the formats
ragtune.data reads). Stages validate it as `DataChoice`."""

from __future__ import annotations

import os
import re
import shutil
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

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
    """`data=cmrc_dev` / `cmrc_full` (kind cmrc_gsm8k): which CMRC2018 and GSM8K files fetch gets and split
    reads. Every option states every key: there are no defaults to fall back on."""

    kind: Literal["cmrc_gsm8k"] = Field(description="cmrc_gsm8k: CMRC2018 reading + GSM8K maths, pinned by sha256")
    local_dir: str = Field(
        min_length=1, description="a project folder fetch depends on (dvc.yaml `${data.local_dir}`): conf/data, the pins")
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


CUSTOM_RAW = "custom"  # data=custom: the folder's files are copied to data/raw/custom/<the same relative path>
# Pipeline outputs: a dependency of fetch cannot lie inside one (DVC refuses overlapping deps and outs).
_OUTPUT_FOLDERS = ("data", "models", "reports", "bundle", "bundle_base")


def _relative_path(value: str, what: str) -> str:
    """A clean relative POSIX path inside its parent: no absolute path, no '..', no '.' alone."""
    path = PurePosixPath(value.replace("\\", "/"))
    if not value.strip() or path.is_absolute() or ".." in path.parts or str(path) == ".":
        raise ValueError(f"{what} must be a relative path inside its folder, got {value!r}")
    return str(path)


def _path_list(value: Any) -> Any:
    """null -> [], one path -> [path]: `-S data.maths=null` and `-S data.reading=mine.jsonl` both work."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


class CustomDataConfig(Config):
    """`data=custom` (kind custom): your own documents, reading questions and maths questions, read from a
    folder inside the project (every other path is relative to it). Any of documents / reading / maths may
    be null or empty; the stages that need a missing one say so and skip."""

    kind: Literal["custom"] = Field(description="custom: your own files, in the formats ragtune.data reads")
    local_dir: str = Field(description="must equal `folder` (custom.yaml sets it to ${data.folder}): fetch depends on it")
    folder: str = Field(description="a folder inside the project holding the files below; editing any file in it reruns fetch")
    documents: str | None = Field(
        description="the knowledge base: a folder of .txt/.md/.html (.pdf with pypdf installed) files, one document each "
                    "(id = file name without extension), or a JSONL file of {id, title, text}; null: none")
    reading: list[str] = Field(
        description="reading questions: SQuAD JSON (v1.1/v2, .json) or JSONL {id, question, answers[], context?} (.jsonl)")
    reading_eval: list[str] = Field(
        description="held-out reading questions, same formats; empty: hold out eval_fraction of the documents instead")
    maths: list[str] = Field(
        description="maths questions: JSONL, GSM8K's {question, answer: '...#### N'} or {id, question, answer: N}")
    maths_eval: list[str] = Field(description="held-out maths questions, same formats; empty: hold out maths_eval_fraction")
    eval_fraction: float = Field(
        ge=0, lt=1, description="share of the documents holding reading questions held out (with all their questions) "
                                "when reading_eval is empty; 0: no held-out reading questions")
    maths_eval_fraction: float = Field(
        ge=0, lt=1, description="share of the maths questions held out when maths_eval is empty; 0: none held out")

    _lists = field_validator("reading", "reading_eval", "maths", "maths_eval", mode="before")(
        lambda cls, value: _path_list(value))

    @field_validator("folder")
    @classmethod
    def _inside_project(cls, folder: str) -> str:
        folder = _relative_path(folder, "folder")
        if PurePosixPath(folder).parts[0] in _OUTPUT_FOLDERS:
            raise ValueError(f"folder {folder!r} lies inside a pipeline output ({', '.join(_OUTPUT_FOLDERS)}): "
                             "put your files in a folder of their own")
        return folder

    @field_validator("documents")
    @classmethod
    def _documents_path(cls, value: str | None) -> str | None:
        return _relative_path(value, "documents") if value else None

    @field_validator("reading", "reading_eval", "maths", "maths_eval")
    @classmethod
    def _file_paths(cls, values: list[str], info: Any) -> list[str]:
        paths = [_relative_path(v, info.field_name) for v in values]
        if len(set(paths)) != len(paths):
            raise ValueError(f"{info.field_name} lists a file twice")
        return paths

    @model_validator(mode="after")
    def _consistent(self) -> CustomDataConfig:
        if _relative_path(self.local_dir, "local_dir") != self.folder:
            raise ValueError(f"local_dir ({self.local_dir!r}) must equal folder ({self.folder!r}): "
                             "fetch's dvc.yaml dependency is local_dir")
        if not (self.documents or self.reading or self.reading_eval or self.maths):
            raise ValueError("documents, reading and maths are all empty: nothing to build from")
        seen: dict[str, str] = {}
        for key, paths in self.inputs().items():
            for path in paths:
                if path in seen:
                    raise ValueError(f"{path!r} is named by both {seen[path]} and {key}")
                seen[path] = key
        return self

    def inputs(self) -> dict[str, list[str]]:
        """Config key -> the paths (relative to `folder`) it names."""
        return {"documents": [self.documents] if self.documents else [], "reading": self.reading,
                "reading_eval": self.reading_eval, "maths": self.maths, "maths_eval": self.maths_eval}


DataChoice = Annotated[DataConfig | CustomDataConfig, Field(discriminator="kind")]


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


def custom_files(cfg: CustomDataConfig, folder: Path) -> list[tuple[str, Path]]:
    """(config key, file) for every file data=custom names: the documents folder's files (recursively,
    hidden ones aside, sorted) or the documents JSONL, then the question files; a missing one is an error."""
    files = []
    for key, paths in cfg.inputs().items():
        for rel in paths:
            source = folder / rel
            if key == "documents" and source.is_dir():
                found = sorted(p for p in source.rglob("*") if p.is_file()
                               and not any(part.startswith(".") for part in p.relative_to(source).parts))
                if not found:
                    raise DataError(f"data.documents: the folder {source} holds no file")
                files += [(key, p) for p in found]
            elif source.is_file():
                files.append((key, source))
            elif source.exists():
                raise DataError(f"data.{key}: {source} is not a file")
            else:
                raise DataError(f"data.{key}: {source} not found (paths are relative to data.folder {folder})")
    return files


def fetch_custom(cfg: CustomDataConfig, out_dir: Path, root: Path | None = None) -> list[dict[str, Any]]:
    """Copy the files data=custom names into `out_dir`/custom/ (same layout as under `folder`), each
    with its sha256 recorded (there is no pin to check: dvc.lock pins data/raw once fetched)."""
    folder = (root or Path.cwd()) / cfg.folder
    if not folder.is_dir():
        raise DataError(f"data.folder: {folder} is not a folder (it is relative to the project root)")
    fetched = []
    for _, source in custom_files(cfg, folder):
        relpath = f"{CUSTOM_RAW}/{source.relative_to(folder).as_posix()}"
        with atomic_path(out_dir / relpath) as tmp:
            shutil.copyfile(source, tmp)
            digest = sha256_file(tmp)
        fetched.append({"file": relpath, "sha256": digest, "source": str(source), "verified": False})
    return fetched
