"""Every stage script answers --help (without running the stage or opening an MLflow run) and takes
--params; a bad params file is one clear line on stderr and exit code 1, never a traceback."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, project_env

STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))


@pytest.mark.parametrize("stage", STAGES)
def test_help_runs_nothing(stage, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / f"{stage}.py"), "--help"], cwd=tmp_path,
                          env=project_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--params" in proc.stdout
    assert not list(tmp_path.iterdir())  # no mlflow.db, no outputs


def test_a_bad_params_file_is_one_clear_line(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["router"]["ngram_max"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "router.py"), "--params", "bad.yaml"],
                          cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("router: bad.yaml:") and "router.ngram_max" in proc.stderr
    assert "Traceback" not in proc.stderr
