"""data=custom: your own documents, reading and maths questions. Every input format parsed (documents as
.txt/.md/.html/.pdf files or JSONL; SQuAD v1.1/v2 and JSONL reading questions with and without a context,
the answer-placement path included; GSM8K and simple maths), every bad input a clear error or a counted
drop, absent inputs skipped by the stages that need them, and BM25 tokens that suit English."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ragtune.config import ConfigError, compose, validate
from ragtune.custom_data import html_text, load_documents, load_maths, prepare_custom, read_document_file
from ragtune.data import Report, SplitConfig
from ragtune.io import DataError, iter_jsonl
from ragtune.records import KbChunk, MathsQuestion, ReadingQuestion, Triple, write_records
from ragtune.retrieval import BM25Index, tokenize_zh
from ragtune.sources import CustomDataConfig, DataChoice, fetch_custom
from tests.conftest import ROOT, project_env

EXAMPLES = ROOT / "examples"
SPLIT = SplitConfig()  # the default chunking: 200 characters, 50 of overlap
BASE_CFG = {"kind": "custom", "folder": "mydata", "local_dir": "mydata", "documents": "docs", "reading": [],
            "reading_eval": [], "maths": [], "maths_eval": [], "eval_fraction": 0.25, "maths_eval_fraction": 0.25}

DOCS = {
    "docs/en_harbour.md": "# Harbour\n\nThe harbour master is Ada Lin. Boats leave at dawn every day.\n",
    "docs/en_market.txt": "Fish Market\n\nThe fish market opens on Tuesday. Its oldest stall sells smoked eel.\n",
    "docs/zh_bridge.txt": "石桥\n\n石桥建于1820年，全长四十米。桥下的河叫清水河。\n",
}


def project(tmp_path: Path, files: dict[str, str | bytes], **cfg) -> tuple[Path, CustomDataConfig]:
    """data/raw/custom/ as fetch leaves it, holding `files`, and the config naming them."""
    raw = tmp_path / "raw"
    for rel, content in files.items():
        path = raw / "custom" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return raw, CustomDataConfig(**(BASE_CFG | cfg))


def jsonl(*rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def run(raw: Path, data: CustomDataConfig, seed: int = 1):
    return prepare_custom(raw, data=data, split=SPLIT, seed=seed)


def example_config(**overrides) -> CustomDataConfig:
    return CustomDataConfig(**(yaml.safe_load(compose(["data=custom"]))["data"] | overrides))


@pytest.fixture(scope="module")
def example_raw(tmp_path_factory) -> Path:
    """examples/ fetched as data=custom's defaults name it."""
    raw = tmp_path_factory.mktemp("raw")
    fetch_custom(example_config(), raw, root=ROOT)
    return raw


@pytest.fixture(scope="module")
def example_outputs(example_raw):
    return run(example_raw, example_config(), seed=42)


# --------------------------------------------------------------------------- configuration and fetch


def test_custom_yaml_composes_to_the_example_dataset_and_local_dir_follows_folder():
    data = yaml.safe_load(compose(["data=custom"]))["data"]
    cfg = validate(DataChoice, data)
    assert isinstance(cfg, CustomDataConfig) and cfg.folder == cfg.local_dir == "examples"
    moved = validate(DataChoice, yaml.safe_load(compose(["data=custom", "data.folder=mydata", "data.maths=null"]))["data"])
    assert moved.local_dir == "mydata" and moved.maths == []
    default = yaml.safe_load(compose([]))["data"]
    assert default["kind"] == "cmrc_gsm8k" and default["local_dir"] == "conf/data"


@pytest.mark.parametrize("change, message", [
    ({"folder": "/abs/data", "local_dir": "/abs/data"}, "relative path"),
    ({"folder": "../outside", "local_dir": "../outside"}, "relative path"),
    ({"folder": "data/mine", "local_dir": "data/mine"}, "pipeline output"),
    ({"local_dir": "elsewhere"}, "must equal folder"),
    ({"documents": None, "reading": [], "maths": []}, "nothing to build from"),
    ({"reading": ["qa.jsonl"], "reading_eval": ["qa.jsonl"]}, "named by both"),
    ({"eval_fraction": 1.0}, "eval_fraction"),
    ({"kind": "squad"}, "kind"),
])
def test_bad_custom_configs_are_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(DataChoice, BASE_CFG | change)


def test_fetch_copies_the_files_with_their_layout_and_sha256(tmp_path):
    import hashlib

    cfg = example_config()
    fetched = fetch_custom(cfg, tmp_path, root=ROOT)
    files = {f["file"] for f in fetched}
    assert "custom/docs/en_bakery.md" in files and "custom/reading_squad.json" in files and len(files) == 12 + 5
    for f in fetched:
        assert f["sha256"] == hashlib.sha256((tmp_path / f["file"]).read_bytes()).hexdigest()
        assert (tmp_path / f["file"]).read_bytes() == (ROOT / "examples" / f["file"].removeprefix("custom/")).read_bytes()


