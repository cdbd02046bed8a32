"""The bundle: what it holds (hashes, a referenced base), answering by route, refusing a tampered
or mismatched bundle, and the MLflow pyfunc model that wraps it."""

import json
import shutil

import pytest

from ragtune.bundle import BASE_ENV, Bundle, build_bundle
from ragtune.io import DataError
from tests.bundle_fixtures import MATHS_QUESTION, READING_QUESTION, TINY_ANSWER, build_small_bundle


@pytest.fixture(scope="module")
def bundle_dir(mirror, base_generator, tmp_path_factory):
    return build_small_bundle(mirror, base_generator, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return Bundle.load(bundle_dir)


def test_manifest_hashes_every_file_and_references_the_base(bundle_dir, base_generator):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"kb.jsonl", "prompts.json", "router/router.json", "index/retriever.json"}
    assert not (bundle_dir / "base").exists() and manifest["base_generator"]["copied"] is False
    assert set(manifest["base_generator"]["files"]) >= {"config.json", "model.safetensors"}
    assert manifest["adapter"] is None
    assert manifest["metrics"] is None and "absent" in manifest["metrics_source"]
    assert (bundle_dir.parent / manifest["base_generator"]["path"]).resolve() == base_generator.resolve()


def test_answers_by_route(bundle):
    maths, reading = bundle.answer_many([MATHS_QUESTION, READING_QUESTION], max_new_tokens=4)
    assert maths["route"] == "maths" and maths["sources"] == [] and "extraction" in maths
    assert reading["route"] == "reading" and len(reading["sources"]) == 3
    assert reading["sources"][0]["chunk_id"].startswith("DEV_0-") and reading["answer"] == reading["text"]


def test_maths_and_reading_never_share_a_generate_call(bundle_dir):
    class Recorder:  # a generator that notes each batch it is given
        def __init__(self):
            self.batches = []

        def generate(self, user_texts, max_new_tokens):
            self.batches.append(len(user_texts))
            return ["42"] * len(user_texts)

    recorder = Recorder()
    answers = Bundle.load(bundle_dir, generator=recorder).answer_many(
        [MATHS_QUESTION, READING_QUESTION, MATHS_QUESTION], max_new_tokens=4
    )
    assert sorted(recorder.batches) == [1, 2]  # one call per route, even with one shared budget
    assert [a["route"] for a in answers] == ["maths", "reading", "maths"] and answers[1]["usage"]["finish_reason"] == "stop"


def test_unknown_router_label_is_never_maths(bundle, monkeypatch):
    from ragtune.router import UnknownLabel

    def confused(_questions):
        raise UnknownLabel("router replied 'poetry'")

    monkeypatch.setattr(bundle.router, "route_many", confused)
    route, note = bundle.route("What is 2 + 2?")
    assert route == "reading" and "poetry" in note


def test_tampered_bundle_is_refused(bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir, tmp_path / "bundle")
    with open(copy / "kb.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"chunk_id": "x", "text": "injected"}\n')
    with pytest.raises(DataError, match="kb.jsonl differs"):
        Bundle.load(copy, base_dir=bundle_dir.parent / json.loads((bundle_dir / "manifest.json").read_text())["base_generator"]["path"])


def test_missing_base_is_a_clear_error(bundle_dir, tmp_path, monkeypatch):
    copy = shutil.copytree(bundle_dir, tmp_path / "elsewhere" / "bundle")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["base_generator"]["path"] = "models/base/generator"  # as in a project without `dvc pull`
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.delenv(BASE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="base generator .* not found.*dvc pull"):
        Bundle.load(copy)


def test_bad_inputs_name_the_file(tmp_path, base_generator, bundle_dir):
    kb = tmp_path / "kb.jsonl"
    kb.write_text('{"chunk_id": "a", "text": "x"}\n{"chunk_id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match="kb.jsonl:2: chunk_id 'a' repeated"):
        build_bundle(tmp_path / "b", kb, base_generator, bundle_dir / "router", answer=TINY_ANSWER)
    assert not (tmp_path / "b").exists()
    with pytest.raises(DataError, match="not a peft adapter"):
        build_bundle(tmp_path / "b", kb, base_generator, bundle_dir / "router", adapter_dir=tmp_path, answer=TINY_ANSWER)


def test_pyfunc_model_loads_and_predicts(bundle_dir, base_generator, tmp_path):
    import mlflow
    import pandas as pd

    from ragtune.bundle import log_pyfunc_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("pyfunc-test")
    with mlflow.start_run():
        info = log_pyfunc_model(mlflow, bundle_dir, base_generator, max_new_tokens=3)
    model = mlflow.pyfunc.load_model(info.model_uri)
    out = model.predict(pd.DataFrame({"question": [MATHS_QUESTION, READING_QUESTION]}))
    assert list(out["route"]) == ["maths", "reading"]
    assert json.loads(out["sources"][0]) == [] and len(json.loads(out["sources"][1])) == 3
    assert all(isinstance(a, str) for a in out["answer"])
