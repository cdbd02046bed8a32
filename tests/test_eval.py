"""eval scores the served bundle: with an 'oracle' generator (answers from the passages it is given when
they hold the gold, else abstains) every number is known in advance; paired differences; the stage end
to end with an OpenAI-compatible endpoint; and eval and serve give the same answer to the same question."""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest
import yaml

from ragtune.bundle import Bundle
from ragtune.evaluate import EvalConfig, evaluate_bundle, paired_differences, question_sets
from ragtune.inference import Completion
from ragtune.prompts import NO_ANSWER
from ragtune.records import MathsQuestion, ReadingQuestion, read_records
from ragtune.report import markdown_report
from tests.bundle_fixtures import READING_QUESTION, build_small_bundle
from tests.conftest import ROOT


class Oracle:
    """Answers a reading prompt with the gold answer when its passages hold it, else the abstention
    reply; boxes the gold of a maths prompt."""

    def __init__(self, cmrc: list[ReadingQuestion], gsm8k: list[MathsQuestion], know_nothing: bool = False):
        self.cmrc = {q.question: q.answers for q in cmrc}
        self.gsm8k = {q.question: q.answer for q in gsm8k}
        self.know_nothing = know_nothing

    def answer(self, prompt: str) -> str:
        if self.know_nothing:
            return "我不知道"
        if match := re.search(r"### 已知文段:(.*)\n\n### 问题:(.*)\n$", prompt, re.S):
            context, question = match.groups()
            return next((a for a in self.cmrc.get(question, []) if a in context), NO_ANSWER)
        question = prompt.split("\n\nPlease reason")[0]
        return f"Step by step... the answer is \\boxed{{{self.gsm8k.get(question, 'x')}}}."

    def generate_detailed(self, user_texts, max_new_tokens, prefixes=None):
        return [Completion(self.answer(t)) for t in user_texts]


@pytest.fixture(scope="module")
def prepared(prepared_dir):
    return read_records(prepared_dir / "cmrc_eval.jsonl", ReadingQuestion), read_records(prepared_dir / "gsm8k_eval.jsonl", MathsQuestion)


@pytest.fixture(scope="module")
def kb_bundle(prepared_dir, mirror, base_generator, tmp_path_factory):
    """A base bundle over the whole prepared KB (BM25, the small router), answering with a stand-in generator."""
    from ragtune.bundle import build_bundle
    from ragtune.records import read_kb
    from ragtune.retrieval import BM25Index
    from tests.bundle_fixtures import TINY_ANSWER, small_router

    folder = tmp_path_factory.mktemp("kb_bundle")
    chunks = read_kb(prepared_dir / "kb.jsonl")
    retriever = BM25Index([c.chunk_id for c in chunks], [c.text for c in chunks])
    build_bundle(folder / "bundle", kb_path=prepared_dir / "kb.jsonl", base_dir=base_generator,
                 router_dir=small_router(mirror, folder / "router"), retriever=retriever, answer=TINY_ANSWER)
    return folder / "bundle"


CFG = EvalConfig(cmrc_samples=60, gsm8k_samples=30, abstain_samples=20, similarity=False, bootstrap_resamples=500)