def test_fetch_names_a_missing_file_and_an_empty_folder(tmp_path):
    (tmp_path / "mydata" / "docs").mkdir(parents=True)
    with pytest.raises(DataError, match="data.documents: the folder .*docs holds no file"):
        fetch_custom(CustomDataConfig(**BASE_CFG), tmp_path / "raw", root=tmp_path)
    (tmp_path / "mydata" / "docs" / "a.txt").write_text("A\n\ntext.")
    with pytest.raises(DataError, match=r"data.reading: .*mydata/qa.jsonl not found"):
        fetch_custom(CustomDataConfig(**BASE_CFG | {"reading": ["qa.jsonl"]}), tmp_path / "raw", root=tmp_path)
    with pytest.raises(DataError, match="data.folder: .* is not a folder"):
        fetch_custom(CustomDataConfig(**BASE_CFG | {"folder": "nope", "local_dir": "nope"}), tmp_path / "raw", root=tmp_path)


# --------------------------------------------------------------------------- documents


def test_docs_folder_and_kb_jsonl_give_the_same_documents():
    from_files = load_documents(EXAMPLES / "docs", Report())
    from_jsonl = load_documents(EXAMPLES / "kb.jsonl", Report())
    assert len(from_files) == 12
    assert {(d.id, d.title, d.context) for d in from_files} == {(d.id, d.title, d.context) for d in from_jsonl}
    by_id = {d.id: d for d in from_files}
    assert by_id["en_bakery"].title == "Harbour Crust Bakery"  # .md: the '# ' heading
    assert by_id["zh_tea"].title == "岚峰云雾茶合作社"  # .txt: the first line
    assert not by_id["en_bakery"].context.startswith("#")


def test_title_rules_for_txt_and_md(tmp_path):
    cases = {"a.md": ("# Title\nBody text.", ("Title", "Body text.")),
             "b.md": ("No heading here.\n\nMore.", ("", "No heading here.\n\nMore.")),
             "c.txt": ("One paragraph without a title line.\nSecond line.", ("", "One paragraph without a title line.\nSecond line.")),
             "d.txt": ("\ufeffTitle\r\n\r\nBody.\r\n", ("Title", "Body."))}  # BOM and CRLF
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_text(content, encoding="utf-8", newline="")
        assert read_document_file(tmp_path / name) == expected, name


def test_html_documents_use_the_standard_parser(tmp_path):
    page = ("<html><head><title>Pier &amp; Ferry</title><style>p {color: red}</style></head><body>"
            "<h1>The pier</h1><p>The ferry leaves at <b>7:15</b>.</p><script>var x = 1;</script>"
            "<ul><li>Bikes ride free.</li><li>Dogs too.</li></ul></body></html>")
    assert html_text(page) == ("Pier & Ferry", "The pier\nThe ferry leaves at 7:15.\nBikes ride free.\nDogs too.")
    (tmp_path / "pier.html").write_text(page, encoding="utf-8")
    docs = load_documents(tmp_path, Report())
    assert docs[0].id == "pier" and docs[0].title == "Pier & Ferry" and "var x" not in docs[0].context


