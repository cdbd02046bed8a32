"""Parameters: stages read the committed params.yaml; `compose()` rebuilds it from conf/ as DVC does."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def repo_root() -> Path:
    """The project root: DVC_ROOT under `dvc exp run`/`dvc repro`, else the folder holding dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else Path("params.yaml")
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def compose(overrides: list[str] | None = None, config_dir: str | os.PathLike = "conf") -> str:
    """Compose conf/ exactly as DVC's `hydra.enabled` does and return the YAML it would write."""
    import tempfile

    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(Path(config_dir).resolve()), None, "config", tmp, overrides or [])
        return out.read_text(encoding="utf-8")


def main() -> None:
    """`python -m ragtune.config`: rewrite params.yaml from conf/'s defaults."""
    Path("params.yaml").write_text(compose(), encoding="utf-8")
    print("params.yaml composed from conf/")


if __name__ == "__main__":
    main()