def test_an_oracle_scores_what_retrieval_allows(prepared, kb_bundle):
    cmrc, gsm8k = prepared
    sets = question_sets(cmrc, gsm8k, CFG, seed=3)
    bundle = Bundle.load(kb_bundle, generator=Oracle(cmrc, gsm8k))
    metrics, rows = evaluate_bundle(bundle, sets, CFG, seed=3, log=lambda *_: None)
    served = metrics["served"]
    routed = [r for r in rows["served_cmrc"] if r["route"] == "reading"]
    answerable = sum(any(a in "".join(bundle.chunks[c].text for c in r["sources"]) for a in r["golds"]) for r in routed)
    assert served["cmrc"]["official_em"]["mean"] == pytest.approx(answerable / 60)
    assert served["cmrc"]["official_em"]["low"] <= served["cmrc"]["official_em"]["mean"] <= served["cmrc"]["official_em"]["high"]
    assert served["gsm8k"]["accuracy"]["mean"] == pytest.approx(sum(r["route"] == "maths" for r in rows["served_gsm8k"]) / 30,
                                                                abs=1 / 30)
    assert served["gsm8k"]["boxed"]["mean"] >= served["gsm8k"]["accuracy"]["mean"]
    # an article left out of retrieval: the oracle can only abstain (or meet a copy of the answer elsewhere)
    assert metrics["unanswerable"]["abstained"]["mean"] >= 0.8
    # the gold chunk always holds the answer: a perfect score with zero width
    assert metrics["gold_context"]["official_em"] == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 60}
    assert metrics["retrieval"]["queries"] == len(cmrc) and metrics["retrieval"]["kind"] == "bm25"
    assert metrics["questions"] == {"cmrc": 60, "gsm8k": 30, "unanswerable": 20, "retrieval": len(cmrc)}


def test_paired_differences_over_the_same_questions(prepared, kb_bundle):
    cmrc, gsm8k = prepared
    sets = question_sets(cmrc, gsm8k, CFG, seed=3)
    quiet = lambda *_: None  # noqa: E731
    base_metrics, base_rows = evaluate_bundle(Bundle.load(kb_bundle, generator=Oracle(cmrc, gsm8k, know_nothing=True)),
                                              sets, CFG, seed=3, log=quiet)
    tuned_metrics, tuned_rows = evaluate_bundle(Bundle.load(kb_bundle, generator=Oracle(cmrc, gsm8k)), sets, CFG, seed=3, log=quiet)
    diffs = paired_differences(base_rows, tuned_rows, seed=3, resamples=500)
    em = diffs["served_cmrc.official_em"]
    assert em["mean_diff"] == pytest.approx(tuned_metrics["served"]["cmrc"]["official_em"]["mean"])
    assert 0 < em["low"] <= em["mean_diff"] <= em["high"]
    same = paired_differences(tuned_rows, tuned_rows, seed=3, resamples=500)
    assert all(d["mean_diff"] == d["low"] == d["high"] == 0 for d in same.values())  # identical systems
    report = markdown_report({"base": base_metrics, "tuned": tuned_metrics}, diffs, ["# r"], {"seed": "note"})
    assert re.search(r"\| CMRC official EM \(served\) \| 0\.0 \[0\.0, 0\.0\] \| \d+\.\d \[\d+\.\d, \d+\.\d\] \| \+\d+\.\d ", report)
    with pytest.raises(ValueError, match="different questions"):
        paired_differences(base_rows, {k: v[:-1] for k, v in tuned_rows.items()}, seed=3, resamples=500)


def test_question_sets_are_seeded_and_sized(prepared):
    cmrc, gsm8k = prepared
    first, again = question_sets(cmrc, gsm8k, CFG, 1), question_sets(cmrc, gsm8k, CFG, 1)
    assert [q.id for q in first.cmrc] == [q.id for q in again.cmrc] and len(first.unanswerable) == 20
    assert [q.id for q in question_sets(cmrc, gsm8k, CFG, 2).cmrc] != [q.id for q in first.cmrc]
    none = question_sets(cmrc, gsm8k, CFG.model_copy(update={"abstain_samples": 0}), 1)
    assert none.unanswerable == []