def minimal_pdf(text: str, title: str = "") -> bytes:
    """A one-page PDF showing `text` (ASCII) in Helvetica, built by hand with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        f"<< /Title ({title}) >>".encode(),
    ]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 6 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def test_pdf_documents_need_pypdf_and_say_so(tmp_path):
    (tmp_path / "keeper.pdf").write_bytes(minimal_pdf("The keeper retired in 1988.", "Keeper"))
    if importlib.util.find_spec("pypdf") is None:
        with pytest.raises(DataError, match=r"keeper.pdf: a .pdf document needs the pypdf package.*pip install pypdf"):
            read_document_file(tmp_path / "keeper.pdf")
    else:
        assert read_document_file(tmp_path / "keeper.pdf") == ("Keeper", "The keeper retired in 1988.")
        (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
        with pytest.raises(DataError, match="broken.pdf: not a readable PDF"):
            read_document_file(tmp_path / "broken.pdf")


# --------------------------------------------------------------------------- the example dataset end to end


def test_examples_give_every_prepared_file_with_its_schema(example_outputs):
    outputs, stats = example_outputs
    kb = outputs["kb.jsonl"]
    assert all(isinstance(c, KbChunk) for c in kb) and {c.article_id for c in kb} == {d.stem for d in (EXAMPLES / "docs").iterdir()}
    for doc in {c.article_id for c in kb}:  # stable ids <doc id>-<n>, numbered from 0
        assert [c.chunk_id for c in kb if c.article_id == doc] == [f"{doc}-{n}" for n in range(sum(c.article_id == doc for c in kb))]
    assert all(len(c.text) <= SPLIT.chunk_size for c in kb)
    train, evaluation = outputs["cmrc_train.jsonl"], outputs["cmrc_eval.jsonl"]
    assert all(isinstance(r, ReadingQuestion) for r in train + evaluation)
    assert (len(train), len(evaluation)) == (24 + 16, 6)  # SQuAD's 24 answerable + reading.jsonl's 16; the eval file's 6
    chunk_text = {c.chunk_id: c.text for c in kb}
    for row in train + evaluation:  # every gold chunk holds an answer, and every context the first one
        assert all(any(a in chunk_text[g] for a in row.answers) for g in row.gold_chunk_ids)
        assert row.answers[0] in row.context
        assert row.article_id[:2] == row.id[:2]  # zh questions about zh documents, en about en
    maths_train, maths_eval = outputs["gsm8k_train.jsonl"], outputs["gsm8k_eval.jsonl"]
    assert all(isinstance(r, MathsQuestion) for r in maths_train + maths_eval)
    assert (len(maths_train), len(maths_eval)) == (12, 4)  # 16 problems, 25 % held out
    assert all(isinstance(t, Triple) and t.pos and t.neg for t in outputs["embed_train.jsonl"])
    assert len(outputs["embed_train.jsonl"]) == len(train)
    assert stats["reading"]["placed_by_context"] == 24 and stats["reading"]["placed_by_answer"] == 22
    assert stats["reading"]["unanswerable_kept_out"] == 2
    assert {u["id"] for u in stats["unanswerable"]} == {"zh-sq-13", "en-sq-13"}
    assert stats["maths"]["gsm8k_format"] == 12 and stats["maths"]["simple_format"] == 4
    assert stats["leak_check"]["passed"] and not stats["drops"]


def test_examples_rerun_identically(example_raw, example_outputs):
    again, _ = run(example_raw, example_config(), seed=42)
    assert {k: [r.model_dump() for r in v] for k, v in again.items()} == \
        {k: [r.model_dump() for r in v] for k, v in example_outputs[0].items()}


def test_squad_questions_keep_their_offsets_and_maths_their_rationale(example_outputs):
    outputs, _ = example_outputs
    rows = {r.id: r for r in outputs["cmrc_train.jsonl"]}
    assert rows["zh-sq-01"].answers == ["1897年", "1897"] and rows["zh-sq-01"].article_id == "zh_lighthouse"
    maths = {r.id: r for r in outputs["gsm8k_train.jsonl"] + outputs["gsm8k_eval.jsonl"]}
    gsm = [r for r in maths.values() if r.id.startswith("maths-")]
    simple = [r for r in maths.values() if r.id.startswith(("zh-ms", "en-ms"))]
    assert len(gsm) == 12 and len(simple) == 4  # GSM8K lines have no id: <file stem>-<line>
    assert all(r.rationale for r in gsm if r in outputs["gsm8k_train.jsonl"])
    assert all(r.rationale == "" for r in simple if r in outputs["gsm8k_train.jsonl"])
    assert maths["maths-1"].answer == "168"


def test_held_out_by_document_with_the_leak_check(example_raw):
    outputs, stats = run(example_raw, example_config(reading_eval=[], eval_fraction=0.25), seed=3)
    train_docs = {r.article_id for r in outputs["cmrc_train.jsonl"]}
    eval_docs = {r.article_id for r in outputs["cmrc_eval.jsonl"]}
    assert len(eval_docs) == 3 and not train_docs & eval_docs  # 12 documents hold questions: a quarter held out
    assert stats["leak_check"]["contexts_checked"]
    assert len(outputs["cmrc_train.jsonl"]) + len(outputs["cmrc_eval.jsonl"]) == 24 + 16  # reading_eval.jsonl unread


def test_a_document_repeated_inside_another_is_a_leak(tmp_path):
    market = DOCS["docs/en_market.txt"].split("\n\n", 1)[1].strip()
    files = dict(DOCS) | {"docs/zz_copy.txt": "Copy\n\n" + market + " Boats unload at the quay."}
    squad = {"data": [{"title": "Fish Market", "paragraphs": [{"id": "en_market", "context": market, "qas": [
        {"id": "q2", "question": "What does the oldest stall sell?", "answers": [{"text": "smoked eel", "answer_start": 57}]}]}]}]}
    qa = jsonl({"id": "q1", "question": "Who is the harbour master?", "answers": ["Ada Lin"]},
               {"id": "q3", "question": "Where do boats unload?", "answers": ["at the quay"]})
    raw, cfg = project(tmp_path, files | {"qa.jsonl": qa, "sq.json": json.dumps(squad)}, reading=["qa.jsonl", "sq.json"],
                       eval_fraction=0.4)
    # en_market's text is inside zz_copy: holding out en_market while zz_copy trains is a leak
    outcomes = set()
    for seed in range(12):
        try:
            outputs, _ = run(raw, cfg, seed=seed)
            eval_docs = {r.article_id for r in outputs["cmrc_eval.jsonl"]}
            assert not ("en_market" in eval_docs and "zz_copy" not in eval_docs)
            outcomes.add("passed")
        except DataError as err:
            assert "leak into train" in str(err) and "en_market: context also in train" in str(err)
            outcomes.add("leak")
    assert outcomes == {"passed", "leak"}


# --------------------------------------------------------------------------- reading questions


def test_jsonl_with_a_context_is_placed_in_its_document_or_becomes_one(tmp_path):
    qa = jsonl({"id": "in", "question": "Who is the harbour master?", "answers": ["Ada Lin"],
                "context": "The harbour master is Ada Lin."},
               {"id": "new", "question": "What colour is the lighthouse?", "answers": [{"text": "white", "answer_start": 18}],
                "context": "The lighthouse is white and red."})
    raw, cfg = project(tmp_path, DOCS | {"qa.jsonl": qa}, reading=["qa.jsonl"], eval_fraction=0)
    outputs, stats = run(raw, cfg)
    rows = {r.id: r for r in outputs["cmrc_train.jsonl"]}
    assert rows["in"].article_id == "en_harbour"
    assert rows["new"].article_id.startswith("context-") and rows["new"].context == "The lighthouse is white and red."
    assert stats["documents"]["from_contexts"] == 1 and stats["reading"]["placed_by_context"] == 2
    assert any(c.article_id == rows["new"].article_id for c in outputs["kb.jsonl"])


def test_without_documents_the_contexts_are_the_knowledge_base(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "Pier", "paragraphs": [
        {"context": "The pier was rebuilt in 1999. It is 300 metres long.",
         "qas": [{"id": "p1", "question": "When was the pier rebuilt?", "answers": [{"text": "1999", "answer_start": 24}]},
                 {"id": "p2", "question": "Who owns the pier?", "answers": [], "is_impossible": True}]}]}]}
    raw, cfg = project(tmp_path, {"squad.json": json.dumps(squad)}, documents=None, reading=["squad.json"], eval_fraction=0)
    outputs, stats = run(raw, cfg)
    assert [c.article_id for c in outputs["kb.jsonl"]] == ["squad-0-0"] and outputs["kb.jsonl"][0].title == "Pier"
    assert [r.id for r in outputs["cmrc_train.jsonl"]] == ["p1"] and stats["unanswerable"][0]["id"] == "p2"


def test_answer_placement_finds_the_chunk_and_drops_what_it_cannot_place(tmp_path):
    files = DOCS | {"docs/en_boats.md": "# Boats\n\nBoats leave at dawn every day from the harbour."}
    qa = jsonl({"id": "found", "question": "Who is the harbour master?", "answers": ["Ada Lin"]},
               {"id": "nowhere", "question": "Who runs the bakery?", "answers": ["Mei Okafor"]},
               {"id": "twice", "question": "When do boats leave?", "answers": ["at dawn"]},
               {"id": "zh", "question": "石桥全长多少米？", "answers": ["四十米"]})
    raw, cfg = project(tmp_path, files | {"qa.jsonl": qa}, reading=["qa.jsonl"], eval_fraction=0)
    outputs, stats = run(raw, cfg)
    rows = {r.id: r for r in outputs["cmrc_train.jsonl"]}
    assert set(rows) == {"found", "zh"}
    assert rows["found"].article_id == "en_harbour" and "Ada Lin" in rows["found"].context
    kb = {c.chunk_id: c.text for c in outputs["kb.jsonl"]}
    assert rows["zh"].gold_chunk_ids and all("四十米" in kb[g] for g in rows["zh"].gold_chunk_ids)
    assert stats["reading"]["placed_by_answer"] == 2
    assert stats["reading"]["dropped_answer_not_found"] == 1
    assert stats["reading"]["dropped_answer_in_several_documents"] == 1
    assert "one document holding any of its answers" in stats["reading"]["answer_placement_rule"]
    dropped = {d["where"].split("question ")[1].rstrip(")"): d["reason"] for d in stats["drops"]}
    assert dropped == {"nowhere": "answer_not_found", "twice": "answer_in_several_documents"}


def test_answer_in_several_chunks_takes_the_chunk_nearest_the_question(tmp_path):
    text = ("The north gate opens at noon. " * 3 + "Many walls stand here. " * 4 +
            "The south gate of the old city wall opens at noon on market days. " + "Other words follow. " * 4)
    raw, cfg = project(tmp_path, {"docs/gates.txt": text, "qa.jsonl": jsonl(
        {"id": "g", "question": "When does the south gate of the old city wall open?", "answers": ["noon"]})},
        reading=["qa.jsonl"], eval_fraction=0)
    outputs, stats = run(raw, cfg)
    (row,) = outputs["cmrc_train.jsonl"]
    assert "south gate" in row.context and len(row.gold_chunk_ids) >= 2
    assert stats["reading"]["answer_in_several_chunks"] == 1


def test_a_user_given_eval_file_and_the_maths_eval_file(tmp_path):
    qa = jsonl({"id": "t", "question": "Who is the harbour master?", "answers": ["Ada Lin"]})
    ev = jsonl({"id": "e", "question": "When does the fish market open?", "answers": ["Tuesday"]})
    maths = jsonl({"question": "Ada has 3 boats and buys 2. How many boats?", "answer": "3+2=<<3+2=5>>5\n#### 5"})
    maths_ev = jsonl({"id": "m-e", "question": "A stall sells 4 eels a day. How many in 7 days?", "answer": 28})
    raw, cfg = project(tmp_path, DOCS | {"qa.jsonl": qa, "ev.jsonl": ev, "m.jsonl": maths, "mev.jsonl": maths_ev},
                       reading=["qa.jsonl"], reading_eval=["ev.jsonl"], maths=["m.jsonl"], maths_eval=["mev.jsonl"])
    outputs, stats = run(raw, cfg)
    assert [r.id for r in outputs["cmrc_eval.jsonl"]] == ["e"] and [r.id for r in outputs["cmrc_train.jsonl"]] == ["t"]
    assert outputs["gsm8k_train.jsonl"][0].rationale == "3+2=<<3+2=5>>5" and outputs["gsm8k_train.jsonl"][0].answer == "5"
    assert outputs["gsm8k_eval.jsonl"][0].model_dump() == {"id": "m-e", "question": "A stall sells 4 eels a day. How many in 7 days?",
                                                           "answer": "28", "rationale": ""}
    assert stats["reading"]["held_out"] == "reading_eval" and stats["maths"]["held_out"] == "maths_eval"


def test_a_question_asked_in_train_and_eval_is_a_leak(tmp_path):
    q = {"question": "Who is the harbour master?", "answers": ["Ada Lin"]}
    raw, cfg = project(tmp_path, DOCS | {"qa.jsonl": jsonl(q | {"id": "a"}), "ev.jsonl": jsonl(q | {"id": "b"})},
                       reading=["qa.jsonl"], reading_eval=["ev.jsonl"])
    with pytest.raises(DataError, match="(?s)1 eval items leak into train.*b: question also in train"):
        run(raw, cfg)


def test_gsm8k_and_simple_maths_files():
    rows, formats = load_maths(EXAMPLES / "maths.jsonl", [])
    assert formats == {"gsm8k": 12, "simple": 0} and rows[0]["id"] == "maths-1" and rows[0]["answer"] == "168"
    assert "<<2*28=56>>" in rows[0]["rationale"] and "####" not in rows[0]["rationale"]
    rows, formats = load_maths(EXAMPLES / "maths_simple.jsonl", [])
    assert formats == {"gsm8k": 0, "simple": 4} and all(r["rationale"] == "" for r in rows)
    assert {r["id"] for r in rows} == {"zh-ms-01", "zh-ms-02", "en-ms-01", "en-ms-02"}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("files, cfg, message", [
    ({"docs/a.txt": "", "docs/b.md": "   \n"}, {"maths": []}, r"docs: no usable document \(2 read, all empty\)"),
    ({"docs/a.docx": "PK"}, {}, r"a.docx: unsupported document type '.docx'"),
    ({"docs/a.md": "# A\n\ntext", "docs/a.txt": "A\n\ntext"}, {}, r"a.txt: document id 'a' repeats .*a.md"),
    ({"docs/a.txt": b"Title\n\ncaf\xe9 au lait"}, {}, r"a.txt:3: not UTF-8 text"),
    ({"kb.jsonl": '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"\n'}, {"documents": "kb.jsonl"}, r"kb.jsonl:2:\d+: malformed JSON"),
    ({"kb.jsonl": '{"id": "a", "title": "A"}\n'}, {"documents": "kb.jsonl"}, r"kb.jsonl:1: missing field 'text'"),
    ({"kb.jsonl": '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n'}, {"documents": "kb.jsonl"},
     r"kb.jsonl:2 \(document a\): document id 'a' repeats .*kb.jsonl:1"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.jsonl": '{"id": "q", "question": "Who?"}\n'}, {"reading": ["qa.jsonl"]},
     r"qa.jsonl:1 \(question q\): missing field 'answers'"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.jsonl": b'{"id": "q", "question": "Wh\xff?", "answers": ["Ada"]}\n'},
     {"reading": ["qa.jsonl"]}, r"qa.jsonl:1: not UTF-8 text"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.jsonl": '{"id": "q", "question": "Who?", "answers": ["Ada"], "context": " "}\n'},
     {"reading": ["qa.jsonl"]}, r"qa.jsonl:1 \(question q\): empty 'context'"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.jsonl": '{"id": "q", "question": "Who?", "answers": [3]}\n'},
     {"reading": ["qa.jsonl"]}, r"qa.jsonl:1 \(question q\) answer 0: an answer must be a string"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.jsonl": '{"id": "q", "question": "Who?", "answers": ["Ada"]}\n',
      "ev.jsonl": '{"id": "q", "question": "Who is it?", "answers": ["Lin"]}\n'},
     {"reading": ["qa.jsonl"], "reading_eval": ["ev.jsonl"]}, r"ev.jsonl:1 \(question q\): question id 'q' repeats .*qa.jsonl:1"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.jsonl": '{"id": "q", "question": "Who?", "answers": ["Bob"]}\n'},
     {"reading": ["qa.jsonl"]}, r"qa.jsonl: no usable question \(dropped: 1 answer_not_found; unanswerable: 0\)"),
    ({"docs/a.txt": "A\n\nAda Lin.", "sq.json": json.dumps({"data": [{"title": "t", "paragraphs": [
        {"context": "Ada Lin.", "qas": [{"id": "s1", "answers": [{"text": "Ada", "answer_start": 0}]}]}]}]})},
     {"reading": ["sq.json"]}, r"sq.json: question s1: missing field 'question'"),
    ({"docs/a.txt": "A\n\nAda Lin.", "sq.json": json.dumps({"data": [{"title": "t", "paragraphs": [
        {"id": "a", "context": "Bob Lin.", "qas": [{"id": "s1", "question": "Who?", "answers": [{"text": "Bob", "answer_start": 0}]}]}]}]})},
     {"reading": ["sq.json"]}, r"sq.json: question s1: its paragraph id 'a' names a document whose text does not contain"),
    ({"docs/a.txt": "A\n\nAda Lin.", "sq.json": '{"data": 3}'}, {"reading": ["sq.json"]}, r"sq.json: expected a JSON object with a 'data' list"),
    ({"docs/a.txt": "A\n\nAda Lin.", "qa.csv": "q,a\n"}, {"reading": ["qa.csv"]}, r"qa.csv: reading questions are SQuAD JSON"),
    ({"docs/a.txt": "A\n\nAda Lin.", "m.jsonl": '{"question": "1+1?", "answer": "two"}\n'}, {"maths": ["m.jsonl"]},
     r"m.jsonl:1: the final answer is not a number \(got 'two'"),
    ({"docs/a.txt": "A\n\nAda Lin.", "m.jsonl": '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n{"question": "", "answer": "3"}\n'},
     {"maths": ["m.jsonl"]}, r"m.jsonl:2: empty 'question'"),
    ({"docs/a.txt": "A\n\nAda Lin.", "m.jsonl": '{"id": 1, "question": "1+1?", "answer": 2}\n{"id": "1", "question": "2+2?", "answer": 4}\n'},
     {"maths": ["m.jsonl"]}, r"m.jsonl:2: maths question id '1' repeats .*m.jsonl:1"),
    ({"docs/a.txt": "A\n\nAda Lin.", "m.jsonl": "\n"}, {"maths": ["m.jsonl"]}, r"m.jsonl: no records"),
    ({"qa.jsonl": '{"id": "q", "question": "Who?", "answers": ["Ada"]}\n'}, {"documents": None, "reading": ["qa.jsonl"]},
     r"no knowledge base: data.documents is null and no reading question has a context"),
    ({"docs/a.txt": "A\n\nAda Lin."}, {"maths": [], "reading": []}, r"nothing to train on"),
])
def test_bad_input_is_one_clear_error_naming_file_and_record(tmp_path, files, cfg, message):
    raw, data = project(tmp_path, files, **cfg)
    with pytest.raises(DataError, match=message) as err:
        run(raw, data)
    assert "\n" not in str(err.value)


def test_noisy_records_are_counted_drops(tmp_path):
    qa = jsonl({"id": "ok", "question": "Who is the harbour master?", "answers": ["Ada Lin", ""]},
               {"id": "blank", "question": "  ", "answers": ["x"]},
               {"id": "moved", "question": "When do boats leave?", "context": "Boats leave at dawn every day.",
                "answers": [{"text": "at dawn", "answer_start": 2}, {"text": "at noon"}]},
               {"id": "none", "question": "What is here?", "answers": []})
    raw, cfg = project(tmp_path, DOCS | {"docs/empty.md": "# Empty\n", "qa.jsonl": jsonl() + "\n" + qa},
                       reading=["qa.jsonl"], eval_fraction=0)
    outputs, stats = run(raw, cfg)
    assert {r.id for r in outputs["cmrc_train.jsonl"]} == {"ok", "moved"}
    reading = stats["reading"]
    assert reading["dropped_empty_answer"] == 1 and reading["dropped_empty_question"] == 1
    assert reading["dropped_answer_not_in_context"] == 1 and reading["repaired_answer_start_relocated"] == 1
    assert reading["unanswerable_kept_out"] == 1 and reading["blank_lines_skipped"] == 1
    assert stats["documents"]["dropped_empty"] == 1 and stats["documents"]["read"] == 3


def test_split_stage_on_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "data" / "raw" / "custom" / "docs").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "custom" / "docs" / "a.txt").write_bytes(b"Title\n\n\xff\xfe")
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"] = BASE_CFG | {"maths": []}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "split.py")], cwd=tmp_path,
                          env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("split: ") and "a.txt:3: not UTF-8 text" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data" / "prepared").exists()


# --------------------------------------------------------------------------- absent inputs


def write_prepared(folder: Path, outputs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in outputs.items():
        write_records(folder / name, rows)
    return folder


def load_stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage_dir(tmp_path: Path, outputs: dict, **params_data) -> Path:
    """A folder to run stages in: params.yaml (data=custom) and data/prepared from `outputs`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["data"] = BASE_CFG | params_data
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    write_prepared(tmp_path / "data" / "prepared", outputs)
    return tmp_path


