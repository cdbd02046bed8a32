"""Teachers, answer checking and the response cache (no network)."""

import json

import pytest

from ragtune.config import ConfigError, validate

from ragtune.data import seeded_sample
from ragtune.io import DataError
from ragtune.prompts import math_prompt
from ragtune.teacher import (
    OpenAITeacher,
    RationaleTeacher,
    RationaleTeacherConfig,
    ResponseCache,
    RetryPolicy,
    TeacherConfigError,
    TeacherConfig,
    compose_output,
    judge,
    load_items,
    make_teacher,
    request_key,
    retry_after_seconds,
)
from tests.conftest import ROOT

GSM8K_ITEM = {
    "id": "gsm8k-train-0",
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "rationale": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.",
    "answer": "72",
}


@pytest.mark.parametrize(
    "output, gold, verdict",
    [
        ("<think>\nx\n</think>\n\nSo \\boxed{1,000}.", "1000", (True, "accepted")),
        ("<think>\nx\n</think>\n\n\\boxed{1000.0}", "1,000", (True, "accepted")),
        ("<think>\nx\n</think>\n\n\\boxed{\\$18}", "18", (True, "accepted")),
        ("\\boxed{72}", "72", (False, "no_think")),
        ("<think>\nx\n</think>\n\n\\boxed{71}", "72", (False, "wrong_answer")),
        ("<think>\nx\n</think>\n\nThe answer is 72", "72", (False, "no_box")),
        ("<think>\nx\n</think>\n\n\\boxed{72} or \\boxed{73}", "72", (False, "conflicting_boxes")),
        # a box inside the thinking is not the answer
        ("<think>\n\\boxed{72}\n</think>\n\nI am not sure.", "72", (False, "no_box")),
    ],
)
def test_judge_accepts_only_a_boxed_gold_after_the_thinking(output, gold, verdict):
    assert judge(output, gold) == verdict


def test_rationale_teacher_reshapes_gsm8k_without_calculator_notes():
    output = RationaleTeacher(RationaleTeacherConfig(kind="rationale", name="gsm8k-rationale")).answer(GSM8K_ITEM)
    assert output == (
        "<think>\nNatalia sold 48/2 = 24 clips in May.\n"
        "Natalia sold 48+24 = 72 clips altogether in April and May.\n</think>\n\n"
        "The answer is \\boxed{72}."
    )
    assert judge(output, GSM8K_ITEM["answer"]) == (True, "accepted")


def test_rationale_teacher_output_is_accepted_for_the_prepared_train_set(prepared_dir):
    path = prepared_dir / "gsm8k_train.jsonl"
    teacher = RationaleTeacher(RationaleTeacherConfig(kind="rationale", name="gsm8k-rationale"))
    items = seeded_sample(load_items(path), 500, seed=0)
    verdicts = [judge(teacher.answer(item), item["answer"]) for item in items]
    assert all(v == (True, "accepted") for v in verdicts)
    assert not any("<<" in teacher.answer(item) for item in items)


def test_reasoning_content_is_folded_into_think():
    assert compose_output(" 72 is \\boxed{72} ", " step one\n") == "<think>\nstep one\n</think>\n\n72 is \\boxed{72}"
    assert compose_output("<think>a</think> \\boxed{1}") == "<think>a</think> \\boxed{1}"


def test_load_items_names_the_bad_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GSM8K_ITEM) + "\n" + json.dumps({"id": "x", "question": "q"}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: missing or empty field 'answer'"):
        load_items(path)


def test_openai_teacher_without_its_key_names_the_variable():
    cfg = validate(TeacherConfig, {"kind": "openai", "name": "r1", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                                   "api_key_env": "RAGTUNE_TEST_UNSET_KEY", "system": None, "temperature": None,
                                   "top_p": None, "max_tokens": None, "timeout": 5})
    with pytest.raises(TeacherConfigError, match="RAGTUNE_TEST_UNSET_KEY"):
        make_teacher(cfg, environ={})
    teacher = make_teacher(cfg, environ={"RAGTUNE_TEST_UNSET_KEY": "sk-secret-value"})
    assert isinstance(teacher, OpenAITeacher)
    assert "sk-secret-value" not in json.dumps(teacher.sampling) + teacher.name + teacher.model
    with pytest.raises(ConfigError, match="teacher: Input tag 'telepathy'"):
        validate(TeacherConfig, {"kind": "telepathy"}, prefix=("teacher",))


def test_shipped_teacher_configs_compose():
    import yaml

    r1 = yaml.safe_load((ROOT / "conf" / "teacher" / "deepseek_r1.yaml").read_text())
    assert r1["model"] == "deepseek-reasoner" and r1["api_key_env"] == "DEEPSEEK_API_KEY"
    assert not any("key" in k and not k.endswith("_env") for k in r1)
    teacher = make_teacher(validate(TeacherConfig, r1), environ={"DEEPSEEK_API_KEY": "sk-x"})
    assert teacher.sampling == {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}
    assert teacher.messages(GSM8K_ITEM) == [{"role": "user", "content": math_prompt(GSM8K_ITEM["question"])}]


def test_request_key_covers_model_messages_sampling_and_attempt():
    messages = [{"role": "user", "content": "q"}]
    base = request_key("m", messages, {"temperature": 0.6}, 0)
    assert base == request_key("m", [{"content": "q", "role": "user"}], {"temperature": 0.6}, 0)
    others = {
        request_key("m2", messages, {"temperature": 0.6}, 0),
        request_key("m", [{"role": "user", "content": "q2"}], {"temperature": 0.6}, 0),
        request_key("m", messages, {"temperature": 0.7}, 0),
        request_key("m", messages, {"temperature": 0.6}, 1),
    }
    assert base not in others and len(others) == 4


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    with ResponseCache(path) as cache:
        cache.put({"key": "a", "content": "1"})
        cache.put({"key": "b", "content": "2"})
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c", "cont')  # kill -9 in the middle of a write
    with ResponseCache(path) as cache:
        assert set(cache.entries) == {"a", "b"} and cache.torn_bytes == len(b'{"key": "c", "cont')
        cache.put({"key": "c", "content": "3"})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "b", "c"]
    with ResponseCache(path) as cache:
        assert cache.get("c") == {"key": "c", "content": "3"} and cache.skipped_lines == 0


def test_retry_after_and_backoff():
    import random

    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    policy = RetryPolicy(max_retries=5, backoff_base=1.0, backoff_max=8.0, max_retry_after=60.0)
    rng = random.Random(0)
    for retry, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (4, 8), (4, 8)]):
        assert low <= policy.delay(retry, None, rng) <= high
    assert policy.delay(0, 30.0, rng) == 30.0
    # a hostile or broken server: Retry-After of a day, or of forever, waits the configured cap
    assert retry_after_seconds({"retry-after": "inf"}) == float("inf")
    assert policy.delay(0, retry_after_seconds({"retry-after": "100000"}), rng) == 60.0
    assert policy.delay(0, retry_after_seconds({"retry-after": "inf"}), rng) == 60.0
