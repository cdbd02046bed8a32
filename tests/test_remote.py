"""Sharing through a DVC remote: in a copy of the project, the package stages build the bundle,
`dvc push` sends what serving needs to a local-folder remote, and a fresh `git clone` + `dvc pull`
serves answers with `ragtune serve` without any training."""

import json
import shutil
import subprocess
import sys

import pytest
from openai import OpenAI

from tests.bundle_fixtures import READING_QUESTION, small_kb, small_router, tiny_adapter
from tests.conftest import (
    ROOT,
    copy_project,
    free_port,
    project_env,
    run,
    wait_until_healthy,
)

pytestmark = pytest.mark.slow


def test_push_then_fresh_clone_pull_and_serve(mirror, base_generator, tmp_path):
    env = project_env(mirror)
    project = copy_project(tmp_path / "project")
    # Upstream outputs as the pipeline leaves them (copied, not rebuilt).
    # (built here when this checkout has not run fetch, as in a fresh clone)

    from ragtune.config import read_params
    from ragtune.models import EmbedderConfig, materialize_embedder
    from ragtune.sources import DataConfig, fetch_datasets

    params = read_params(project / "params.yaml")
    if (ROOT / "data" / "raw").exists():
        shutil.copytree(ROOT / "data" / "raw", project / "data" / "raw")
    else:
        fetch_datasets(params.group("data", DataConfig).datasets, project / "data" / "raw", mirror)
    shutil.copytree(base_generator, project / "models" / "base" / "generator")
    if (ROOT / "models" / "base" / "embedder").exists():
        shutil.copytree(ROOT / "models" / "base" / "embedder", project / "models" / "base" / "embedder")
    else:
        materialize_embedder(params.group("embedder", EmbedderConfig), project / "models" / "base" / "embedder")
    (project / "data" / "prepared").mkdir(parents=True)
    small_kb(mirror, project / "data" / "prepared" / "kb.jsonl")
    # package_base calibrates its abstention gate on the training reading questions: none here, so no gate
    (project / "data" / "prepared" / "cmrc_train.jsonl").write_text("", encoding="utf-8")
    small_router(mirror, project / "models" / "router")
    (project / "reports" / "router").mkdir(parents=True)
    (project / "reports" / "router" / "metrics.json").write_text('{"accuracy": null}\n')
    shutil.copytree(project / "models" / "base" / "embedder", project / "models" / "embed_ft")  # unused by BM25
    tiny_adapter(project / "models" / "base" / "generator", project / "models" / "sft" / "adapter")

    dvc = [sys.executable, "-m", "dvc"]
    run(dvc + ["config", "--local", "cache.type", "hardlink,copy"], project, env)
    run(dvc + ["commit", "-f", "fetch"], project, env)
    run(dvc + ["repro", "--single-item", "package_base"], project, env, timeout=600)
    run(dvc + ["repro", "--single-item", "package"], project, env, timeout=600)
    remote = tmp_path / "remote"
    run(dvc + ["remote", "add", "-d", "storage", str(remote)], project, env)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    run(git + ["add", "dvc.lock", ".dvc/config", "dvc.yaml"], project, env)
    run(git + ["commit", "-qm", "bundle and remote"], project, env)
    run(dvc + ["push", "bundle", "models/base/generator"], project, env, timeout=600)

    fresh = tmp_path / "fresh"
    run(["git", "clone", "-q", str(project), str(fresh)], tmp_path, env)
    assert not (fresh / "bundle").exists()
    run(dvc + ["pull", "bundle", "models/base/generator"], fresh, env, timeout=600)
    manifest = json.loads((fresh / "bundle" / "manifest.json").read_text())
    assert manifest["adapter"] == "adapter" and manifest["retriever"] == "bm25"

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ragtune.cli", "serve", "bundle", "--port", str(port), "--verify", "full"],
        cwd=fresh, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_until_healthy(server, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model="ragtune", messages=[{"role": "user", "content": READING_QUESTION}], max_tokens=2
        )
        assert resp.model_extra["ragtune"]["route"] == "reading" and resp.model_extra["ragtune"]["sources"]
    finally:
        server.terminate()
        server.wait(timeout=30)
