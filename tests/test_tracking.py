"""ragtune.tracking: the run's tags and params (never a secret), metrics by step, a logged model folder."""

from __future__ import annotations

import pytest

from ragtune import tracking


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """A throwaway tracking store; DVC_ROOT as `dvc exp run` sets it."""
    import subprocess

    import mlflow

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
        cwd=tmp_path,
        check=True,
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lair")
    yield tmp_path
    mlflow.set_tracking_uri(None)


def test_uri_is_absolute_under_dvc_root(tracked, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path.parent)  # a queued experiment runs elsewhere; the store stays put
    assert tracking.tracking_uri() == f"sqlite:///{tracked / 'mlflow.db'}"
    assert tracking.artifact_root() == (tracked / "mlartifacts").as_uri()


def test_flatten_drops_secrets_keeps_env_var_names():
    flat = tracking.flatten(
        {
            "lr": 1e-4,
            "teacher": {"api_key": "abc", "api_key_env": "OPENAI_API_KEY", "base_url": "http://x"},
            "hub": {"token": "hf_x", "auth": "Bearer abc", "note": "sk-123"},
        }
    )
    assert flat == {"lr": 1e-4, "teacher.api_key_env": "OPENAI_API_KEY", "teacher.base_url": "http://x"}


def test_stage_run_tags_params_step_metrics_and_model(tracked, tmp_path):
    import mlflow
    from mlflow.entities import LoggedModelStatus

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    with tracking.stage_run("sft", {"lr": 1e-4, "sft": {"lora": {"r": 8}}, "api_key": "sk-x"}) as run_mlflow:
        tracking.log_step_metrics([{"step": 1, "loss": 2.0, "eval_loss": None}, {"step": 2, "loss": 1.0}])
        tracking.log_model_dir(folder, name="sft-adapter", model_type="peft-lora")
        run_id = run_mlflow.active_run().info.run_id

    run = mlflow.get_run(run_id)
    assert run.data.tags["dvc.stage"] == "sft" and run.data.tags["dvc.exp_name"] == "bushy-lair"
    assert len(run.data.tags["git.commit"]) == 40
    assert run.data.params == {"lr": "0.0001", "sft.lora.r": "8"}
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
    assert mlflow.MlflowClient().get_metric_history(run_id, "eval_loss") == []
    (model,) = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'", output_format="list"
    )
    assert model.name == "sft-adapter" and model.status == LoggedModelStatus.READY
    files = [f.path for f in mlflow.MlflowClient().list_logged_model_artifacts(model.model_id)]
    assert files == ["adapter_config.json"]
    assert model.artifact_location.startswith((tracked / "mlartifacts").as_uri())


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_copied_project_logs_artifacts_into_its_own_folder(tmp_path, monkeypatch, capsys):
    """mlflow.db records the experiment's absolute artifact folder; a copy of the project (or a clone
    that brought mlflow.db along) must not log into the original checkout."""
    import shutil
    from pathlib import Path
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)  # the root is the folder holding dvc.yaml
    original = tmp_path / "original"
    original.mkdir()
    (original / "dvc.yaml").write_text("stages: {}\n")
    (original / "report.txt").write_text("from the original\n")
    monkeypatch.chdir(original)
    try:
        with tracking.stage_run("split") as run_mlflow:
            run_mlflow.log_artifact(str(original / "report.txt"))
            first = run_mlflow.active_run().info
        assert first.artifact_uri.startswith((original / "mlartifacts").as_uri())
        assert "tracking:" not in capsys.readouterr().err  # nothing to say in the original

        copy = tmp_path / "elsewhere" / "copy"
        shutil.copytree(original, copy)  # mlflow.db and mlartifacts included
        before = _files(original)
        (copy / "report.txt").write_text("from the copy\n")
        monkeypatch.chdir(copy)
        # as a fresh stage process in the copy: mlflow.set_tracking_uri exported the original's store
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runs = []
        for stage in ("split", "sft"):  # the second run finds the copy's experiment made by the first
            with tracking.stage_run(stage) as run_mlflow:
                run_mlflow.log_artifact(str(copy / "report.txt"))
                runs.append(run_mlflow.active_run().info)
        err = capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(None)

    assert _files(original) == before  # the original gained nothing, its mlflow.db included
    for info in runs:
        assert info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
        logged = Path(url2pathname(urlparse(info.artifact_uri).path)) / "report.txt"
        assert logged.is_relative_to(copy / "mlartifacts") and logged.read_text() == "from the copy\n"
    assert runs[0].experiment_id == runs[1].experiment_id != first.experiment_id
    experiment = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_experiment(runs[0].experiment_id)
    assert experiment.name == f"ragtune ({copy})"
    assert f"keeps its artifacts in {(original / 'mlartifacts').as_uri()}" in err
    assert f"logging to experiment 'ragtune ({copy})'" in err
