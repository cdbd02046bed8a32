"""The sweep users run: two queued experiments (`dvc exp run --queue -S lr=...`) run two at a time
(`dvc queue start -j 2`), in a copy of the project at smoke sizes.

Both finish, `dvc exp show` lists both with their lr and sft metrics, and every MLflow run of each
experiment carries the experiment's name in tag `dvc.exp_name`. What the experiments rerun is set
by TARGET: the whole pipeline after the baseline (sft, package, eval: everything lr reaches), or
only sft when RAGTUNE_SWEEP_TARGET=sft (for a machine where that is too slow)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, copy_project, project_env, run

TARGET = os.environ.get("RAGTUNE_SWEEP_TARGET", "")  # "" = the whole pipeline; "sft" = up to sft
EXPERIMENTS = {"sweep-lr-1e-3": 1e-3, "sweep-lr-2e-3": 2e-3}


def queue_status(work: Path, env: dict) -> str:
    return run(["dvc", "queue", "status"], work, env, timeout=120).stdout


def exp_rows(shown: list) -> dict[str, dict]:
    """`dvc exp show --json`: experiment name -> its row (params and metrics by file)."""
    rows = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    rows[rev["name"]] = rev
    return rows


@pytest.mark.slow
def test_two_queued_lr_experiments_run_two_at_a_time_and_are_tracked(tmp_path, mirror):
    import mlflow

    timings: dict[str, float] = {}
    work = copy_project(tmp_path / "copy")
    for built in ("data/raw", "data/prepared", "models/base"):  # fetch/split outputs: reused when present
        if (ROOT / built).exists() and any((ROOT / built).iterdir()):
            shutil.copytree(ROOT / built, work / built, symlinks=True, dirs_exist_ok=True)
    # The queue runs each experiment from a git commit (plus the workspace's changes): commit this copy's
    # tree (the main checkout is untouched), and import ragtune from the copy, not from the editable install.
    env = project_env(mirror, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(work))
    git = ["git", "-c", "user.name=sweep", "-c", "user.email=sweep@test"]
    run([*git, "add", "-A"], work, env)
    run([*git, "commit", "-q", "--no-verify", "-m", "sweep test: the working tree"], work, env)

    target = [TARGET] if TARGET else []
    started = time.monotonic()
    run(["dvc", "exp", "run", *target, "-S", "profile=smoke"], work, env, timeout=3600)  # the baseline
    timings["baseline"] = time.monotonic() - started
    run([*git, "add", "-A"], work, env)
    run([*git, "commit", "-q", "--no-verify", "-m", "sweep test: the smoke baseline"], work, env)

    for name, lr in EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", *target, "-n", name, "-S", "profile=smoke", "-S", f"lr={lr}"], work, env)
    queued = queue_status(work, env)
    assert all(name in queued for name in EXPERIMENTS) and queued.count("Queued") == 2, queued

    started = time.monotonic()
    # The workers outlive `dvc queue start` and inherit its output: a file, not a pipe run() would wait on.
    with open(tmp_path / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True, timeout=300)
    deadline = time.monotonic() + 3600
    peak_running = 0
    while time.monotonic() < deadline:
        status = queue_status(work, env)
        peak_running = max(peak_running, status.count("Running"))
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    timings["queue"] = time.monotonic() - started
    with contextlib.suppress(AssertionError):
        run(["dvc", "queue", "stop"], work, env, timeout=120)  # the idle workers
    logs = {name: subprocess.run(["dvc", "queue", "logs", name], cwd=work, env=env, capture_output=True, text=True,
                                 check=False).stdout[-3000:] for name in EXPERIMENTS}
    assert status.count("Success") == 2 and "Failed" not in status, (status, logs)

    shown = exp_rows(json.loads(run(["dvc", "exp", "show", "--json"], work, env).stdout))
    for name, lr in EXPERIMENTS.items():
        assert name in shown, list(shown)
        data = shown[name]["data"]
        assert data["params"]["params.yaml"]["data"]["lr"] == lr
        sft_metrics = data["metrics"]["reports/sft/metrics.json"]["data"]
        assert sft_metrics["steps"] == 3  # the smoke profile's sft
        if not TARGET:
            assert "reports/eval/metrics.json" in data["metrics"]

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")  # DVC_ROOT: the copy, not the queue's temp folders
    runs = mlflow.search_runs(experiment_names=["ragtune"])
    sft = {name: runs[(runs["tags.dvc.exp_name"] == name) & (runs["tags.dvc.stage"] == "sft")].iloc[0]
           for name in EXPERIMENTS}
    first, second = sft.values()
    # -j 2: the two experiments' sft runs overlap in time (and the queue showed both Running at once)
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"], sft
    for name, lr in EXPERIMENTS.items():
        mine = runs[runs["tags.dvc.exp_name"] == name]
        stages = set(mine["tags.dvc.stage"])
        assert "sft" in stages and (TARGET or {"package", "eval"} <= stages), (name, stages)
        assert set(mine["status"]) == {"FINISHED"}
        sft = mine[mine["tags.dvc.stage"] == "sft"].iloc[0]
        assert float(sft["params.lr"]) == lr
    print(f"\nsweep ({'up to ' + TARGET if TARGET else 'whole pipeline'}): baseline {timings['baseline']:.0f} s, "
          f"two queued experiments with -j 2: {timings['queue']:.0f} s (at most {peak_running} seen Running at "
          f"once); MLflow runs per experiment: "
          + ", ".join(f"{n}: {sorted(set(runs[runs['tags.dvc.exp_name'] == n]['tags.dvc.stage']))}" for n in EXPERIMENTS))
