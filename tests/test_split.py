"""split: article isolation, leak detection, noisy answers repaired or dropped and reported,
stable chunks, the schema of every output, and no partial outputs on bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from ragtune.data import (
    Article,
    Report,
    chunk_article,
    find_leaks,
    gold_chunks,
    load_cmrc,
    load_gsm8k,
    SplitConfig,
    prepare,
    seeded_sample,
    split_articles,
    strip_calculator_notes,
)
from ragtune.io import DataError
from ragtune.prompts import CMRC_TEMPLATE
from ragtune.records import KbChunk, ReadingQuestion, Triple, read_records, write_records
from ragtune.sources import DataConfig
from tests.conftest import ROOT, project_env

SPLIT_CFG = {"chunk_size": 40, "chunk_overlap": 10, "hard_negatives": 2, "bm25_candidates": 5}


def article(aid, context, qas):
    return {
        "id": aid,
        "title": aid,
        "paragraphs": [
            {
                "id": aid,
                "context": context,
                "qas": [
                    {"id": f"{aid}_Q{i}", "question": q, "answers": [{"text": t, "answer_start": s} for t, s in ans]}
                    for i, (q, ans) in enumerate(qas)
                ],
            }
        ],
    }


def cmrc_file(path, articles):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "v1.0", "data": articles}, ensure_ascii=False), encoding="utf-8")
    return path


TRAIN_ARTICLES = [
    article("T0", "北京是中国的首都。长城很长，位于北方。故宫在北京的中心。", [("中国的首都是哪里？", [("北京", 0)])]),
    article("T1", "猫是一种小型哺乳动物。猫喜欢吃鱼。狗喜欢啃骨头。", [("猫喜欢吃什么东西？", [("鱼", 16)])]),
    article("T2", "长江是中国最长的河流。黄河是第二长的河流。", [("中国最长的河流是什么？", [("长江", 0)])]),
]
EVAL_ARTICLES = [
    article("E0", "上海是一个港口城市。上海有很多高楼。", [("哪个城市是港口城市？", [("上海", 0)])]),
]


def raw_dir(tmp_path, train=TRAIN_ARTICLES, evaluation=EVAL_ARTICLES, gsm_test=None):
    raw = tmp_path / "raw"
    cmrc_file(raw / "cmrc2018" / "train.json", train)
    cmrc_file(raw / "cmrc2018" / "eval.json", evaluation)
    (raw / "gsm8k").mkdir(parents=True, exist_ok=True)
    train_rows = [{"question": f"Tom has {n} apples and buys 2 more. How many now?", "answer": f"{n}+2=<<{n}+2={n + 2}>>{n + 2}\n#### {n + 2}"} for n in range(5)]
    test_rows = gsm_test or [{"question": "Ann has 3 pens and loses one. How many are left?", "answer": "3-1=2\n#### 2"}]
    for name, rows in (("train.jsonl", train_rows), ("test.jsonl", test_rows)):
        (raw / "gsm8k" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return raw


def run_prepare(raw, split=None, query_prompt="", seed=1):
    data = DataConfig(**(yaml.safe_load((ROOT / "conf" / "data" / "cmrc_dev.yaml").read_text()) | DATA_CFG))
    return prepare(raw, data=data, split=SplitConfig(**(SPLIT_CFG | (split or {}))), query_prompt=query_prompt, seed=seed)


DATA_CFG = {
    "cmrc_train": ["cmrc2018/train.json"],
    "cmrc_eval": ["cmrc2018/eval.json"],
    "gsm8k_train": "gsm8k/train.jsonl",
    "gsm8k_eval": "gsm8k/test.jsonl",
}


def test_outputs_have_the_contract_schema(tmp_path):
    outputs, stats = run_prepare(raw_dir(tmp_path), query_prompt="query: ")
    assert set(outputs) == {"kb.jsonl", "cmrc_train.jsonl", "cmrc_eval.jsonl", "gsm8k_train.jsonl",
                            "gsm8k_eval.jsonl", "embed_train.jsonl"}
    kb = outputs["kb.jsonl"]
    assert kb and all(isinstance(r, KbChunk) for r in kb)
    chunk_ids = {r.chunk_id for r in kb}
    train = outputs["cmrc_train.jsonl"]
    assert len(train) == 3 and all(isinstance(r, ReadingQuestion) for r in train)
    assert train[0].question == "中国的首都是哪里？" and train[0].answers == ["北京"] and "北京" in train[0].context
    (ev,) = outputs["cmrc_eval.jsonl"]
    assert ev.answers == ["上海"] and "上海" in ev.context and ev.article_id == "E0"
    # one definition of a relevant chunk: every chunk holding a gold answer at its annotated place
    assert ev.gold_chunk_ids and set(ev.gold_chunk_ids) <= chunk_ids
    assert all("上海" in next(c.text for c in kb if c.chunk_id == g) for g in ev.gold_chunk_ids)
    triples = outputs["embed_train.jsonl"]
    assert all(isinstance(t, Triple) and t.prompt == "query: " for t in triples)
    for t in triples:
        assert t.pos and not set(t.pos) & set(t.neg)
        # negatives come from train articles only and never hold the answer
        assert all("上海" not in n for n in t.neg)
    gsm = outputs["gsm8k_train.jsonl"][0]
    assert gsm.answer == "2" and gsm.rationale
    assert outputs["gsm8k_eval.jsonl"][0].rationale == ""
    assert stats["leak_check"]["passed"] and stats["cmrc"]["train_articles"] == 3


def test_prepared_files_round_trip_through_their_schema(tmp_path):
    outputs, _ = run_prepare(raw_dir(tmp_path))
    for name, rows in outputs.items():
        write_records(tmp_path / name, rows)
        assert read_records(tmp_path / name, type(rows[0])) == rows
    (tmp_path / "bad.jsonl").write_text('{"id": "q", "question": "x", "answers": []}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1: "):
        read_records(tmp_path / "bad.jsonl", ReadingQuestion)


def test_planted_context_leak_fails_naming_it(tmp_path):
    leaked = article("E9", TRAIN_ARTICLES[1]["paragraphs"][0]["context"], [("猫是什么动物呢？", [("哺乳动物", 5)])])
    with pytest.raises(DataError, match=r"(?s)leak into train.*E9: context also in train"):
        run_prepare(raw_dir(tmp_path, evaluation=[*EVAL_ARTICLES, leaked]))


def test_planted_question_leak_after_normalisation(tmp_path):
    leaks = find_leaks(["中国的首都是哪里？"], [("X", " 中国的首都，是哪里?")])
    assert leaks and leaks[0].startswith("X: question also in train")
    gsm_leak = [{"question": "Tom has 3 apples and buys 2 more.  How many now?", "answer": "#### 5"}]
    with pytest.raises(DataError, match="gsm8k-test-0: question also in train"):
        run_prepare(raw_dir(tmp_path, gsm_test=gsm_leak))


def test_wrong_answer_start_is_relocated_and_reported(tmp_path):
    context = "甲乙丙。北京很大。北京也很老。"
    path = cmrc_file(tmp_path / "c.json", [article("A", context, [("哪里很老？", [("北京", 10)])])])
    report = Report()
    (loaded,) = load_cmrc(path, report)
    assert loaded.questions[0].answers == [("北京", 9)]  # nearest occurrence to 10
    assert report.counts() == {"repaired_answer_start_relocated": 1}
    assert "A_Q0" in report.repairs[0]["where"]


def test_absent_and_empty_answers_are_dropped_and_reported(tmp_path):
    qas = [("问一？", [("不存在", 0), ("甲乙", 0)]), ("问二？", [("", 0)]), ("问三？", [("无", -1)]), (" ", [("甲", 0)])]
    path = cmrc_file(tmp_path / "c.json", [article("A", "甲乙丙丁。", qas)])
    report = Report()
    (loaded,) = load_cmrc(path, report)
    assert [q.id for q in loaded.questions] == ["A_Q0"]
    assert report.counts() == {
        "dropped_answer_not_in_context": 2,
        "dropped_empty_answer": 1,
        "dropped_question_without_answer": 2,
        "dropped_empty_question": 1,
    }


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [\n  {"paragraphs": [}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.json:2:\d+: malformed JSON"):
        load_cmrc(path, Report())
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"question": "a", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2:\d+: malformed JSON: Expecting value at line 2 column \d+"):
        load_gsm8k(jsonl, "train")


def test_missing_field_names_the_record(tmp_path):
    bad = article("A", "甲乙丙丁。", [("问？", [("甲", 0)])])
    del bad["paragraphs"][0]["qas"][0]["question"]
    path = cmrc_file(tmp_path / "c.json", [bad])
    with pytest.raises(DataError, match=r"c.json: question A_Q0: missing field 'question'"):
        load_cmrc(path, Report())
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text('{"question": "a", "answer": "#### 1"}\n{"answer": "#### 2"}\n')
    with pytest.raises(DataError, match=r"g.jsonl:2: missing field 'question'"):
        load_gsm8k(jsonl, "train")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda a: a["paragraphs"][0]["qas"][0]["answers"][0].update(text=42), r"A_Q0 answer 0: field 'text' has the wrong type \(int\)"),
        (lambda a: a["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start="3"), r"A_Q0 answer 0: field 'answer_start' has the wrong type \(str\)"),
        (lambda a: a["paragraphs"][0].update(context="  "), r"c.json: data\[0\].paragraphs\[0\]: empty 'context'"),
    ],
)
def test_wrong_types_and_empty_context_are_errors_not_drops(tmp_path, change, error):
    bad = article("A", "甲乙丙丁。", [("问？", [("甲", 0)])])
    change(bad)
    with pytest.raises(DataError, match=error):
        load_cmrc(cmrc_file(tmp_path / "c.json", [bad]), Report())


def test_repeated_paragraph_id_is_an_error_across_files(tmp_path):
    path = cmrc_file(tmp_path / "c.json", [article("A", "甲乙丙丁。", [("问？", [("甲", 0)])])])
    seen: dict[str, str] = {}
    load_cmrc(path, Report(), seen)
    with pytest.raises(DataError, match=r"paragraph id 'A' repeats .*c.json: data\[0\]"):
        load_cmrc(path, Report(), seen)


def test_a_file_without_usable_questions_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"empty.json: no usable question \(0 paragraphs"):
        load_cmrc(cmrc_file(tmp_path / "empty.json", []), Report())
    lost = cmrc_file(tmp_path / "lost.json", [article("A", "甲乙丙丁。", [("问？", [("戊", 0)])])])
    with pytest.raises(DataError, match=r"lost.json: no usable question \(1 paragraphs, 2 questions or answers dropped"):
        load_cmrc(lost, Report())


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('{"question": "a", "answer": "It is 12.\\n#### "}', r"g.jsonl:2: answer has no '#### <number>' line"),
        ('{"question": "a", "answer": "#### twelve apples"}', r"g.jsonl:2: answer has no '#### <number>' line \(got 'twelve apples'\)"),
        ('{"question": "  ", "answer": "#### 1"}', r"g.jsonl:2: empty 'question'"),
        ('{"question": 7, "answer": "#### 1"}', r"g.jsonl:2: field 'question' has the wrong type \(int\)"),
    ],
)
def test_gsm8k_lines_need_a_question_and_a_numeric_final_answer(tmp_path, line, error):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1,000"}\n' + line + "\n")
    with pytest.raises(DataError, match=error):
        load_gsm8k(path, "train")


def test_gsm8k_empty_file_and_bad_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"g.jsonl: no records"):
        load_gsm8k(path, "train")
    path.write_bytes(b'{"question": "a", "answer": "#### 1"}\n{"question": "bad \xff", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"g.jsonl:2: not UTF-8 text"):
        load_gsm8k(path, "train")


def test_chunks_are_stable_bounded_and_cover_the_text():
    text = "第一句话在这里。" * 3 + "这是一个非常长的句子" * 6 + "。最后一句！"
    a = Article("DOC", "t", text)
    chunks = chunk_article(a, 30, 8)
    assert [c.chunk_id for c in chunks] == [f"DOC-{i}" for i in range(len(chunks))]
    assert chunks == chunk_article(a, 30, 8)
    assert all(len(c.text) <= 30 and text[c.start : c.end] == c.text for c in chunks)
    covered = set().union(*(range(c.start, c.end) for c in chunks))
    assert covered == set(range(len(text)))
    # consecutive chunks touch or overlap (by whole sentences, at most `overlap` characters)
    assert all(b.start <= a_.end and a_.end - b.start <= 8 for a_, b in zip(chunks, chunks[1:]))
    # an answer inside one chunk has that chunk as gold
    start = text.index("最后")
    assert all("最后" in c.text for c in gold_chunks(chunks, start, 2))


def test_article_split_never_splits_an_article():
    arts = [Article(f"A{i}", "", "x") for i in range(10)]
    train, held = split_articles(arts, 0.3, seed=3)
    assert len(held) == 3 and not {a.id for a in train} & {a.id for a in held}
    assert split_articles(arts, 0.3, seed=3) == (train, held)


def test_seeded_sample_is_random_not_the_first_n():
    items = list(range(100))
    sample = seeded_sample(items, 10, seed=0)
    assert sample == seeded_sample(items, 10, seed=0) and sample != items[:10]
    assert seeded_sample(items, None, 0) == items


def test_calculator_notes_removed():
    assert strip_calculator_notes("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def test_template_is_the_seeds():
    assert CMRC_TEMPLATE == "请用下面的文段的原文来回答问题\n\n### 已知文段:{context}\n\n### 问题:{question}\n"


def test_failed_split_stage_leaves_no_outputs(tmp_path):
    work = tmp_path / "proj"
    (work / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "split.py", work / "stages" / "split.py")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(DATA_CFG)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    (work / "dvc.yaml").write_text("stages: {}\n")
    raw = raw_dir(tmp_path)
    (raw / "cmrc2018" / "eval.json").write_text('{"data": [}')
    shutil.copytree(raw, work / "data" / "raw")
    env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")
    proc = subprocess.run([sys.executable, "stages/split.py"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "data/raw/cmrc2018/eval.json:1:" in proc.stderr and "malformed JSON" in proc.stderr
    assert not (work / "data" / "prepared").exists()
    assert not [p for p in (work / "data").iterdir() if p.name != "raw"]
