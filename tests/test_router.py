"""The maths/reading router: strict labels, intent rather than language, held-out accuracy,
save/load, and the router stage's outputs."""

import json
import re
from pathlib import Path

import pytest

from ragtune.data import Report, load_cmrc, load_gsm8k, seeded_sample
from ragtune.io import DataError
from ragtune.router import (
    HANDWRITTEN_ARITHMETIC,
    HANDWRITTEN_EN_READING,
    HANDWRITTEN_ZH_MATHS,
    MATHS,
    READING,
    ClassifierRouter,
    UnknownLabel,
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


def test_saved_router_routes_the_same(router_and_heldout, tmp_path, monkeypatch):
    """Saved as JSON, no pickle; reloaded without pickle/joblib, it gives the same labels and the
    same probabilities on the held-out GSM8K test / CMRC trial questions and the hand-written sets."""
    import pickle

    import joblib
    import numpy as np

    router, heldout = router_and_heldout
    folder = tmp_path / "router"
    router.save(folder, {"seed": 0})
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.json", "router.json"]
    for file in folder.iterdir():
        assert not file.read_bytes().startswith(b"\x80")  # a pickle's protocol opcode
        json.loads(file.read_text(encoding="utf-8"))  # both are plain JSON
    manifest = json.loads((folder / "router.json").read_text())
    assert manifest["kind"] == "classifier" and manifest["labels"] == [MATHS, READING] and manifest["seed"] == 0

    def no_unpickling(*args, **kwargs):
        raise AssertionError("load_router unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (joblib, "load")):
        monkeypatch.setattr(module, name, no_unpickling)
    loaded = load_router(folder)
    monkeypatch.undo()

    questions = [q for q, _ in heldout] + HANDWRITTEN_ZH_MATHS + HANDWRITTEN_EN_READING + HANDWRITTEN_ARITHMETIC
    assert len(questions) >= 600
    assert loaded.route_many(questions) == router.route_many(questions)
    expected, got = router.probabilities(questions), loaded.probabilities(questions)
    assert got.shape == expected.shape == (len(questions), 2)
    assert np.abs(got - expected).max() <= 1e-9


@pytest.fixture(scope="module")
def small_saved_router(tmp_path_factory):
    """A router fitted in a moment on template questions, saved once; tests copy and tamper with it."""
    folder = tmp_path_factory.mktemp("small") / "router"
    ClassifierRouter.fit(synthetic_questions(120, seed=3), seed=0, ngram_max=3, c=1.0).save(folder, {"seed": 0})
    return folder


def _copy(folder, tmp_path):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "router"))


def _edit_classifier(change):
    def apply(folder):
        path = folder / "classifier.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        text = change(data)
        path.write_text(text if isinstance(text, str) else json.dumps(data, ensure_ascii=False), encoding="utf-8")
        return path
    return apply


def _set(section, key, value):
    return _edit_classifier(lambda d: d[section].__setitem__(key, value))


