"""`dvc repro split` on the data mirror, in a fresh copy of the project, as a user runs it."""

import json

import pytest

from tests.conftest import copy_project, project_env, run

pytestmark = pytest.mark.slow


def test_dvc_repro_split_on_the_mirror(mirror, tmp_path):
    proj = copy_project(tmp_path / "proj")
    env = project_env(mirror)
    run(["dvc", "repro", "split"], proj, env)
    prepared = proj / "data" / "prepared"
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["cmrc"]["train_questions"] == 3219 and stats["cmrc"]["eval_questions"] == 1000  # 2 trial questions are blank
    assert stats["leak_check"]["passed"] and (stats["gsm8k"]["train"], stats["gsm8k"]["eval"]) == (7473, 1319)
    assert stats["cmrc"]["repaired_answer_start_relocated"] > 0
    assert len((prepared / "cmrc_train.jsonl").read_text(encoding="utf-8").splitlines()) == 3219
    assert (proj / "models" / "base" / "generator" / "model.safetensors").exists()
    assert (proj / "models" / "base" / "embedder" / "modules.json").exists()
    # a second repro has nothing to do
    again = run(["dvc", "repro", "split"], proj, env)
    assert "Running stage" not in again.stdout
    # the MLflow runs landed in the project's own database, one per stage
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ragtune").experiment_id])
    assert sorted(r.data.tags["dvc.stage"] for r in runs) == ["fetch", "split"]
