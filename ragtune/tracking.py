"""MLflow tracking: one run per stage in `sqlite:///<repo root>/mlflow.db`, tagged with the DVC experiment."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ragtune.config import repo_root

EXPERIMENT = "ragtune"
# Keys whose values are never logged, whatever the config says.
SECRET_KEY = re.compile(r"(api_?key|token|secret|password)", re.IGNORECASE)
# Values that look like credentials, whatever their key is called.
SECRET_VALUE = re.compile(r"^(sk-|hf_|ghp_|Bearer\s)", re.IGNORECASE)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the repo root's mlflow.db. The path is absolute and comes from
    DVC_ROOT: under a queued `dvc exp run` the working copy is a temporary folder that disappears."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def artifact_root() -> str:
    """Where new experiments keep artifacts: beside mlflow.db, never in the (temporary) working copy."""
    return (repo_root() / "mlartifacts").as_uri()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sft': {'lr': 1}} -> {'sft.lr': 1}, dropping secret-looking keys and values.

    Keys ending in `_env` name an environment variable (e.g. `api_key_env: OPENAI_API_KEY`), not
    the secret itself, so they are kept."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if SECRET_KEY.search(str(key)) and not str(key).endswith("_env"):
            continue
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, str) and SECRET_VALUE.match(value):
            continue
        else:
            flat[name] = value
    return flat


def mlflow_key(key: str) -> str:
    """A key MLflow accepts (alphanumerics, _ - . space : /): anything else becomes '_'."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_root(), timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _local_path(uri: str) -> Path | None:
    """The folder a `file:` URI or plain path names (resolved); None for remote schemes (s3:, mlflow-artifacts:, ...)."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path)).resolve()  # url2pathname unquotes %xx
    if parsed.scheme == "":
        return Path(uri).resolve()
    return None


def _sqlite_db_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).resolve()


def _belongs_here(artifact_location: str, uri: str) -> bool:
    """Whether an experiment's artifacts land in this project: a local artifact folder must be inside
    the repo root or beside the sqlite store that records it. The store keeps the absolute folder it
    was created with, so a copy of the project (or a clone that brought mlflow.db along) would log
    into the other checkout. Remote artifact stores and non-sqlite tracking servers are left alone."""
    folder = _local_path(artifact_location)
    db = _sqlite_db_path(uri)
    if folder is None or db is None:
        return True
    return any(folder.is_relative_to(home) for home in (repo_root(), db.parent))


def _get_or_create(mlflow, name: str) -> Any:
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found
    try:
        mlflow.create_experiment(name, artifact_location=artifact_root())
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel stage
        pass
    return mlflow.get_experiment_by_name(name)


def _experiment_id(mlflow, uri: str | None = None) -> str:
    """The `ragtune` experiment; in a copy of the project whose mlflow.db still points `ragtune`'s
    artifacts at the original checkout, `ragtune (<this root>)`, with artifacts in this root's
    mlartifacts (and a line on stderr saying so)."""
    uri = uri or mlflow.get_tracking_uri()
    experiment = _get_or_create(mlflow, EXPERIMENT)
    if _belongs_here(experiment.artifact_location, uri):
        return experiment.experiment_id
    own_name = f"{EXPERIMENT} ({repo_root()})"
    own = _get_or_create(mlflow, own_name)
    if not _belongs_here(own.artifact_location, uri):  # cannot happen unless edited by hand: fail, never log elsewhere
        raise RuntimeError(f"MLflow experiment '{own_name}' keeps its artifacts in {own.artifact_location}, "
                           f"outside {repo_root()}")
    print(
        f"tracking: MLflow experiment '{EXPERIMENT}' in {uri} keeps its artifacts in {experiment.artifact_location}, "
        f"outside this project {repo_root()} (a copy, a clone or a move that brought mlflow.db along); logging to "
        f"experiment '{own_name}', artifacts in {artifact_root()}",
        file=sys.stderr,
    )
    return own.experiment_id


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """Open the MLflow run for one stage; yields the `mlflow` module for logging inside it."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(mlflow, uri)
    exp_name = os.environ.get("DVC_EXP_NAME", "workspace")
    tags = {"dvc.stage": stage, "dvc.exp_name": exp_name}
    if commit := _git_commit():
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{exp_name}/{stage}", tags=tags):
        if params:
            flat = {mlflow_key(k): ("" if v is None else str(v)[:500]) for k, v in flatten(params).items()}
            items = list(flat.items())
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                mlflow.log_params(dict(items[i : i + 100]))
        yield mlflow


def log_step_metrics(rows: Iterable[Mapping[str, Any]], step_key: str = "step") -> int:
    """Log {step, name: value, ...} rows to the active run as metrics by step; None values are skipped."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(key, float(value), now, int(row[step_key]))
        for row in rows
        for key, value in row.items()
        if key != step_key and value is not None
    ]
    client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
    for i in range(0, len(metrics), 1000):  # log_batch caps a call at 1000 metrics
        client.log_batch(run_id, metrics=metrics[i : i + 1000])
    return len(metrics)


def log_model_dir(local_dir: str | os.PathLike, name: str, model_type: str, params: Mapping[str, Any] | None = None):
    """Log a saved model folder (e.g. a LoRA adapter) as an MLflow 3 LoggedModel `name`, linked to the
    active run, so it shows under the run's Logged models and `mlflow.search_logged_models`."""
    import mlflow

    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    flat = {k: str(v)[:500] for k, v in flatten(params or {}).items()}
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run.info.run_id, params=flat or None, model_type=model_type
    )
    try:
        client.log_model_artifacts(model.model_id, str(Path(local_dir)))
    except Exception:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    return client.finalize_logged_model(model.model_id, "READY")