def _raw_number(section, key, text, row=None):
    """Put `text` (NaN, Infinity, 1e400: JSON that json.dumps would never write) into a number list."""
    def change(d):
        values = d[section][key] if row is None else d[section][key][row]
        values[len(values) // 2] = "RAW_HERE"
        return json.dumps(d, ensure_ascii=False).replace('"RAW_HERE"', text)
    return _edit_classifier(change)


def _edit_manifest(change):
    def apply(folder):
        path = folder / "router.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        change(data)
        path.write_text(json.dumps(data), encoding="utf-8")
        return path
    return apply


TAMPERINGS = {
    "coef one short": (_edit_classifier(lambda d: d["logistic_regression"]["coef"][0].pop()), "coef"),
    "coef two rows": (_edit_classifier(lambda d: d["logistic_regression"]["coef"].append(
        d["logistic_regression"]["coef"][0])), "coef"),
    "idf one long": (_edit_classifier(lambda d: d["vectorizer"]["idf"].append(1.5)), "idf"),
    "intercept as a number": (_set("logistic_regression", "intercept", 0.5), "intercept"),
    "extra label": (_set("logistic_regression", "classes", ["maths", "reading", "poetry"]), "classes"),
    "labels swapped": (_set("logistic_regression", "classes", ["reading", "maths"]), "classes"),
    "NaN in coef": (_raw_number("logistic_regression", "coef", "NaN", row=0), "NaN"),
    "NaN in idf": (_raw_number("vectorizer", "idf", "NaN"), "NaN"),
    "Infinity in idf": (_raw_number("vectorizer", "idf", "-Infinity"), "Infinity"),
    "overflow to inf": (_raw_number("logistic_regression", "intercept", "1e400"), "not finite"),
    "number as a string": (_edit_classifier(lambda d: d["vectorizer"]["idf"].__setitem__(0, "1.5")), "idf"),
    "bool as a number": (_edit_classifier(lambda d: d["logistic_regression"]["intercept"].__setitem__(0, True)),
                         "intercept"),
    "idf below 1": (_edit_classifier(lambda d: d["vectorizer"]["idf"].__setitem__(0, -3.0)), "idf"),
    "ngram range too wide": (_set("vectorizer", "ngram_range", [1, 50]), "ngram_range"),
    "ngram range not from 1": (_set("vectorizer", "ngram_range", [2, 3]), "ngram_range"),
    "other analyzer": (_set("vectorizer", "analyzer", "word"), "analyzer"),
    "other preprocessor": (_set("vectorizer", "preprocessor", "os.system"), "preprocessor"),
    "n-gram longer than ngram_max": (_edit_classifier(lambda d: d["vectorizer"]["vocabulary"].__setitem__(0, "abcd")),
                                     "vocabulary"),
    "duplicate n-gram": (_edit_classifier(lambda d: d["vectorizer"]["vocabulary"].__setitem__(
        1, d["vectorizer"]["vocabulary"][0])), "twice"),
    "empty vocabulary": (_edit_classifier(lambda d: d["vectorizer"].update(vocabulary=[], idf=[])), "vocabulary"),
    "unknown field": (_edit_classifier(lambda d: d.update(pipeline="gASV...")), "unexpected"),
    "missing field": (_edit_classifier(lambda d: d.pop("shape_features")), "missing"),
    "other shape features": (_edit_classifier(lambda d: d.update(shape_features={"function": "eval", "columns": 4})),
                             "shape_features"),
    "other format": (_edit_classifier(lambda d: d.update(format="ragtune.router.classifier/9")), "format"),
    "truncated": (_edit_classifier(lambda d: json.dumps(d)[:1000]), "malformed JSON"),
    "not an object": (_edit_classifier(lambda d: "[1, 2]"), "JSON object"),
    "manifest extra label": (_edit_manifest(lambda m: m.update(labels=["maths", "reading", "poetry"])), "labels"),
    "manifest other format": (_edit_manifest(lambda m: m.update(format="pickle")), "format"),
}


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
def test_tampered_router_files_are_refused_naming_the_file(small_saved_router, tmp_path, tampering):
    change, why = TAMPERINGS[tampering]
    folder = _copy(small_saved_router, tmp_path)
    load_router(folder)  # the untouched copy loads
    path = change(folder)
    with pytest.raises(DataError, match=re.escape(str(path))) as err:
        load_router(folder)
    assert why in str(err.value)


def _pickle_that_writes(marker):
    """A pickle that, if it were ever loaded, would create `marker`: proof that it was not."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "unpickled"))

    return pickle.dumps(Payload())


def test_folder_with_only_a_pickled_router_is_refused(tmp_path):
    folder = tmp_path / "router"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "classifier.joblib").write_bytes(_pickle_that_writes(marker))
    with pytest.raises(DataError, match=re.escape(str(folder / "classifier.joblib"))) as err:
        load_router(folder)
    assert "refusing to load a pickled router" in str(err.value) and "run" in str(err.value)
    # As the router stage used to save it (manifest + pickle): refused the same way.
    (folder / "router.json").write_text('{"kind": "classifier", "labels": ["maths", "reading"], "sklearn": "1.9.1"}')
    with pytest.raises(DataError, match="refusing to load a pickled router"):
        load_router(folder)
    assert not marker.exists()


def test_leftover_pickle_beside_a_json_router_is_refused(small_saved_router, tmp_path):
    folder = _copy(small_saved_router, tmp_path)
    marker = tmp_path / "ran"
    (folder / "classifier.joblib").write_bytes(_pickle_that_writes(marker))
    with pytest.raises(DataError, match=re.escape(str(folder / "classifier.joblib"))):
        load_router(folder)
    assert not marker.exists()
    (folder / "classifier.joblib").unlink()
    assert load_router(folder).route("一根绳子长18米，剪去三分之一，还剩几米？") in (MATHS, READING)


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
