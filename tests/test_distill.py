"""The distill loop against a real OpenAI-compatible server on loopback with scripted faults."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ragtune.prompts import math_prompt
from ragtune.teacher import (
    Distiller,
    OpenAITeacherConfig,
    ResponseCache,
    RetryPolicy,
    TeacherConfigError,
    alpaca_rows,
    make_teacher,
)
from tests.conftest import ROOT, project_env
from tests.loopback_teacher import Answer, Hang, LoopbackTeacher, Malformed, Status, by_question, unused_base_url

KEY_ENV, KEY = "RAGTUNE_TEST_TEACHER_KEY", "sk-loopback-SECRET-4242"


def make_items(n: int) -> list[dict]:
    return [{"id": f"q{i}", "question": f"What is {1000 * i} plus 7?", "rationale": "", "answer": f"{1000 * i + 7:,}"}
            for i in range(n)]


def right(item, **kw) -> Answer:
    return Answer(f"So the total is \\boxed{{{item['answer']}}}.", reasoning=f"{item['question']} Add.", **kw)


def wrong(item, **kw) -> Answer:
    return Answer("So the total is \\boxed{-1}.", reasoning="Subtract.", **kw)


def teacher_cfg(base_url: str, timeout: float = 5.0, model: str = "loopback") -> OpenAITeacherConfig:
    return OpenAITeacherConfig(kind="openai", name="loopback", base_url=base_url, model=model, api_key_env=KEY_ENV,
                               system=None, temperature=0.6, top_p=None, max_tokens=64, timeout=timeout)


FAST_RETRY = RetryPolicy(max_retries=3, backoff_base=0.05, backoff_max=0.2, max_retry_after=5.0)


def test_faults_rounds_concurrency_and_a_rerun_that_calls_nothing(tmp_path, monkeypatch):
    items = make_items(12)
    q = [math_prompt(item["question"]) for item in items]
    lat = {"latency": 0.05}
    script = {
        q[0]: [Hang(3.0), right(items[0])],                                  # a timeout, then fine
        q[1]: [Status(429, retry_after=0.4), right(items[1])],              # rate limited
        q[2]: [Status(500), Status(503), right(items[2], **lat)],           # two 5xx
        q[3]: [Malformed(), right(items[3])],                               # broken JSON
        q[4]: [wrong(items[4], **lat), wrong(items[4]), right(items[4])],   # right only in round 3
        q[5]: [Answer("\\boxed{5007}"), right(items[5])],                   # no </think>: rejected
        q[6]: [wrong(items[6], **lat)],                                     # never right: left
        q[7]: [Status(502)],                                                # always down: left
        q[8]: [Status(400), right(items[8])],                               # not retried; next round
        q[9]: [Answer(f"<think>\nadd\n</think>\n\n\\boxed{{{9007.0}}}", **lat)],  # vLLM-style inline think
        q[10]: [right(items[10], **lat)],
        q[11]: [right(items[11], **lat)],
    }
    monkeypatch.setenv(KEY_ENV, KEY)
    with LoopbackTeacher(by_question(script)) as server:
        teacher = make_teacher(teacher_cfg(server.base_url, timeout=0.5))
        with ResponseCache(tmp_path / "cache.jsonl") as cache:
            result = Distiller(teacher, cache, max_rounds=4, concurrency=3, retry=FAST_RETRY, seed=0).run(items)
        calls = server.calls_by_user()
        max_in_flight = server.max_in_flight
        first_429 = [c for c in server.calls if c["user"] == q[1]]

    accepted_ids = [item["id"] for item, _ in result.accepted]
    assert accepted_ids == ["q0", "q1", "q2", "q3", "q4", "q5", "q8", "q9", "q10", "q11"]
    assert [row["id"] for row in result.left] == ["q6", "q7"]
    assert result.left[0]["reason"] == "wrong_answer" and result.left[1]["reason"] == "failed_server_error"
    stats = result.stats
    assert stats["rounds"] == 4 and stats["accepted_per_round"] == [7, 2, 1, 0]
    assert 2 <= max_in_flight <= 3
    # honoured Retry-After: the retry started no sooner than 0.4 s after the 429 went out
    assert first_429[1]["start"] - first_429[0]["end"] >= 0.38
    assert calls[q[7]] == 4 * (FAST_RETRY.max_retries + 1) and calls[q[6]] == 4 and calls[q[4]] == 3
    assert stats["calls"] == sum(calls.values())
    assert stats["errors"]["timeout"] == 1 and stats["errors"]["rate_limited"] == 1
    assert stats["errors"]["malformed"] == 1 and stats["errors"]["client_error"] == 1
    assert stats["errors"]["server_error"] == 2 + calls[q[7]]
    assert stats["rejected"] == {"no_think": 1, "wrong_answer": 2 + 4}
    rows = alpaca_rows(result)
    assert rows[0] == {"instruction": q[0], "input": "", "output":
                       f"<think>\n{items[0]['question']} Add.\n</think>\n\nSo the total is \\boxed{{7}}."}

    # A second run on the same cache replays every answered attempt and calls only for the never-answered item.
    with LoopbackTeacher(by_question(script)) as server:
        teacher = make_teacher(teacher_cfg(server.base_url, timeout=0.5))
        with ResponseCache(tmp_path / "cache.jsonl") as cache:
            again = Distiller(teacher, cache, max_rounds=4, concurrency=3, retry=FAST_RETRY, seed=0).run(items)
        assert set(server.calls_by_user()) == {q[7]}
    assert alpaca_rows(again) == rows
    # q8's 400 cost no attempt, so its round-2 answer (attempt 0) is replayed in round 1 now
    assert again.stats["accepted_per_round"] == [8, 1, 1, 0]
    assert again.stats["cache_hits"] == stats["cache_entries"] and again.stats["calls"] == calls[q[7]]
    assert KEY not in (tmp_path / "cache.jsonl").read_text()


def test_a_rejected_key_stops_the_run_without_showing_it(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    items = make_items(20)
    with LoopbackTeacher(lambda request, n: Status(401, latency=0.05)) as server:
        teacher = make_teacher(teacher_cfg(server.base_url))
        with ResponseCache(tmp_path / "cache.jsonl") as cache, pytest.raises(TeacherConfigError) as err:
            Distiller(teacher, cache, max_rounds=1, concurrency=2, retry=FAST_RETRY, seed=0).run(items)
        assert len(server.calls) < len(items)  # the queued calls were cancelled
    assert KEY not in str(err.value) and "401" in str(err.value)


def test_huge_or_infinite_retry_after_is_capped_and_counted(tmp_path, monkeypatch):
    """`Retry-After: 100000` (a day) or `inf` must neither stall the workers nor crash them: every wait
    is at most distill.max_retry_after, and each cut is counted in stats["errors"]["retry_after_capped"]."""
    items = make_items(3)
    q = [math_prompt(item["question"]) for item in items]
    script = {
        q[0]: [Status(429, retry_after=100000), right(items[0])],
        q[1]: [Status(429, retry_after="inf"), Status(503, retry_after=100000), right(items[1])],
        q[2]: [Status(429, retry_after=1.5), right(items[2])],  # under the cap: honoured as sent, not counted
    }
    waits: list[float] = []
    lock = threading.Lock()

    def record_wait(seconds: float) -> None:  # the workers' sleep, injected: records instead of sleeping
        with lock:
            waits.append(seconds)

    monkeypatch.setenv(KEY_ENV, KEY)
    started = time.monotonic()
    with LoopbackTeacher(by_question(script)) as server:
        teacher = make_teacher(teacher_cfg(server.base_url))
        with ResponseCache(tmp_path / "cache.jsonl") as cache:
            result = Distiller(teacher, cache, max_rounds=1, concurrency=3, retry=FAST_RETRY, seed=0,
                               sleep=record_wait).run(items)
        calls = server.calls_by_user()
    assert time.monotonic() - started < 30  # nobody really slept
    assert [item["id"] for item, _ in result.accepted] == ["q0", "q1", "q2"]
    assert calls == {q[0]: 2, q[1]: 3, q[2]: 2}
    cap = FAST_RETRY.max_retry_after
    assert waits and max(waits) <= cap, waits
    assert cap in waits  # a capped Retry-After is still honoured up to the cap
    assert any(1.5 <= w < cap for w in waits)
    errors = result.stats["errors"]
    assert errors["retry_after_capped"] == 3  # 100000, inf, and the 503's 100000
    assert errors["rate_limited"] == 3 and errors["server_error"] == 1
    assert result.stats["failed_calls"] == 0 and result.stats["retries"] == 4


@pytest.mark.parametrize("server_kind", ["nothing_listening", "mostly_500"])
def test_distill_stage_fails_cleanly_when_too_few_items_are_accepted(tmp_path, server_kind):
    """Teacher calls fail (nothing listens; or 500s for 3 of 4 items): the stage exits 1 with one line on
    stderr naming the cause, no traceback, and writes none of its outs (sft must not train without maths)."""
    items = make_items(4)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "gsm8k_train.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    script = {math_prompt(item["question"]): [right(item) if i == 0 else Status(500)] for i, item in enumerate(items)}
    env = project_env(**{KEY_ENV: KEY, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with LoopbackTeacher(by_question(script)) as server:
        base_url = unused_base_url() if server_kind == "nothing_listening" else server.base_url
        params = {
            "seed": 1,
            "distill": {"max_items": None, "max_rounds": 2, "concurrency": 2, "max_retries": 1,
                        "backoff_base": 0.01, "backoff_max": 0.02, "progress": False, "min_accepted_share": 0.5},
            "teacher": teacher_cfg(base_url, timeout=2.0).model_dump(),
        }
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.run([sys.executable, str(ROOT / "stages" / "distill.py")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distill:")]
    assert len(ours) == 1, proc.stderr[-3000:]
    line = ours[0]
    if server_kind == "nothing_listening":
        assert line.startswith("distill: only 0 of 4 items accepted (0%, distill.min_accepted_share is 50%)")
        assert "8 calls failed for good: 16 × connection" in line  # 4 items × 2 rounds, each call tried twice
    else:
        assert line.startswith("distill: only 1 of 4 items accepted (25%, distill.min_accepted_share is 50%)")
        assert "6 calls failed for good: 12 × server_error" in line
    assert "teacher.base_url" in line and KEY not in proc.stderr + proc.stdout
    out = tmp_path / "data" / "distill"
    for name in ("distilled_train.json", "left_data.json", "stats.json"):
        assert not (out / name).exists()


def _cached_attempts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        counts[record["item_id"]] = counts.get(record["item_id"], 0) + 1
    return counts


# The loop alone in a subprocess (the stage script imports MLflow, which takes ~10 s to start).
LOOP_SCRIPT = """
import json, sys
from ragtune.io import read_jsonl
from ragtune.config import validate
from ragtune.teacher import (DistillConfig, Distiller, ResponseCache, TeacherConfig, alpaca_rows, make_teacher,
                             retry_policy)
