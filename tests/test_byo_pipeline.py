"""Bring your own data, end to end: in a copy of the project, `dvc exp run -S data=custom -S profile=smoke`
runs every stage on examples/ (12 documents, reading and maths questions), then `ragtune serve` answers
one of its held-out questions from the right document; editing a document makes fetch (and what follows)
stale."""

import json
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from tests.conftest import copy_project, free_port, project_env, run, wait_until_healthy

pytestmark = pytest.mark.slow

QUESTION = "岚峰灯塔塔顶的铜钟有多重？"  # examples/reading_eval.jsonl zh-ev-01: held out, answered in docs/zh_lighthouse.md


def test_examples_through_the_whole_pipeline_then_served(tmp_path):
    project = copy_project(tmp_path / "project")
    env = project_env(OMP_NUM_THREADS="1")
    dvc = [sys.executable, "-m", "dvc"]
    started = time.time()
    run(dvc + ["exp", "run", "-S", "data=custom", "-S", "profile=smoke"], project, env, timeout=3600)
    print(f"dvc exp run (data=custom, smoke): {time.time() - started:.0f} s")

    sums = (project / "data" / "raw" / "SHA256SUMS").read_text().splitlines()
    assert any(line.endswith("  custom/docs/zh_lighthouse.md") for line in sums) and len(sums) == 12 + 5
    stats = json.loads((project / "data" / "prepared" / "stats.json").read_text(encoding="utf-8"))
    assert stats["reading"]["train_questions"] == 40 and stats["reading"]["eval_questions"] == 6
    assert stats["reading"]["unanswerable_kept_out"] == 2 and stats["maths"]["train"] == 12
    distilled = json.loads((project / "data" / "distill" / "distilled_train.json").read_text(encoding="utf-8"))
    maths = [json.loads(line) for line in (project / "data" / "prepared" / "gsm8k_train.jsonl").read_text().splitlines()]
    assert len(distilled) == sum(1 for m in maths if m["rationale"]) > 0  # simple {id, question, answer} rows have none
    metrics = json.loads((project / "reports" / "eval" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["tuned"]["questions"]["cmrc"] == 4 and metrics["tuned"]["questions"]["gsm8k"] == 2
    router = json.loads((project / "reports" / "router" / "metrics.json").read_text(encoding="utf-8"))
    assert router["accuracy"] >= 0.8
    lock = (project / "dvc.lock").read_text(encoding="utf-8")
    assert "path: examples\n" in lock  # fetch depends on the data folder (dvc.yaml's ${data.local_dir})

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "ragtune.cli", "serve", "bundle", "--port", str(port), "--threads", "1"],
                              cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(server, port)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        resp = client.chat.completions.create(model="ragtune", messages=[{"role": "user", "content": QUESTION}],
                                              max_tokens=16)
        extra = resp.model_extra["ragtune"]
        assert extra["route"] == "reading"
        assert extra["sources"][0]["chunk_id"].startswith("zh_lighthouse-")
        print("served answer:", resp.choices[0].message.content, [s["chunk_id"] for s in extra["sources"]])
    finally:
        server.terminate()
        server.wait(timeout=30)

    # an edited document makes fetch stale (and so everything after it)
    before = run(dvc + ["status", "fetch"], project, env).stdout
    assert "changed deps" not in before
    with open(project / "examples" / "docs" / "en_bakery.md", "a", encoding="utf-8") as fh:
        fh.write("\nThe bakery also sells rye bread on Mondays.\n")
    after = run(dvc + ["status", "fetch"], project, env).stdout
    assert "changed deps" in after and "examples" in after
