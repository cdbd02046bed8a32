"""Bootstrap intervals on cases whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ragtune.stats import bootstrap_ci, format_ci, paired_bootstrap_diff


def test_all_equal_scores_give_a_zero_width_interval():
    assert bootstrap_ci([0.3] * 50) == (0.3, 0.3, 0.3)
    assert bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)


def test_empty_scores_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])


def test_coin_flips_match_the_normal_approximation():
    """400 fair 0/1 scores: the 95 % interval is about 2 * 1.96 * sqrt(.25 / 400) = 0.098 wide."""
    scores = (np.random.default_rng(7).random(400) < 0.5).astype(float)
    mean, low, high = bootstrap_ci(scores, seed=1)
    assert mean == pytest.approx(scores.mean())
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.2)


def test_the_same_seed_gives_the_same_interval():
    scores = np.random.default_rng(3).random(250)
    assert bootstrap_ci(scores, seed=5) == bootstrap_ci(list(scores), seed=5)
    assert bootstrap_ci(scores, seed=5) != bootstrap_ci(scores, seed=6)


def test_blocked_draws_give_the_same_kind_of_interval():
    """A set too large for one index matrix is drawn in blocks and still brackets its mean."""
    scores = np.random.default_rng(4).random(5000)
    mean, low, high = bootstrap_ci(scores, resamples=1000)
    assert low < mean < high
    assert high - low == pytest.approx(2 * 1.96 * scores.std() / math.sqrt(5000), rel=0.2)


def test_level_narrows_the_interval():
    scores = np.random.default_rng(5).random(200)
    _, low90, high90 = bootstrap_ci(scores, level=0.90)
    _, low99, high99 = bootstrap_ci(scores, level=0.99)
    assert high90 - low90 < high99 - low99


def test_identical_systems_differ_by_exactly_zero():
    scores = list(np.random.default_rng(8).random(300))
    result = paired_bootstrap_diff(scores, scores)
    assert (result["mean_diff"], result["low"], result["high"]) == (0.0, 0.0, 0.0)
    assert result["p_value"] == 1.0


def test_a_constant_improvement_has_a_point_interval():
    a = np.random.default_rng(9).random(300)
    result = paired_bootstrap_diff(a, a + 0.1)
    for key in ("mean_diff", "low", "high"):
        assert result[key] == pytest.approx(0.1, abs=1e-12)
    assert result["p_value"] == 0.0


def test_a_small_real_difference_is_inside_the_interval():
    """Two noisy 0/1 systems on 1000 questions; b is right 5 points more often than a, by construction."""
    rng = np.random.default_rng(10)
    difficulty = rng.random(1000)
    a = (rng.random(1000) < difficulty).astype(float)
    b = (rng.random(1000) < np.clip(difficulty + 0.05, 0, 1)).astype(float)
    result = paired_bootstrap_diff(a, b, seed=2)
    assert result["low"] < result["mean_diff"] < result["high"]
    true_gain = float(np.clip(difficulty + 0.05, 0, 1).mean() - difficulty.mean())
    assert result["low"] < true_gain < result["high"]
    assert 0.0 <= result["p_value"] <= 1.0


def test_the_paired_difference_is_b_minus_a():
    result = paired_bootstrap_diff([0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert result["mean_diff"] == 0.5 and result["low"] >= 0.0
    worse = paired_bootstrap_diff([1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    assert worse["mean_diff"] == -0.5 and worse["high"] <= 0.0


def test_unequal_lengths_are_rejected_with_both_lengths():
    with pytest.raises(ValueError, match=r"3.*2"):
        paired_bootstrap_diff([1.0, 0.0, 1.0], [1.0, 0.0])


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([0.0, 1.0], level=1.5)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([0.0, 1.0], resamples=0)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.0, float("nan")])


def test_format_ci():
    assert format_ci(0.4111, 0.352, 0.470) == "41.1 [35.2, 47.0]"
    assert format_ci(0.5, 0.25, 0.75, scale=1, digits=2) == "0.50 [0.25, 0.75]"