params = json.load(open("params.json"))
items = read_jsonl("data/prepared/gsm8k_train.jsonl")
with ResponseCache("data/distill/cache.jsonl") as cache:
    cfg = DistillConfig(**params["distill"])
    result = Distiller(make_teacher(validate(TeacherConfig, params["teacher"])), cache, max_rounds=cfg.max_rounds,
                       concurrency=cfg.concurrency, retry=retry_policy(cfg), seed=0).run(items)
print(json.dumps({"stats": result.stats, "distilled": alpaca_rows(result), "left": result.left}))
"""


def _run_distill(runner: str, cwd: Path, env: dict, popen: bool = False):
    if runner == "stage":
        cmd = [sys.executable, str(ROOT / "stages" / "distill.py")]
    else:
        cmd = [sys.executable, "-c", LOOP_SCRIPT]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if runner == "stage":
        out = cwd / "data" / "distill"
        result = {name: json.loads((out / f"{name}.json").read_text())
                  for name in ("stats",)} | {"distilled": json.loads((out / "distilled_train.json").read_text()),
                                             "left": json.loads((out / "left_data.json").read_text())}
    else:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc, result


@pytest.mark.parametrize("runner", ["loop", pytest.param("stage", marks=pytest.mark.slow)])
def test_kill_9_mid_round_then_rerun_repeats_no_answered_call(tmp_path, runner):
    """Killed while calls are in flight (the loop, or the real stage script); the rerun pays only for
    what was not answered."""
    items = make_items(60)
    always_wrong = {item["id"] for i, item in enumerate(items) if i % 5 == 0}
    rounds = 3
    script = {
        math_prompt(item["question"]): [wrong(item, latency=0.1) if item["id"] in always_wrong else right(item, latency=0.1)]
        for item in items
    }
    needed = {item["id"]: rounds if item["id"] in always_wrong else 1 for item in items}
    user_to_id = {math_prompt(item["question"]): item["id"] for item in items}
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "gsm8k_train.jsonl").write_text(
        "".join(json.dumps(item) + "\n" for item in items)
    )
    env = project_env(**{KEY_ENV: KEY, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    cache_path = tmp_path / "data" / "distill" / "cache.jsonl"

    with LoopbackTeacher(by_question(script)) as server:
        params = {
            "seed": 1,
            "distill": {"max_items": None, "max_rounds": rounds, "concurrency": 4, "max_retries": 2,
                        "backoff_base": 0.05, "backoff_max": 0.2, "progress": False},
            "teacher": teacher_cfg(server.base_url).model_dump(),
        }
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
        (tmp_path / "params.json").write_text(json.dumps(params))
        proc = _run_distill(runner, tmp_path, env, popen=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if cache_path.exists() and cache_path.read_bytes().count(b"\n") >= 20:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, "the run finished (or failed) before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert not (tmp_path / "data" / "distill" / "distilled_train.json").exists()
        with open(cache_path, "ab") as fh:  # as if the kill had landed in the middle of a write
            fh.write(b'{"key": "torn-by-kill-9", "item_id": "q1", "cont')
        cached = _cached_attempts(cache_path)
        assert 20 <= sum(cached.values()) < sum(needed.values())
        calls_before = server.calls_by_user()

        rerun, result = _run_distill(runner, tmp_path, env)
        calls_after = server.calls_by_user()
        max_in_flight = server.max_in_flight

    rerun_calls = {user_to_id[u]: calls_after.get(u, 0) - calls_before.get(u, 0) for u in user_to_id}
    assert rerun_calls == {i: needed[i] - cached.get(i, 0) for i in needed}
    assert max_in_flight <= 4
    stats, distilled, left = result["stats"], result["distilled"], result["left"]
    assert len(distilled) == 48 and {row["id"] for row in left} == always_wrong
    assert stats["calls"] == sum(rerun_calls.values()) and stats["cache_hits"] == sum(cached.values())
    assert stats["cache_torn_bytes_dropped"] > 0 and stats["rounds"] == rounds
    for text in (rerun.stdout, rerun.stderr, cache_path.read_text(), json.dumps(result)):
        assert KEY not in text


@pytest.mark.slow
def test_ragtune_serve_as_teacher(tmp_path, mirror, base_generator, monkeypatch):
    """ragtune's own OpenAI-compatible server (the real base generator in a small bundle) as the teacher:
    the loop completes and accepts whatever it gets right (a 135M model answering in 6 tokens: nothing)."""
    from ragtune.bundle import Bundle
    from ragtune.serve import MODEL_ID, ServeConfig, create_app, serve_in_thread
    from tests.bundle_fixtures import build_small_bundle

    bundle = Bundle.load(build_small_bundle(mirror, base_generator, tmp_path / "bundle"))
    items = make_items(3)
    monkeypatch.setenv(KEY_ENV, KEY)
    with serve_in_thread(create_app(bundle, ServeConfig())) as url:
        cfg = teacher_cfg(f"{url}/v1", timeout=120, model=MODEL_ID)
        with ResponseCache(tmp_path / "cache.jsonl") as cache:
            result = Distiller(make_teacher(cfg), cache, max_rounds=2, concurrency=2, retry=FAST_RETRY, seed=0).run(items)
    stats = result.stats
    assert stats["accepted"] + stats["left"] == 3 and len(result.left) == stats["left"]
    assert stats["failed_calls"] == 0 and stats["errors"] == {}
    assert stats["calls"] == 3 + stats["left"] and stats["cache_entries"] == stats["calls"]
    assert all(row["reason"] in ("no_think", "no_box", "wrong_answer", "conflicting_boxes") for row in result.left)
    assert stats["rounds"] == (1 if not result.left else 2)
