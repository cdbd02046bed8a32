"""The bundle: what it holds (hashes, a referenced base, data only), the tuned bundle as the base bundle
plus the adapter, answering by route, passages fitted to the model's context, articles left out of
retrieval, the forced box and the abstention flag, refusing a tampered or mismatched bundle on every
load path, and the MLflow pyfunc model that wraps it."""

import json
import shutil

import pytest

from ragtune.bundle import BASE_ENV, Bundle, PromptTooLong, add_adapter, build_bundle, checked_base
from ragtune.inference import Completion
from ragtune.io import DataError
from ragtune.prompts import FORCE_BOX, NO_ANSWER, cmrc_prompt
from ragtune.records import read_kb
from ragtune.retrieval import BM25Index
from tests.bundle_fixtures import MATHS_QUESTION, READING_QUESTION, TINY_ANSWER, build_small_bundle


@pytest.fixture(scope="module")
def bundle_dir(mirror, base_generator, tmp_path_factory):
    return build_small_bundle(mirror, base_generator, tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    return Bundle.load(bundle_dir)


class Scripted:
    """A generator that answers from a script and records every call (no model)."""

    def __init__(self, reply="42", continuation="7"):
        self.calls, self.reply, self.continuation = [], reply, continuation

    def generate_detailed(self, user_texts, max_new_tokens, prefixes=None):
        self.calls.append((list(user_texts), max_new_tokens, prefixes))
        text = self.continuation if prefixes else self.reply
        return [Completion(text, prompt_tokens=10, completion_tokens=2) for _ in user_texts]


def test_manifest_hashes_every_file_and_references_the_base(bundle_dir, base_generator):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"kb.jsonl", "prompts.json", "router/router.json", "router/classifier.json",
                                      "index/retriever.json"}
    assert not any(name.endswith((".pkl", ".joblib", ".py")) for name in manifest["files"])  # data only
    assert not (bundle_dir / "base").exists() and manifest["base_generator"]["copied"] is False
    assert set(manifest["base_generator"]["files"]) >= {"config.json", "model.safetensors"}
    assert manifest["adapter"] is None and manifest["retriever"] == "bm25"
    assert manifest["answer"] == TINY_ANSWER.model_dump()
    assert (bundle_dir.parent / manifest["base_generator"]["path"]).resolve() == base_generator.resolve()


