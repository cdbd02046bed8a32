"""Bootstrap confidence intervals for per-question scores.

Evaluation sets here hold a few hundred questions, so a mean score moves by several points between
samples of the same size; these intervals say how much, and whether a difference between two systems
scored on the same questions is more than that noise. Percentile bootstrap, seeded, vectorised with
numpy (the only dependency).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Resampled indices are drawn in blocks of at most this many (8 bytes each, so 32 MiB): one matrix for
# the usual few hundred questions x 2000 resamples, blocks for larger sets. The block size depends only
# on the number of questions, so the same seed always gives the same draws.
_MAX_BLOCK_ELEMENTS = 4_000_000


def _as_scores(values: Sequence[float], name: str = "values") -> np.ndarray:
    """Per-question scores as a float vector; empty or non-finite input has no meaningful mean."""
    scores = np.asarray(values, dtype=float).reshape(-1)
    if scores.size == 0:
        raise ValueError(f"{name} is empty: a bootstrap needs at least one score")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name} holds NaN or infinite scores")
    return scores


def _check_settings(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level}")


def _resampled_means(scores: np.ndarray, seed: int, resamples: int) -> np.ndarray:
    """Means of `resamples` samples of `scores` drawn with replacement, one row of indices per sample."""
    n = scores.size
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, _MAX_BLOCK_ELEMENTS // n)
    means = np.empty(resamples)
    for start in range(0, resamples, rows_per_block):
        stop = min(resamples, start + rows_per_block)
        indices = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = scores[indices].mean(axis=1)
    return means


def _is_constant(scores: np.ndarray) -> bool:
    return bool(np.all(scores == scores[0]))


def _mean(scores: np.ndarray) -> float:
    """The mean, exactly the common value when all scores are equal (summation could round it)."""
    return float(scores[0]) if _is_constant(scores) else float(scores.mean())


def _percentile_interval(
    scores: np.ndarray, seed: int, resamples: int, level: float
) -> tuple[np.ndarray, float, float]:
    """(resampled means, low, high). Identical scores skip the draws: every resample mean is that score,
    and returning it exactly keeps float rounding from opening a spurious sliver of width."""
    if _is_constant(scores):
        value = float(scores[0])
        return np.full(resamples, value), value, value
    means = _resampled_means(scores, seed, resamples)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return means, float(low), float(high)


def bootstrap_ci(
    values: Sequence[float], seed: int = 0, resamples: int = 2000, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-question scores and its percentile-bootstrap interval at
    `level`, seeded with numpy's default_rng(seed) so that reports are reproducible."""
    _check_settings(resamples, level)
    scores = _as_scores(values)
    _, low, high = _percentile_interval(scores, seed, resamples, level)
    return _mean(scores), low, high


def paired_bootstrap_diff(
    a: Sequence[float], b: Sequence[float], seed: int = 0, resamples: int = 2000, level: float = 0.95
) -> dict[str, float]:
    """Mean of b - a over the same questions with a percentile-bootstrap interval, resampling questions
    jointly (pairing removes the question-difficulty noise that two separate intervals would carry).

    Returns mean_diff, low, high and p_value: an approximate two-sided bootstrap p-value for "no
    difference", twice the share of resampled mean differences at or beyond 0 on the far side from the
    observed one, capped at 1 (1.0 when the observed difference is 0)."""
    _check_settings(resamples, level)
    first, second = _as_scores(a, "a"), _as_scores(b, "b")
    if first.size != second.size:
        raise ValueError(f"paired scores need equal lengths: a has {first.size}, b has {second.size}")
    diffs = second - first
    means, low, high = _percentile_interval(diffs, seed, resamples, level)
    mean_diff = _mean(diffs)
    return {"mean_diff": mean_diff, "low": low, "high": high, "p_value": _two_sided_p(means, mean_diff)}


def _two_sided_p(resampled: np.ndarray, observed: float) -> float:
    if observed == 0.0:
        return 1.0
    beyond = resampled <= 0.0 if observed > 0.0 else resampled >= 0.0
    return float(min(1.0, 2.0 * np.mean(beyond)))


def format_ci(mean: float, low: float, high: float, scale: float = 100, digits: int = 1) -> str:
    """'41.1 [35.2, 47.0]': a score and its interval, scaled (to percent by default) for tables."""
    return f"{mean * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"
