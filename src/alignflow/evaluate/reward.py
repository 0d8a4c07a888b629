"""Reward-model accuracy and calibration (pure NumPy).

A Bradley-Terry reward model r turns a pair into a preference probability
P(chosen > rejected) = sigmoid(r(chosen) - r(rejected))  (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).
`preference_accuracy` asks how often the gap has the right sign on held-out human pairs, `gold_agreement`
asks the same against a gold utility where one exists, and `calibration` asks whether the probabilities mean
what they say (top-label expected calibration error, Guo et al. 2017, "On Calibration of Modern Neural
Networks", eq. 3): ECE = sum_b (|B_b| / n) * |acc(B_b) - conf(B_b)| over equal-width confidence bins on
[0.5, 1]. `preference_metrics` bundles accuracy, loss, margin and calibration as the RM recipe logs them.
This module is the only place those statistics are computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _as_1d(x: ArrayLike, name: str, allow_empty: bool = False) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0 and not allow_empty:
        raise ValueError(f"{name}: is empty")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{name}: value at index {int(bad[0])} is {float(arr[bad[0]])!r}; expected finite numbers"
        )
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} has {a.size} values but {nb} has {b.size}; they must be aligned per pair")


def bt_probability(score_gap: ArrayLike) -> np.ndarray:
    """Bradley-Terry preference probability sigmoid(gap). score_gap: (n,) r(chosen) - r(rejected) -> (n,).

    Computed as 0.5 * (1 + tanh(gap / 2)), which equals the logistic sigmoid and never overflows.
    """
    gap = _as_1d(score_gap, "score_gap", allow_empty=True)
    return 0.5 * (1.0 + np.tanh(0.5 * gap))


def preference_accuracy(score_chosen: ArrayLike, score_rejected: ArrayLike) -> float:
    """Fraction of pairs where the reward model scores the human-chosen response higher.

    Args:
        score_chosen: (n,) reward of each pair's chosen response.
        score_rejected: (n,) reward of the same pair's rejected response.

    Returns:
        Accuracy in [0, 1]; an exact tie counts one half (a coin flip between the two), so a constant
        reward model scores 0.5 rather than 0 or 1.
    """
    c = _as_1d(score_chosen, "score_chosen")
    r = _as_1d(score_rejected, "score_rejected")
    _same_length(c, r, "score_chosen", "score_rejected")
    gap = c - r
    return float(np.mean(np.where(gap > 0, 1.0, np.where(gap < 0, 0.0, 0.5))))


def gold_agreement(score_gap: ArrayLike, gold_gap: ArrayLike, tie_eps: float = 1e-9) -> tuple[float, int]:
    """How often the reward model orders a pair the same way as the gold utility.

    Args:
        score_gap: (n,) reward-model gap r(x, y1) - r(x, y2).
        gold_gap: (n,) gold-utility gap u(x, y1) - u(x, y2) for the same pairs.
        tie_eps: pairs with |gold_gap| <= tie_eps have no gold preference; they are excluded.

    Returns:
        `(accuracy, n_used)`: the fraction of the n_used non-tied pairs where sign(score_gap) equals
        sign(gold_gap) (a zero score gap counts one half), and n_used itself. When every pair is a gold tie
        the accuracy is NaN and n_used is 0: there is nothing to agree with.
    """
    s = _as_1d(score_gap, "score_gap")
    g = _as_1d(gold_gap, "gold_gap")
    _same_length(s, g, "score_gap", "gold_gap")
    if tie_eps < 0:
        raise ValueError(f"tie_eps: expected >= 0, got {tie_eps!r}")
    used = np.abs(g) > tie_eps
    n_used = int(used.sum())
    if n_used == 0:
        return float("nan"), 0
    agree = np.where(s[used] == 0, 0.5, (np.sign(s[used]) == np.sign(g[used])).astype(np.float64))
    return float(agree.mean()), n_used


def calibration(probs: ArrayLike, outcomes: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Top-label expected calibration error of pairwise preference probabilities, and its reliability bins.

    The one calibration of alignflow (the RM recipe's ``eval/ece``, the quickstart and the report). For a
    pair the model predicts the side it prefers, with confidence ``c = max(p, 1 - p)`` in [0.5, 1]; the
    prediction is correct when that side is the one preferred (``p > 0.5`` and outcome 1, or ``p < 0.5`` and
    outcome 0), and a tie ``p = 0.5`` counts one half, as in :func:`preference_accuracy`. Confidences are
    binned uniformly on [0.5, 1] and ``ECE = sum_b (|B_b| / n) |acc(B_b) - conf(B_b)|`` (Guo et al. 2017,
    eq. 3). This top-label form is the usual one and, unlike binning ``p`` itself on [0, 1], it does not
    depend on which side of a pair is listed first: swapping a pair maps ``p`` to ``1 - p`` and the outcome to
    ``1 - outcome``, which leaves ``c`` and correctness unchanged. Held-out pairs listed chosen-first are
    ``probs = bt_probability(score_chosen - score_rejected)`` with all outcomes 1.

    Args:
        probs: (n,) predicted P(first item preferred), in [0, 1].
        outcomes: (n,) 1 when the first item was the preferred one, else 0.
        n_bins: number of equal-width confidence bins on [0.5, 1]; bin b is
            [0.5 + b/(2 n_bins), 0.5 + (b+1)/(2 n_bins)), the last one also includes 1.0.

    Returns:
        ``{"ece": float, "bins": [{"lo", "hi", "confidence", "accuracy", "count"}, ...]}``: ``bins`` lists
        the non-empty bins in increasing order (empty bins carry no weight in the ECE and have no mean);
        ``confidence`` and ``accuracy`` are the bin's mean confidence and fraction correct.
    """
    p = _as_1d(probs, "probs")
    y = _as_1d(outcomes, "outcomes")
    _same_length(p, y, "probs", "outcomes")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
    out_of_range = np.flatnonzero((p < 0) | (p > 1))
    if out_of_range.size:
        i = int(out_of_range[0])
        raise ValueError(f"probs: value at index {i} is {float(p[i])!r}; expected a probability in [0, 1]")
    not_binary = np.flatnonzero((y != 0) & (y != 1))
    if not_binary.size:
        i = int(not_binary[0])
        raise ValueError(f"outcomes: value at index {i} is {float(y[i])!r}; expected 0 or 1")

    n_bins = int(n_bins)
    conf = np.maximum(p, 1.0 - p)  # (n,) in [0.5, 1]
    correct = np.where(p == 0.5, 0.5, ((p > 0.5) == (y == 1)).astype(np.float64))  # (n,)
    edges = np.linspace(0.5, 1.0, n_bins + 1)
    # side="right" on the interior edges puts a value equal to an edge into the bin that starts there.
    idx = np.searchsorted(edges[1:-1], conf, side="right")  # (n,) in [0, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_correct = np.bincount(idx, weights=correct, minlength=n_bins)
    bins: list[dict[str, float | int]] = []
    ece = 0.0
    for b in np.flatnonzero(count):
        confidence = float(sum_conf[b] / count[b])
        accuracy = float(sum_correct[b] / count[b])
        ece += (count[b] / p.size) * abs(accuracy - confidence)
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "confidence": confidence,
                "accuracy": accuracy,
                "count": int(count[b]),
            }
        )
    return {"ece": float(ece), "bins": bins}


