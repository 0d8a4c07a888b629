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

    def kappa(idx: np.ndarray) -> float | None:
        v = cohen_kappa(list(j[idx]), list(h[idx]))
        return None if isinstance(v, Undefined) else float(v)

    k = kappa(np.arange(n))
    rng = np.random.default_rng(seed)
    reps = [kappa(rng.integers(0, n, n)) for _ in range(n_boot)] if k is not None else []
    reps = [r for r in reps if r is not None]
    k_ci = (float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))) if reps else (None, None)
    return out | {
        "accuracy": acc,
        "accuracy_ci": (lo, hi),
        "kappa": k,
        "kappa_ci": k_ci,
        "tie_rate": float((j == "tie").mean()),
    }