def run_eval_stage(tmp_path, monkeypatch, argv, params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # marks the project root for ragtune.config
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    spec = importlib.util.spec_from_file_location("eval_stage", ROOT / "stages" / "eval.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main()


def test_eval_stage_base_then_tuned_with_an_endpoint(tmp_path, monkeypatch, prepared_dir, mirror, base_generator,
                                                     embedder_dir, oracle_url):
    """stages/eval.py twice, as dvc.yaml runs it (base bundle, then the tuned one with --baseline), on
    smoke sizes with the real model and tiny budgets; an OpenAI-compatible oracle endpoint as an extra row."""
    import mlflow

    from ragtune.config import compose
    from tests.bundle_fixtures import tiny_adapter

    folder = tmp_path / "bundles"
    base = build_small_bundle(mirror, base_generator, folder)
    tuned = build_small_bundle(mirror, base_generator, folder, adapter=tiny_adapter(base_generator, tmp_path / "adapter"))
    for rel, target in (("data/prepared", prepared_dir), ("models/base/embedder", embedder_dir)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(target)
    params = yaml.safe_load(compose(["profile=smoke"], config_dir=ROOT / "conf"))
    params["eval"]["endpoints"] = {"oracle": {"base_url": oracle_url, "model": "oracle"}}
    run_eval_stage(tmp_path, monkeypatch, ["--bundle", str(base), "--out", "reports/eval_base"], params)
    run_eval_stage(tmp_path, monkeypatch, ["--bundle", str(tuned), "--out", "reports/eval", "--baseline",
                                           "reports/eval_base"], params)

    out = tmp_path / "reports" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"base", "tuned", "tuned_minus_base", "endpoints"}
    assert metrics["tuned"]["questions"] == metrics["base"]["questions"]
    assert metrics["endpoints"]["oracle"]["gold_context"]["official_em"]["mean"] == 1.0
    assert metrics["tuned_minus_base"]["served_cmrc.official_f1"]["n"] == params["eval"]["cmrc_samples"]
    assert {p.name for p in (out / "predictions").iterdir()} == {"served_cmrc.jsonl", "served_gsm8k.jsonl",
                                                                 "unanswerable.jsonl", "gold_context.jsonl"}
    report = (out / "report.md").read_text()
    assert "| metric (%) | base | tuned | oracle | tuned − base |" in report and (out / "comparison.png").exists()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ragtune").experiment_id])
    assert sorted(r.data.tags["dvc.stage"] for r in runs) == ["eval", "eval_base"]
    tuned_run = next(r for r in runs if r.data.tags["dvc.stage"] == "eval")
    assert "tuned.served.cmrc.official_f1.mean" in tuned_run.data.metrics
    models = mlflow.search_logged_models(experiment_ids=[tuned_run.info.experiment_id], output_format="list")
    assert any(m.name == "bundle_model" and any(x.key == "tuned.served.cmrc.official_f1.mean" for x in m.metrics or [])
               for m in models)  # the logged bundle carries the metrics measured on it


@pytest.fixture(scope="module")
def oracle_url(prepared):
    """An OpenAI-compatible endpoint on loopback that answers like Oracle."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    oracle = Oracle(*prepared)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer = oracle.answer(body["messages"][-1]["content"])
            data = json.dumps({"id": "o", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": answer}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_eval_and_serve_give_the_same_answer(mirror, base_generator, tmp_path):
    """The question through evaluate_bundle, through the bundle directly and through `ragtune serve`'s
    OpenAI API: one answer path, one answer."""
    from openai import OpenAI

    from ragtune.serve import ServeConfig, create_app, serve_in_thread

    bundle = Bundle.load(build_small_bundle(mirror, base_generator, tmp_path))
    question = ReadingQuestion(id="q", question=READING_QUESTION, answers=["光荣和ω-force"], article_id="DEV_0",
                               gold_chunk_ids=["DEV_0-0"], context="光荣和ω-force")
    sets = question_sets([question], [], EvalConfig(abstain_samples=0, gold_context=False, similarity=False), 0)
    _, rows = evaluate_bundle(bundle, sets, EvalConfig(similarity=False), 0, log=lambda *_: None)
    direct = bundle.answer(READING_QUESTION)
    with serve_in_thread(create_app(bundle, ServeConfig(token_env=None))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        served = client.chat.completions.create(model="ragtune", messages=[{"role": "user", "content": READING_QUESTION}])
    assert rows["served_cmrc"][0]["text"] == direct["text"] == served.choices[0].message.content
    assert rows["served_cmrc"][0]["sources"] == [s["chunk_id"] for s in served.model_extra["ragtune"]["sources"]]
