"""vLLM as a managed engine (ragtune.engine), against tests/standin_vllm.py put on PATH as `vllm`:
the same command line and OpenAI API on loopback, with misbehaviour on demand.

Fast tests use the stand-in's echo mode; the slow ones answer with the real SmolLM2 (+ a LoRA
adapter): `stages/eval.py` with eval.backend=vllm, and `ragtune serve --backend vllm`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ragtune.config import compose
from ragtune.engine import EngineError, VllmConfig, VllmEngine, vllm_command
from tests.conftest import ROOT, free_port, project_env, wait_until_healthy

STANDIN = ROOT / "tests" / "standin_vllm.py"


@pytest.fixture
def standin(tmp_path, monkeypatch) -> Path:
    """A bin folder holding `vllm` (the stand-in), first on PATH; echo mode unless a test says otherwise."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vllm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RAGTUNE_STANDIN_ECHO", "1")
    return bin_dir


@pytest.fixture
def fake_model(tmp_path) -> tuple[Path, Path]:
    """(base, adapter) folders with just the files the engine checks (the echo stand-in loads nothing)."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (base / "config.json").write_text("{}")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    return base, adapter


def config(**kw) -> VllmConfig:
    return VllmConfig(port=free_port(), startup_timeout=60, **kw)


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state == "Z"


def test_start_health_batched_requests_with_bounded_concurrency_then_stop(standin, fake_model, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGTUNE_STANDIN_DELAY", "0.3")
    monkeypatch.setenv("RAGTUNE_STANDIN_CHILD", "1")  # a worker in the group, as vLLM's engine core
    base, adapter = fake_model
    cfg = config(max_concurrency=3)
    log = tmp_path / "vllm.log"
    with VllmEngine(cfg, base, adapter, log_path=log, dtype="bfloat16") as engine:
        pgid = engine.pgid
        assert engine.alive()
        models = httpx.get(f"{engine.url}/models").json()
        assert {m["id"] for m in models["data"]} == {"ragtune-base", "ragtune"}
        generator = engine.generator()
        questions = [f"question {i} please" for i in range(10)]
        started = time.monotonic()
        answers = generator.generate(questions, 8)
        took = time.monotonic() - started
        assert answers == [f"echo: {q}" for q in questions]  # in order, through the LoRA module's name
        assert "".join(generator.stream("hello there", 8)) == "echo: hello there"
        stats = httpx.get(f"http://127.0.0.1:{cfg.port}/standin/stats").json()
        assert stats["requests"] == 11
        assert stats["peak_in_flight"] == 3  # never more than max_concurrency, and it is used
        assert took >= 0.3 * 10 / 3 - 0.05  # 10 requests of 0.3 s, three at a time
        argv = stats["argv"]
        assert argv[argv.index("--lora-modules") + 1] == f"ragtune={adapter}"
        assert argv[argv.index("--max-lora-rank") + 1] == "4" and "--enable-lora" in argv
        assert argv[argv.index("--dtype") + 1] == "bfloat16"  # the resolved top-level dtype
        child = stats["child_pid"]
    assert engine.proc is None and group_gone(pgid) and pid_gone(child)  # the whole group stopped
    assert "ragtune: " in log.read_text() and "standin vllm: serve" in log.read_text()
    engine.stop()  # twice is harmless


def test_a_missing_binary_fails_before_anything_starts(fake_model, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    engine = VllmEngine(config(), *fake_model)
    with pytest.raises(EngineError, match="'vllm' not found on PATH: install vLLM"):
        engine.start()
    assert engine.proc is None and engine.log_path is None


def test_missing_model_folder_or_busy_port_fail_before_start(standin, fake_model, tmp_path):
    base, adapter = fake_model
    with pytest.raises(EngineError, match="no config.json"):
        VllmEngine(config(), tmp_path / "nope", adapter).start()
    with pytest.raises(EngineError, match="not a LoRA adapter"):
        VllmEngine(config(), base, tmp_path).start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cfg = VllmConfig(port=busy.getsockname()[1])
        engine = VllmEngine(cfg, base, adapter)
        with pytest.raises(EngineError, match="already in use"):
            engine.start()
        assert engine.proc is None


def test_dying_at_start_names_the_exit_code_and_the_log(standin, fake_model, monkeypatch):
    monkeypatch.setenv("RAGTUNE_STANDIN_DIE_ON_START", "3")
    engine = VllmEngine(config(), *fake_model)  # no log_path: a temporary log file
    with pytest.raises(EngineError) as err:
        engine.start()
    message = str(err.value)
    assert "vllm exited with code 3 while starting" in message
    assert str(engine.log_path) in message and "dying on start as asked" in message  # its last line
    assert engine.proc is None
    engine.log_path.unlink()


def test_dying_mid_run_makes_the_next_request_fail_clearly(standin, fake_model, monkeypatch, tmp_path):
    monkeypatch.setenv("RAGTUNE_STANDIN_DIE_AFTER", "2")
    log = tmp_path / "vllm.log"
    with VllmEngine(config(max_concurrency=1), *fake_model, log_path=log) as engine:
        generator = engine.generator()
        assert generator.generate(["one", "two"], 4) == ["echo: one", "echo: two"]
        with pytest.raises(EngineError, match=f"vllm exited with code 7 while answering \\(its output: {log}"):
            generator.generate(["three"], 4)
        assert not engine.alive()
    assert engine.returncode == 7


def test_startup_timeout_stops_the_process_group(standin, fake_model, monkeypatch):
    monkeypatch.setenv("RAGTUNE_STANDIN_START_DELAY", "60")
    monkeypatch.setenv("RAGTUNE_STANDIN_CHILD", "1")
    cfg = VllmConfig(port=free_port(), startup_timeout=2)
    engine = VllmEngine(cfg, *fake_model)
    started = time.monotonic()
    with pytest.raises(EngineError, match="did not answer on .* within 2 s; stopped it"):
        engine.start()
    assert time.monotonic() - started < 30
    assert engine.proc is None and engine.returncode == -signal.SIGTERM
    assert not port_open(cfg.port)


def metrics_dtype(work: Path) -> str:
    from ragtune.config import read_params
    from ragtune.devices import placement

    common = read_params(work / "params.yaml").common()
    return placement(common.device, common.dtype)[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_command_for_a_merged_model_names_no_adapter(tmp_path):
    cmd = vllm_command(tmp_path, None, port=9, extra_args=["--gpu-memory-utilization", "0.8"])
    assert cmd[:3] == ["vllm", "serve", str(tmp_path)] and "--enable-lora" not in cmd
    assert cmd[-2:] == ["--gpu-memory-utilization", "0.8"]


# --------------------------------------------------------------------------- the real model, through eval and serve


@pytest.fixture(scope="module")
def tiny_bundle(mirror, base_generator, tmp_path_factory) -> Path:
    """tests/bundle_fixtures' small bundle with a small random LoRA adapter (r=4)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.bundle_fixtures import build_small_bundle
    from tests.test_export import random_adapter

    folder = tmp_path_factory.mktemp("vllm_bundle")
    model = AutoModelForCausalLM.from_pretrained(str(base_generator), dtype=torch.float32)
    adapter = random_adapter(model, folder / "adapter", r=4, std=0.002)
    return build_small_bundle(mirror, base_generator, folder / "small", adapter)