def test_no_maths_distill_writes_empty_outputs_and_says_so(example_raw, tmp_path):
    outputs, stats = run(example_raw, example_config(maths=[]), seed=42)
    assert outputs["gsm8k_train.jsonl"] == [] and outputs["gsm8k_eval.jsonl"] == [] and stats["maths"]["train"] == 0
    folder = stage_dir(tmp_path, outputs, maths=[])
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "distill.py")], cwd=folder,
                          env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no maths questions" in proc.stdout and "skipping" in proc.stdout
    distill = folder / "data" / "distill"
    assert json.loads((distill / "distilled_train.json").read_text()) == []
    assert json.loads((distill / "left_data.json").read_text()) == []
    assert (distill / "cache.jsonl").exists() and json.loads((distill / "stats.json").read_text())["items"] == 0


def test_simple_maths_without_a_rationale_are_skipped_by_the_offline_teacher(example_raw, tmp_path):
    outputs, _ = run(example_raw, example_config(maths=["maths_simple.jsonl"], maths_eval_fraction=0), seed=42)
    folder = stage_dir(tmp_path, outputs)
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "distill.py")], cwd=folder,
                          env=project_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 maths questions have no worked solution" in proc.stdout and "skipping" in proc.stdout


def test_no_maths_router_fits_on_reading_plus_templates_and_still_routes(example_raw, tmp_path):
    from ragtune.router import ClassifierRouterConfig, build_router, evaluate_router

    outputs, _ = run(example_raw, example_config(maths=[]), seed=42)
    prepared = write_prepared(tmp_path / "prepared", outputs)
    router, info = build_router(ClassifierRouterConfig(kind="classifier", synthetic_per_label=300, ngram_max=4, C=10.0),
                                prepared, 42)
    assert info["train_questions"]["maths"] > 0  # the templates
    maths = [r["question"] for _, r in iter_jsonl(EXAMPLES / "maths.jsonl")]
    reading = [r["question"] for _, r in iter_jsonl(EXAMPLES / "reading_eval.jsonl")]
    assert router.route_many(reading) == ["reading"] * len(reading)
    zh_maths = [q for q in maths if not q.isascii()]
    assert router.route_many(zh_maths) == ["maths"] * len(zh_maths)
    assert sum(r == "maths" for r in router.route_many(maths)) >= 10  # of 12: English word problems are the hard part
    metrics = evaluate_router(router, prepared)
    assert metrics["empty_sets"] == ["gsm8k_eval"] and metrics["n"] == 6 and metrics["accuracy"] == 1.0
    with pytest.raises(DataError, match="no maths training questions"):
        build_router(ClassifierRouterConfig(kind="classifier", synthetic_per_label=0, ngram_max=4, C=10.0), prepared, 42)


