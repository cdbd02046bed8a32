"""MLflow tracking: one run per stage in `sqlite:///<repo root>/mlflow.db`, tagged with the DVC experiment."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

from ragtune.config import repo_root

EXPERIMENT = "ragtune"
# Keys whose values are never logged, whatever the config says.
SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sft': {'lr': 1}} -> {'sft.lr': 1}, dropping secret-looking keys."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if SECRET_KEY.search(str(key)) and not str(key).endswith("_env"):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_root(), timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Open the MLflow run for one stage; yields the `mlflow` module for logging inside it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(EXPERIMENT)
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    tags = {"dvc.stage": stage, "dvc.exp_name": exp_name}
    if commit := _git_commit():
        tags["git.commit"] = commit
    with mlflow.start_run(run_name=f"{exp_name}/{stage}", tags=tags):
        if params:
            flat = {k: ("" if v is None else str(v)[:500]) for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i : i + 100]))
        yield mlflow