def eval_sets(mirror: Path, prepared: Path, bundle: Path) -> None:
    """data/prepared/cmrc_eval.jsonl from the bundle's KB articles' questions, and two maths questions."""
    from ragtune.data import Report, load_cmrc

    chunks = [json.loads(line) for line in (bundle / "kb.jsonl").read_text().splitlines()]
    by_article: dict[str, list[dict]] = {}
    for chunk in chunks:
        by_article.setdefault(chunk["article_id"], []).append(chunk)
    rows = []
    for article in load_cmrc(mirror / "cmrc2018" / "cmrc2018_dev.json", Report()):
        for q in article.questions[:1]:
            if article.id not in by_article:
                continue
            answers = [a for a, _ in q.answers]
            gold = [c for c in by_article[article.id] if answers[0] in c["text"]] or by_article[article.id][:1]
            rows.append({"id": q.id, "question": q.question, "answers": answers, "article_id": article.id,
                         "gold_chunk_ids": [c["chunk_id"] for c in gold], "context": gold[0]["text"]})
    prepared.mkdir(parents=True)
    (prepared / "cmrc_eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    maths = [{"id": "gsm8k-test-0", "question": "Tom has 3 apples and buys 5 more. How many apples does he have?",
              "answer": "8"},
             {"id": "gsm8k-test-1", "question": "A box holds 4 pens. How many pens do 3 boxes hold?", "answer": "12"}]
    (prepared / "gsm8k_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in maths))


@pytest.mark.slow
def test_eval_stage_with_the_vllm_backend_writes_metrics(tiny_bundle, mirror, standin, tmp_path, monkeypatch):
    monkeypatch.delenv("RAGTUNE_STANDIN_ECHO")  # the real model + adapter answer
    work = tmp_path / "project"
    eval_sets(mirror, work / "data/prepared", tiny_bundle)
    params = yaml.safe_load(compose(["profile=smoke"], config_dir=ROOT / "conf"))
    params["eval"].update(backend="vllm", similarity=False, log_model=False)
    params["vllm"].update(port=free_port(), startup_timeout=300, max_concurrency=4)
    (work / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    (work / "dvc.yaml").write_text("stages: {}\n")
    env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", OMP_NUM_THREADS="1")
    env["PATH"] = f"{standin}{os.pathsep}{env['PATH']}"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "stages/eval.py"), "--bundle", str(tiny_bundle), "--out",
                           "reports/eval_base"], cwd=work, env=env, capture_output=True, text=True, timeout=900, check=False)
    print(f"\neval with eval.backend=vllm (stand-in, real SmolLM2 + adapter): {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    metrics = json.loads((work / "reports/eval_base/metrics.json").read_text())
    assert metrics["tuned"]["questions"]
    log = (tiny_bundle.parent / "vllm.log").read_text()
    assert "--enable-lora --lora-modules ragtune=" in log and "--max-lora-rank 4" in log
    assert f"--dtype {metrics_dtype(work)}" in log
    predictions = list((work / "reports/eval_base/predictions").glob("*.jsonl"))
    assert predictions and all(p.read_text().strip() for p in predictions)
    # the engine is stopped when the stage ends: nothing listens on its port any more
    assert not port_open(params["vllm"]["port"])


@pytest.mark.slow
def test_serve_with_the_vllm_backend_answers_and_stops_the_engine_on_exit(tiny_bundle, standin, tmp_path):
    vllm_port, serve_port = free_port(), free_port()
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump({"device": "cpu", "dtype": "float32", "serve": {},
                                                      "vllm": {"port": vllm_port, "startup_timeout": 120}}))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # PATH with the stand-in, echo mode
    serve = subprocess.Popen([sys.executable, "-m", "ragtune.cli", "serve", str(tiny_bundle), "--backend", "vllm",
                              "--port", str(serve_port)], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(serve, serve_port, timeout=300)
        reply = httpx.post(f"http://127.0.0.1:{serve_port}/v1/chat/completions", timeout=60,
                           json={"model": "ragtune", "messages": [{"role": "user", "content": "《战国无双3》是由哪两个公司合作开发的？"}]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].startswith("echo:")
        stats = httpx.get(f"http://127.0.0.1:{vllm_port}/standin/stats").json()
        assert stats["requests"] >= 1
    finally:
        serve.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn returns, the engine's `with` block stops vllm
        out = serve.communicate(timeout=60)[0]
    assert serve.returncode == 0, out[-3000:]
    assert not port_open(vllm_port), "vllm outlived ragtune serve"