def test_no_reading_embed_ft_copies_the_base_embedder_and_sft_trains_on_maths(example_raw, tmp_path, embedder_dir):
    outputs, stats = run(example_raw, example_config(reading=[], reading_eval=[]), seed=42)
    assert outputs["cmrc_train.jsonl"] == [] and outputs["embed_train.jsonl"] == [] and outputs["kb.jsonl"]
    assert stats["maths"]["train"] == 12
    folder = stage_dir(tmp_path, outputs, reading=[], reading_eval=[])
    shutil.copytree(embedder_dir, folder / "models" / "base" / "embedder")
    env = project_env(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "embed_ft.py")], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping training" in proc.stdout
    metrics = json.loads((folder / "reports" / "embed_ft" / "metrics.json").read_text())
    assert "no reading questions" in metrics["skipped"] and metrics["eval_queries"] == 0
    assert (folder / "models" / "embed_ft" / "modules.json").exists()
    # sft's reading records: none, said so (it then trains on the distilled maths alone)
    import os

    sft = load_stage("sft")
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        records, built = sft.cmrc_records(None, None, "", 42, "cpu")
    finally:
        os.chdir(cwd)
    assert records == [] and built == {}


def test_no_documents_and_no_contexts_names_what_is_missing(tmp_path):
    raw, cfg = project(tmp_path, {"m.jsonl": jsonl({"question": "1+1?", "answer": "2"})}, documents=None, maths=["m.jsonl"])
    with pytest.raises(DataError, match="no knowledge base: data.documents is null"):
        run(raw, cfg)


