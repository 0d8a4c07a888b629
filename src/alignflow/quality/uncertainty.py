"""Reward-model uncertainty for active learning: which items to label first, and which to send to experts.

An item is a prompt with two candidates A and B (or C candidates). A reward-model ensemble of M members gives
each candidate M rewards; ``d_m = r_A^m - r_B^m`` is member m's reward difference. Three numbers per item:

- **disagreement** ``s = std_m(d_m)`` (population std, as :func:`alignflow.models.reward.ensemble_scores`): how
  much the members disagree about the comparison (query by committee, Seung et al. 1992). It is the std of the
  *difference*, not a combination of the per-candidate stds: members that rank both candidates higher agree.
- **margin** ``|P(A > B) - 1/2|`` with ``P = sigmoid(mean_m d_m)`` (Bradley-Terry on the ensemble's mean
  reward): how close the ensemble's own preference is to a coin flip (uncertainty sampling, Lewis & Gale 1994).
- **priority** ``1 - 2 |P_s - 1/2|`` in ``[0, 1]`` with the *moderated* probability
  ``P_s = sigmoid(mu / sqrt(1 + pi s^2 / 8))``, ``mu = mean_m d_m``: the probit approximation of
  ``E[sigmoid(d)]`` for ``d ~ N(mu, s^2)`` (MacKay 1992, "The evidence framework applied to classification
  networks", eq. 26). It combines the two: with ``s = 0`` it is ``1 - 2 * margin``; for a fixed mean it rises
  with disagreement; 1 means a coin flip for the ensemble, 0 a certain comparison. It has no free weight and
  is comparable across reward scales only as far as the rewards are (a Bradley-Terry reward model's are
  log-odds).

For C candidates the item's figures are those of its most uncertain pair (the highest priority); the pair is
returned so a ranking task can ask about it first.

:func:`expert_mask` sends the most uncertain fraction to the expert tier; :func:`queue_priorities` turns
priorities into the annotation platform's integer queue priority (higher is served first).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

METHOD = "moderated_margin"  # the name stored with an item beside its priority


@dataclass(frozen=True)
class PairUncertainty:
    """Per-item figures, each shape ``(N,)``, float64."""

    mean_diff: np.ndarray  # mu = mean_m (r_A - r_B)
    disagreement: np.ndarray  # s = std_m (r_A - r_B)
    margin: np.ndarray  # |sigmoid(mu) - 1/2|, in [0, 1/2]
    priority: np.ndarray  # 1 - 2 |sigmoid(mu / sqrt(1 + pi s^2 / 8)) - 1/2|, in [0, 1]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), without overflow warnings


def pair_uncertainty(rewards_a: np.ndarray, rewards_b: np.ndarray) -> PairUncertainty:
    """Disagreement, margin and priority of N pairwise items from M ensemble members.

    Args:
        rewards_a: shape ``(M, N)``, member m's reward of item n's candidate A (``(N,)`` for one model).
        rewards_b: shape ``(M, N)``, the same for candidate B.
    Returns:
        :class:`PairUncertainty`, every field ``(N,)``. One member gives disagreement 0 and
        priority = 1 - 2 * margin.
    """
    a = np.atleast_2d(np.asarray(rewards_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(rewards_b, dtype=np.float64))
    if a.shape != b.shape:
        raise ValueError(f"pair_uncertainty: rewards_a has shape {a.shape}, rewards_b {b.shape}")
    if a.shape[0] == 0:
        raise ValueError("pair_uncertainty: no ensemble members")
    d = a - b  # (M, N)
    mu = d.mean(axis=0)  # (N,)
    s = d.std(axis=0)  # (N,), population std as ensemble_scores
    margin = np.abs(_sigmoid(mu) - 0.5)
    moderated = _sigmoid(mu / np.sqrt(1.0 + np.pi * s**2 / 8.0))
    return PairUncertainty(
        mean_diff=mu, disagreement=s, margin=margin, priority=1.0 - 2.0 * np.abs(moderated - 0.5)
    )


@dataclass(frozen=True)
class ItemUncertainty:
    """Per-item figures of the most uncertain candidate pair, each shape ``(N,)``."""

    pair: np.ndarray  # (N, 2) int: candidate indices (i, j), i < j, of the most uncertain pair
    disagreement: np.ndarray
    margin: np.ndarray
    priority: np.ndarray


def ranking_uncertainty(rewards: np.ndarray) -> ItemUncertainty:
    """Uncertainty of N items with C >= 2 candidates each: the figures of each item's most uncertain pair.

    Args:
        rewards: shape ``(M, N, C)``, member m's reward of item n's candidate c (``(N, C)`` for one model).
    Returns:
        :class:`ItemUncertainty`; ``pair[n]`` is the (i, j) maximising the priority of item n (the first such
        pair in (0,1), (0,2), ..., (1,2), ... order on ties).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim == 2:
        r = r[None]
    if r.ndim != 3 or r.shape[2] < 2:
        raise ValueError(f"ranking_uncertainty: expected rewards of shape (M, N, C >= 2), got {r.shape}")
    pairs = list(combinations(range(r.shape[2]), 2))
    per = [pair_uncertainty(r[:, :, i], r[:, :, j]) for i, j in pairs]
    prio = np.stack([u.priority for u in per])  # (P, N)
    best = prio.argmax(axis=0)  # (N,)
    cols = np.arange(r.shape[1])
    return ItemUncertainty(
        pair=np.asarray(pairs, dtype=np.int64)[best],
        disagreement=np.stack([u.disagreement for u in per])[best, cols],
        margin=np.stack([u.margin for u in per])[best, cols],
        priority=prio[best, cols],
    )


def expert_mask(priority: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean ``(N,)``: the ``round(fraction * N)`` items of highest priority (ties broken by position)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expert fraction must be in [0, 1], got {fraction}")
    p = np.asarray(priority, dtype=np.float64)
    k = int(round(fraction * len(p)))
    mask = np.zeros(len(p), dtype=bool)
    mask[np.argsort(-p, kind="stable")[:k]] = True
    return mask


def queue_priorities(priority: np.ndarray, levels: int = 1000) -> np.ndarray:
    """The platform's integer queue priority ``(N,)``: ``round(priority * levels)`` in ``[0, levels]``.

    The queue serves higher values first. Items the ensemble is sure about round to 0, the platform's
    low-impact level, which is all a restricted annotator is given besides gold.
    """
    p = np.clip(np.asarray(priority, dtype=np.float64), 0.0, 1.0)
    return np.rint(p * levels).astype(np.int64)