def preference_metrics(
    score_chosen: ArrayLike, score_rejected: ArrayLike, n_bins: int = 10
) -> dict[str, Any]:
    """Held-out metrics of a reward model on pairs listed chosen-first (``docs/metrics.md#rm``).

    Args:
        score_chosen, score_rejected: (n,) rewards of each pair's chosen and rejected response.
        n_bins: confidence bins of :func:`calibration`.

    Returns:
        ``accuracy`` (:func:`preference_accuracy`, ties one half), ``loss`` (the unweighted Bradley-Terry loss
        ``mean(-log sigmoid(gap))``), ``margin`` (mean gap), ``ece`` and ``reliability`` (the bins) of
        :func:`calibration` with ``probs = sigmoid(gap)`` and every outcome 1.
    """
    c = _as_1d(score_chosen, "score_chosen")
    r = _as_1d(score_rejected, "score_rejected")
    _same_length(c, r, "score_chosen", "score_rejected")
    gap = c - r
    cal = calibration(bt_probability(gap), np.ones_like(gap), n_bins)
    return {
        "accuracy": preference_accuracy(c, r),
        "loss": float(np.mean(np.logaddexp(0.0, -gap))),  # -log sigmoid(gap), without overflow
        "margin": float(gap.mean()),
        "ece": cal["ece"],
        "reliability": cal["bins"],
    }