def test_eval_scores_only_the_sets_that_exist(example_outputs, base_generator, tmp_path):
    """A bundle over the examples' KB, no held-out maths: the served reading rows are scored, the maths set
    is empty and the paired difference skips it."""
    from ragtune.bundle import Bundle, build_bundle
    from ragtune.evaluate import EvalConfig, evaluate_bundle, paired_differences, question_sets
    from ragtune.inference import Completion
    from ragtune.router import ClassifierRouter

    outputs, _ = example_outputs
    prepared = write_prepared(tmp_path / "prepared", outputs)
    chunks = outputs["kb.jsonl"]
    router = ClassifierRouter.fit([(q.question, "reading") for q in outputs["cmrc_train.jsonl"]]
                                  + [(q.question, "maths") for q in outputs["gsm8k_train.jsonl"]], seed=1, ngram_max=3, c=10.0)
    router.save(tmp_path / "router")
    from tests.bundle_fixtures import TINY_ANSWER

    build_bundle(tmp_path / "bundle", kb_path=prepared / "kb.jsonl", base_dir=base_generator, router_dir=tmp_path / "router",
                 retriever=BM25Index([c.chunk_id for c in chunks], [c.text for c in chunks]), answer=TINY_ANSWER)

    class Echo:
        def generate_detailed(self, user_texts, max_new_tokens, prefixes=None):
            return [Completion("\\boxed{1}") for _ in user_texts]

    bundle = Bundle.load(tmp_path / "bundle", generator=Echo())
    cfg = EvalConfig(cmrc_samples=4, abstain_samples=2, similarity=False, bootstrap_resamples=100)
    sets = question_sets(outputs["cmrc_eval.jsonl"], [], cfg, 42)
    metrics, rows = evaluate_bundle(bundle, sets, cfg, 42, log=lambda *_: None)
    assert metrics["served"]["cmrc"]["official_em"]["n"] == 4 and metrics["served"]["gsm8k"] == {}
    assert rows["served_gsm8k"] == []
    diffs = paired_differences(load_stage("eval").scored(rows), load_stage("eval").scored(rows), 42, 100)
    assert "served_cmrc.official_em" in diffs and not any(k.startswith("served_gsm8k") for k in diffs)


