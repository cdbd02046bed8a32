"""The eval stage end to end with an 'oracle' OpenAI-compatible endpoint on loopback (answers the gold),
so every number it reports is known; the transformers backend is covered by test_inference."""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ragtune.evaluate import load_rows, run_cmrc, run_math
from ragtune.inference import OpenAIGenerator
from ragtune.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def _oracle_handler(cmrc_answers: dict[str, str], math_answers: dict[str, str]):
    class Oracle(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            if match := re.search(r"### 问题:(.*)\n$", prompt):
                answer = cmrc_answers.get(match.group(1), "不知道")
            else:
                question = prompt.split("\n\nPlease reason")[0]
                answer = f"Step by step... the answer is \\boxed{{{math_answers.get(question, 'x')}}}."
            data = json.dumps({
                "id": "o", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer}}],
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    return Oracle


@pytest.fixture(scope="module")
def oracle_url(prepared_dir):
    cmrc = load_rows(prepared_dir / "cmrc_eval.jsonl", ("question", "answers"))
    gsm8k = load_rows(prepared_dir / "gsm8k_eval.jsonl", ("question", "answer"))
    handler = _oracle_handler({r["question"]: r["answers"][0] for r in cmrc}, {r["question"]: r["answer"] for r in gsm8k})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def embedder(embedder_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_dir), device="cpu")


def test_tasks_score_an_oracle_perfectly(oracle_url, embedder, prepared_dir):
    oracle = OpenAIGenerator(oracle_url, "oracle", max_concurrency=4)
    rows = load_rows(prepared_dir / "cmrc_eval.jsonl", ("id", "question", "answers", "context"))[:5]
    examples, summary = run_cmrc(oracle, rows, 64, embedder)
    assert summary | {"seconds": 0} == pytest.approx(
        {"official_em": 1.0, "official_f1": 1.0, "strict_em": 1.0, "normalized_em": 1.0, "containment": 1.0, "similarity": 1.0,
         "n": 5, "seconds": 0}, abs=1e-5)
    assert [e["id"] for e in examples] == [r["id"] for r in rows]

    wrong = [dict(r, answers=["完全不同的答案"]) for r in rows[:2]]
    _, summary = run_cmrc(oracle, wrong, 64, embedder)
    assert summary["official_em"] == 0.0 and summary["containment"] == 1.0  # copied, but not the gold

    maths = load_rows(prepared_dir / "gsm8k_eval.jsonl", ("id", "question", "answer"))[:4]
    examples, summary = run_math(oracle, maths, 256)
    assert summary["accuracy"] == 1.0 and summary["format_boxed"] == 4 and summary["format_failures"] == 0
    assert all(e["correct"] == 1.0 and e["format"] == "boxed" for e in examples)


def test_markdown_table_rows_and_reference_note():
    table = markdown_table(
        {"base": {"cmrc_gold": {"official_em": 0.0}, "gsm8k": {"accuracy": 0.0625}},
         "tuned": {"cmrc_gold": {"official_em": 0.25}}},
        {"seed_gpu": "not published in this repo"},
    )
    lines = table.strip().splitlines()
    assert lines[0].startswith("| generator | CMRC gold EM |")
    assert lines[2].startswith("| base | 0.0 |") and lines[2].endswith("| 6.2 |")
    assert lines[3].startswith("| tuned | 25.0 |") and lines[3].endswith("| – |")
    assert lines[4].startswith("| seed_gpu (reference) | not published in this repo |")


def test_eval_stage_end_to_end_with_an_endpoint(oracle_url, tmp_path, monkeypatch, prepared_dir, embedder_dir):
    """stages/eval.py on the smoke sizes with only the oracle endpoint: files, metrics, MLflow run."""
    import mlflow

    from ragtune.config import compose

    for rel, target in (("data/prepared", prepared_dir), ("models/base/embedder", embedder_dir)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(target)
    params = yaml.safe_load(compose(["profile=smoke"], config_dir=ROOT / "conf"))
    params["eval"]["endpoints"] = {"oracle": {"base_url": oracle_url, "model": "oracle"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root for ragtune.config
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    spec = importlib.util.spec_from_file_location("eval_stage", ROOT / "stages" / "eval.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main(["--generators", "oracle"])

    out = tmp_path / "reports" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["oracle"]["cmrc_gold"]["official_em"] == 1.0
    assert metrics["oracle"]["cmrc_gold"]["n"] == params["eval"]["cmrc_samples"]
    assert metrics["oracle"]["gsm8k"]["accuracy"] == 1.0
    assert 0.5 < metrics["retrieval"]["bm25"]["hit@3"] <= 1.0
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "oracle_cmrc_gold.jsonl", "oracle_cmrc_retrieved.jsonl", "oracle_gsm8k.jsonl"]
    retrieved = [json.loads(line) for line in (out / "predictions" / "oracle_cmrc_retrieved.jsonl").open()]
    assert all(len(r["retrieved_ids"]) <= params["retrieval"]["top_k"] for r in retrieved)
    assert "| oracle | 100.0 |" in (out / "report.md").read_text()
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    run = mlflow.search_runs(experiment_names=["ragtune"], output_format="list")[0]
    assert run.data.metrics["oracle.cmrc_gold.official_em"] == 1.0
    assert run.data.tags["dvc.stage"] == "eval"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"predictions", "report.md", "metrics.json", "comparison.png"} <= artifacts