def test_tuned_bundle_is_the_base_bundle_plus_the_adapter(bundle_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    (adapter / "adapter_model.safetensors").write_bytes(b"stand-in")
    manifest = add_adapter(bundle_dir, tmp_path / "tuned", adapter)
    base = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["adapter"] == "adapter" and manifest["digest"] != base["digest"]
    assert {k: v for k, v in manifest["files"].items() if not k.startswith("adapter/")} == base["files"]
    with pytest.raises(DataError, match="not a peft adapter"):
        add_adapter(bundle_dir, tmp_path / "t2", tmp_path)


def test_answers_by_route(bundle):
    maths, reading = bundle.answer_many([MATHS_QUESTION, READING_QUESTION], max_new_tokens=4)
    assert maths["route"] == "maths" and maths["sources"] == [] and "extraction" in maths
    assert reading["route"] == "reading" and len(reading["sources"]) == 3
    assert reading["sources"][0]["chunk_id"].startswith("DEV_0-") and reading["answer"] == reading["text"]
    assert maths["abstained"] is False and isinstance(reading["abstained"], bool)


def test_maths_and_reading_never_share_a_generate_call(bundle_dir):
    recorder = Scripted(reply="\\boxed{42}")
    answers = Bundle.load(bundle_dir, generator=recorder).answer_many(
        [MATHS_QUESTION, READING_QUESTION, MATHS_QUESTION], max_new_tokens=4
    )
    assert sorted(len(texts) for texts, _, _ in recorder.calls) == [1, 2]  # one call per route, one shared budget
    assert [a["route"] for a in answers] == ["maths", "reading", "maths"] and answers[1]["usage"]["finish_reason"] == "stop"


def test_a_maths_answer_without_a_box_gets_one(bundle_dir):
    scripted = Scripted(reply="So the total is eight apples", continuation="8} and more text")
    (result,) = Bundle.load(bundle_dir, generator=scripted).answer_many([MATHS_QUESTION])
    texts, budget, prefixes = scripted.calls[-1]
    assert prefixes == ["So the total is eight apples" + FORCE_BOX] and budget <= 16
    assert result["text"].endswith("\\boxed{8}") and result["final_answer"] == "8" and result["extraction"] == "boxed"


def test_abstention_is_flagged(bundle_dir):
    (result,) = Bundle.load(bundle_dir, generator=Scripted(reply=NO_ANSWER)).answer_many([READING_QUESTION])
    assert result["route"] == "reading" and result["abstained"] is True


def test_excluded_articles_never_reach_the_prompt(bundle):
    served = bundle.prepare(READING_QUESTION)
    article = bundle.chunks[served.sources[0]["chunk_id"]].article_id
    without = bundle.prepare(READING_QUESTION, exclude_articles={article})
    assert len(without.sources) == 3
    assert all(bundle.chunks[s["chunk_id"]].article_id != article for s in without.sources)


def test_passages_are_fitted_to_the_models_context(bundle, monkeypatch):
    """A long question with many passages: lowest-ranked passages go first, then the last one is cut;
    a question that cannot fit at all is refused (the server answers 400)."""
    full = bundle.prepare(READING_QUESTION, top_k=5)
    needed = bundle._prompt_tokens(full.user_text)
    monkeypatch.setattr(bundle, "max_positions", needed + 96 - 30)  # 30 tokens short with a 96-token budget
    fitted = bundle.prepare(READING_QUESTION, top_k=5, max_new_tokens=96)
    assert len(fitted.sources) < 5 and fitted.context_note
    assert bundle._prompt_tokens(fitted.user_text) + 96 <= bundle.max_positions
    empty = bundle._prompt_tokens(cmrc_prompt("", READING_QUESTION))
    monkeypatch.setattr(bundle, "max_positions", empty + 40 + 12)  # room for 12 tokens of one passage
    cut = bundle.prepare(READING_QUESTION, max_new_tokens=40)
    assert len(cut.sources) == 1 and "cut" in cut.context_note
    assert empty < bundle._prompt_tokens(cut.user_text) <= bundle.max_positions - 40
    with pytest.raises(PromptTooLong):
        bundle.prepare("这个问题很长。" * 200, max_new_tokens=40)



def test_a_reading_question_nothing_matches_is_answered(bundle, monkeypatch):
    """A question whose words match no chunk ("hi", "?") gets an empty context, not a server error."""
    monkeypatch.setattr(bundle, "route", lambda question: ("reading", None))
    prepared = bundle.prepare("?")
    assert prepared.sources == [] and "no passage" in prepared.context_note
    assert prepared.user_text == bundle.prepare_with_passages("?", []).user_text
    assert bundle.answer_prepared([prepared])[0]["route"] == "reading"


def test_the_confidence_gate_abstains_without_generating(bundle_dir):
    """Below the bundle's min_confidence a reading question gets the abstention reply, flagged, with a
    note and its passages, and never reaches the generator (batched and streamed alike); above it, or
    with the gate off, the generator answers."""
    recorder = Scripted(reply="光荣和ω-force")
    gated = Bundle.load(bundle_dir, generator=recorder)
    unknown = "黄独的外皮是什么颜色的？"  # the seed's example: its article is not in this KB
    hits = gated._retrieve(READING_QUESTION, 1, None)
    known_conf = gated.confidence.confidence(READING_QUESTION, hits)
    unknown_conf = gated.confidence.confidence(unknown, gated._retrieve(unknown, 1, None))
    assert unknown_conf < known_conf
    gated.settings = gated.settings.model_copy(update={"min_confidence": (known_conf + unknown_conf) / 2})
    answered, abstained = gated.answer_many([READING_QUESTION, unknown])
    assert [texts for texts, _, _ in recorder.calls] == [[gated.prepare(READING_QUESTION).user_text]]
    assert answered["answer"] == "光荣和ω-force" and not answered["abstained"]
    assert abstained["answer"] == NO_ANSWER and abstained["abstained"] is True
    assert "retrieval confidence" in abstained["context_note"]
    prepared = gated.prepare(unknown)
    assert prepared.abstain and "".join(gated.stream(prepared)) == NO_ANSWER
    gated.settings = gated.settings.model_copy(update={"min_confidence": None})
    assert not gated.answer_many([unknown])[0]["abstained"]


def test_gold_passages_use_the_same_template_and_budget(bundle):
    prepared = bundle.prepare_with_passages(READING_QUESTION, ["光荣和ω-force合作开发了这款游戏。"])
    assert prepared.route == "reading" and prepared.max_new_tokens == TINY_ANSWER.max_new_tokens_reading
    assert "光荣和ω-force" in prepared.user_text and prepared.user_text.startswith("请用下面的文段的原文来回答问题")


def test_unknown_router_label_is_never_maths(bundle, monkeypatch):
    from ragtune.router import UnknownLabel

    def confused(_questions):
        raise UnknownLabel("router replied 'poetry'")

    monkeypatch.setattr(bundle.router, "route_many", confused)
    route, note = bundle.route("What is 2 + 2?")
    assert route == "reading" and "poetry" in note


def tampered(bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir, tmp_path / "project" / "bundle")
    base = bundle_dir.parent / json.loads((bundle_dir / "manifest.json").read_text())["base_generator"]["path"]
    return copy, base


def test_tampered_bundle_is_refused_on_every_load_path(bundle_dir, tmp_path):
    copy, base = tampered(bundle_dir, tmp_path)
    with open(copy / "kb.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"chunk_id": "x", "article_id": "x", "title": "", "text": "injected"}\n')
    with pytest.raises(DataError, match="kb.jsonl differs"):
        Bundle.load(copy, base_dir=base)
    with pytest.raises(DataError, match="kb.jsonl differs"):  # an external generator (the vLLM path) too
        Bundle.load(copy, base_dir=base, generator=Scripted())
    with pytest.raises(DataError, match="kb.jsonl differs"):  # what the vLLM engine is started with
        checked_base(copy, base_dir=base)


def test_a_file_the_manifest_does_not_list_is_refused(bundle_dir, tmp_path):
    copy, base = tampered(bundle_dir, tmp_path)
    (copy / "router" / "classifier.joblib").write_bytes(b"\x80\x04 not welcome")
    with pytest.raises(DataError, match="classifier.joblib is not in the manifest"):
        Bundle.load(copy, base_dir=base, generator=Scripted())


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
    kb.write_text('{"chunk_id": "a", "article_id": "x", "title": "", "text": "x"}\n'
                  '{"chunk_id": "a", "article_id": "x", "title": "", "text": "y"}\n')
    index = BM25Index(["a", "b"], ["x", "y"])
    with pytest.raises(DataError, match="kb.jsonl:2: chunk_id 'a' repeated"):
        build_bundle(tmp_path / "b", kb_path=kb, base_dir=base_generator, router_dir=bundle_dir / "router",
                     retriever=index, answer=TINY_ANSWER)
    assert not (tmp_path / "b").exists()
    chunks = read_kb(bundle_dir / "kb.jsonl")
    with pytest.raises(DataError, match="indexes other chunks"):
        build_bundle(tmp_path / "b", kb_path=bundle_dir / "kb.jsonl", base_dir=base_generator,
                     router_dir=bundle_dir / "router", retriever=BM25Index([c.chunk_id for c in chunks[:3]],
                                                                          [c.text for c in chunks[:3]]),
                     answer=TINY_ANSWER)


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