# --------------------------------------------------------------------------- BM25 for English


def test_tokens_suit_english_and_keep_chinese_one_character_words():
    assert tokenize_zh("The Bakery's seaweed-sourdough costs 9 yuan; it opens at 6:45!") == \
        ["the", "bakery", "seaweed", "sourdough", "costs", "9", "yuan", "it", "opens", "at", "6", "45"]
    assert tokenize_zh("Café Müller’s naïve ÉCOLE don't") == ["café", "müller", "naïve", "école", "don't"]
    assert tokenize_zh("猫和书，宋。") == ["猫", "和", "书", "宋"]
    assert tokenize_zh("LED灯组在Café里") == ["led", "灯组", "在", "café", "里"]


def test_an_english_query_finds_its_english_chunk(example_outputs):
    outputs, _ = example_outputs
    kb = outputs["kb.jsonl"]
    index = BM25Index([c.chunk_id for c in kb], [c.text for c in kb])
    text = {c.chunk_id: c.text for c in kb}
    top = index.retrieve("On which day is the bakery's oven cleaned?", 1)[0][0]
    assert top.startswith("en_bakery-") and "Thursday" in text[top]
    top = index.retrieve("What colour are the electric bikes of the bike share?", 1)[0][0]
    assert top.startswith("en_bikes-") and "orange" in text[top]
    top = index.retrieve("岚峰灯塔在哪一年改为电力照明？", 1)[0][0]
    assert top.startswith("zh_lighthouse-")
    rows = outputs["cmrc_eval.jsonl"] + outputs["cmrc_train.jsonl"]
    hits = index.retrieve_many([r.question for r in rows], 3)
    found = sum(any(cid in r.gold_chunk_ids for cid, _ in h) for r, h in zip(rows, hits))
    assert found / len(rows) >= 0.9
