"""How far a judge agrees with people: accuracy against a human label, Cohen's κ, and order consistency.

Pure functions over label sequences; the platform's quality report (`feedback/qc.py`) and
``benchmarks/bench_judges.py`` call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def judge_human_agreement(
    judge: Sequence[str | None],
    human: Sequence[str],
    consistent: Sequence[bool | None] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Agreement of a judge's pairwise labels with the human label of the same items.

    Args:
        judge: shape (n,), the judge's label per item: "A", "B", "tie", or None (dropped: the item is left
            out of every figure but counted in ``dropped``).
        human: shape (n,), the human label ("A"/"B"; "tie" allowed) — the consensus or the dataset's label.
        consistent: shape (n,), whether the judge's two orders agreed (None: one order only).
        n_boot: percentile-bootstrap resamples over items for κ's interval.

    Returns ``n`` (items scored), ``dropped``, ``accuracy`` (the judge's tie counts one half, Wilson 95%
    interval ``accuracy_ci``), ``kappa`` (Cohen 1960 over the labels as categories, ties a category of their
    own; bootstrap 95% interval ``kappa_ci``; None when undefined), ``tie_rate`` and ``order_consistency``
    (share of items whose two orders agreed, over those asked in both orders; None if none were).
    """
    from alignflow.quality.agreement import cohen_kappa
    from alignflow.quality.annotators import wilson_interval
    from alignflow.quality.schema import Undefined

    if len(judge) != len(human):
        raise ValueError(f"judge and human labels differ in length ({len(judge)} vs {len(human)})")
    keep = [i for i, j in enumerate(judge) if j is not None]
    j = np.array([judge[i] for i in keep], dtype=object)
    h = np.array([human[i] for i in keep], dtype=object)
    n = len(keep)
    both = [c for c in (consistent or []) if c is not None]
    out: dict[str, Any] = {
        "n": n,
        "dropped": len(judge) - n,
        "order_consistency": (sum(both) / len(both)) if both else None,
    }
    if n == 0:
        return out | {
            "accuracy": None,
            "accuracy_ci": (None, None),
            "kappa": None,
            "kappa_ci": (None, None),
            "tie_rate": None,
        }
    credit = np.where(j == "tie", 0.5, (j == h).astype(float))
    acc = float(credit.mean())
    lo, hi = wilson_interval(float(credit.sum()), n)

    v = cohen_kappa(list(j), list(h))
    k = None if isinstance(v, Undefined) else float(v)
    reps = bootstrap_kappa(j, h, n_boot, seed) if k is not None else np.empty(0)
    k_ci = (float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))) if len(reps) else (None, None)
    return out | {
        "accuracy": acc,
        "accuracy_ci": (lo, hi),
        "kappa": k,
        "kappa_ci": k_ci,
        "tie_rate": float((j == "tie").mean()),
    }


def bootstrap_kappa(a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """Cohen's κ of `n_boot` percentile-bootstrap resamples of the units, all at once.

    Args:
        a, b: shape (n,), the two raters' labels on the same units (no missing values).
    Returns:
        shape (<= n_boot,), κ = (p_o - p_e) / (1 - p_e) (Cohen 1960, eq. 1) of each resample in draw order;
        a resample where p_e = 1 (one shared category) has no κ and is left out. The resamples are those of
        drawing ``np.random.default_rng(seed).integers(0, n, n)`` `n_boot` times, and each κ equals
        :func:`alignflow.quality.agreement.cohen_kappa` on it (to rounding; tested): a bincount of the
        resamples' confusion matrices instead of one Python call per resample (2000 took 0.5 s).
    """
    n = len(a)
    cats, codes = np.unique(
        np.concatenate([np.asarray(a, dtype=str), np.asarray(b, dtype=str)]), return_inverse=True
    )
    k = len(cats)
    cell = codes[:n] * k + codes[n:]  # (n,) the unit's confusion-matrix cell
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    flat = (np.arange(n_boot)[:, None] * (k * k) + cell[idx]).ravel()
    confusion = np.bincount(flat, minlength=n_boot * k * k).reshape(n_boot, k, k).astype(float)
    p_o = np.trace(confusion, axis1=1, axis2=2) / n
    p_e = (confusion.sum(axis=2) * confusion.sum(axis=1)).sum(axis=1) / n**2
    defined = p_e != 1.0  # exact: integer counts over n**2, which is 1 only when one category is all there is
    return (p_o[defined] - p_e[defined]) / (1.0 - p_e[defined])
