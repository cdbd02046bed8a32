"""The maths/reading router: strict labels, intent rather than language, held-out accuracy,
save/load, and the router stage's outputs."""

import json

import pytest

from ragtune.data import Report, load_cmrc, load_gsm8k, seeded_sample
from ragtune.io import DataError
from ragtune.prompts import cmrc_prompt
from ragtune.router import (
    HANDWRITTEN_ARITHMETIC,
    HANDWRITTEN_EN_READING,
    HANDWRITTEN_ZH_MATHS,
    MATHS,
    READING,
    ClassifierRouter,
    UnknownLabel,
    cmrc_question,
    load_router,
    parse_label,
    router_accuracy,
    synthetic_questions,
)
from tests.conftest import ROOT


def test_labels_are_strict_and_unknown_is_never_maths():
    assert parse_label(" Maths. ") == MATHS
    assert parse_label("reading") == READING
    for reply in ("", "math", "maths or reading", "I think maths", "数学"):
        with pytest.raises(UnknownLabel):
            parse_label(reply)


def test_question_recovered_from_the_cmrc_template():
    assert cmrc_question(cmrc_prompt("文段。", "谁写的？"), "x") == "谁写的？"
    with pytest.raises(DataError, match="record 3"):
        cmrc_question("no template here", "file.json: record 3")


def test_synthetic_questions_are_seeded_and_cross_language():
    first, again = synthetic_questions(50, seed=7), synthetic_questions(50, seed=7)
    assert first == again and first != synthetic_questions(50, seed=8)
    maths = [q for q, label in first if label == MATHS]
    reading = [q for q, label in first if label == READING]
    assert len(maths) == 50 + 25 and len(reading) == 50  # word problems + bare calculations
    chinese = [q for q in maths if any("\u4e00" <= ch <= "\u9fff" for ch in q)]
    assert len(chinese) >= 50 and any(q.isascii() for q in maths)  # Chinese maths, English calculations
    assert all(q.isascii() for q in reading)  # English reading
    # The held-out sets are hand-written: none of them is template output.
    generated = {q for q, _ in synthetic_questions(600, seed=42)}
    assert not generated & set(HANDWRITTEN_ZH_MATHS + HANDWRITTEN_EN_READING + HANDWRITTEN_ARITHMETIC)


@pytest.fixture(scope="module")
def router_and_heldout(mirror):
    """A router fitted on a sample of the train questions, and held-out GSM8K test / CMRC trial ones."""
    gsm_train = [r["question"] for r in load_gsm8k(mirror / "gsm8k" / "train.jsonl", "train")]
    cmrc_train = [q.question for a in load_cmrc(mirror / "cmrc2018" / "cmrc2018_dev.json", Report()) for q in a.questions]
    pairs = [(q, MATHS) for q in seeded_sample(gsm_train, 2000, 0)]
    pairs += [(q, READING) for q in seeded_sample(cmrc_train, 2000, 0)] + synthetic_questions(600, seed=42)
    router = ClassifierRouter.fit(pairs, seed=0, ngram_max=4, c=10.0)
    gsm_test = [r["question"] for r in load_gsm8k(mirror / "gsm8k" / "test.jsonl", "test")]
    trial = [q.question for a in load_cmrc(mirror / "cmrc2018" / "cmrc2018_trial.json", Report()) for q in a.questions]
    heldout = [(q, MATHS) for q in seeded_sample(gsm_test, 300, 1)] + [(q, READING) for q in seeded_sample(trial, 300, 1)]
    return router, heldout


def test_routes_by_intent_not_language(router_and_heldout):
    router, _ = router_and_heldout
    result = router_accuracy(router, [(q, MATHS) for q in HANDWRITTEN_ZH_MATHS] + [(q, READING) for q in HANDWRITTEN_EN_READING])
    assert result["accuracy"] >= 0.95, result["errors"]


def test_short_calculations_are_maths_in_both_languages(router_and_heldout):
    router, _ = router_and_heldout
    result = router_accuracy(router, [(q, MATHS) for q in HANDWRITTEN_ARITHMETIC])
    assert result["accuracy"] >= 0.85, result["errors"]


def test_heldout_accuracy(router_and_heldout):
    router, heldout = router_and_heldout
    result = router_accuracy(router, heldout)
    assert result["accuracy"] >= 0.98, result["errors"]


def test_saved_router_routes_the_same(router_and_heldout, tmp_path):
    router, heldout = router_and_heldout
    router.save(tmp_path / "router", {"seed": 0})
    loaded = load_router(tmp_path / "router")
    questions = [q for q, _ in heldout[:40]]
    assert loaded.route_many(questions) == router.route_many(questions)
    assert json.loads((tmp_path / "router" / "router.json").read_text())["kind"] == "classifier"


def test_unknown_router_kind_is_a_clear_error(tmp_path):
    (tmp_path / "router.json").write_text('{"kind": "dice"}')
    with pytest.raises(DataError, match="unknown router kind 'dice'"):
        load_router(tmp_path)


def test_router_stage_metrics_if_built():
    metrics_path = ROOT / "reports" / "router" / "metrics.json"
    if not metrics_path.exists():
        pytest.skip("router stage not run (dvc repro router)")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n"] > 0 and metrics["accuracy"] >= 0.99
    assert metrics["cross_language_accuracy"] >= 0.95


def test_llm_router_parses_strictly_against_a_loopback_model():
    """router=llm against an OpenAI-compatible server on 127.0.0.1 that replies from a script."""
    from fastapi import FastAPI, Request

    from ragtune.router import LLM_ROUTER_SYSTEM, LLMRouter
    from ragtune.serve import serve_in_thread

    replies = {"q-maths": "maths", "q-reading": "Reading.", "q-chatty": "I think this is maths"}
    seen = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def complete(request: Request):
        body = await request.json()
        seen.append(body)
        text = replies[body["messages"][-1]["content"]]
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}

    with serve_in_thread(app) as url:
        router = LLMRouter(f"{url}/v1", "judge", api_key_env=None, timeout=30)
        assert router.route_many(["q-maths", "q-reading"]) == [MATHS, READING]
        with pytest.raises(UnknownLabel):
            router.route("q-chatty")
        result = router_accuracy(router, [("q-maths", MATHS), ("q-chatty", MATHS)])
        assert result["accuracy"] == 0.5 and result["errors"][0]["predicted"] == "unknown"
    assert seen[0]["messages"][0] == {"role": "system", "content": LLM_ROUTER_SYSTEM}
    assert seen[0]["temperature"] == 0.0


def test_cli_routes_with_a_saved_router(router_and_heldout, tmp_path, capsys):
    from ragtune.cli import main

    router, _ = router_and_heldout
    router.save(tmp_path / "router")
    assert main(["route", "--router", str(tmp_path / "router"), "一根绳子长18米，剪去三分之一，还剩几米？"]) == 0
    assert main(["route", "--router", str(tmp_path / "router"), "Which", "museum", "holds", "the", "painting?"]) == 0
    assert capsys.readouterr().out.split() == [MATHS, READING]
