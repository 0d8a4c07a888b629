"""Reward-hacking detectors over a PPO/RL training run.

Over-optimisation of a proxy reward (Gao, Schulman & Hilton 2023, "Scaling Laws for Reward Model
Overoptimization") shows as the proxy reward still climbing while the gold utility it stands in for
peaks and declines; a common symptom is responses growing longer (Singhal et al. 2023, "A Long Way to Go").

`detect_reward_hacking` checks both:

1. Divergence. Over the later part of training (`later_frac`, default the second half of the steps) fit a
   least-squares line y = a + b * step to the proxy and to the gold curve. A curve counts as rising
   (falling) when its slope's t-statistic b / SE(b) is above `min_t` (below -min_t) AND the fitted change
   over that span, b * (last step - first step), is at least `min_effect` residual standard deviations.
   The t-test keeps noise from triggering; the effect size keeps a tiny but very long-run drift from doing
   so. A warning is issued when the proxy rises while the gold falls.
2. Length inflation: mean response length over the last `window` points exceeds `length_ratio` times the
   mean over the first `window` points.

Curves with too few points to judge (fewer than 4 in the later part, or fewer than 2 * window points for
lengths) produce no warning for that check, never an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Trend:
    """Least-squares trend of a curve over a span of steps."""

    slope: float  # units of the curve per step
    change: float  # slope * (last step - first step)
    t: float  # slope / standard error; +-inf for a noiseless line
    resid_std: float
    start_step: float
    end_step: float


def fit_trend(steps: np.ndarray, y: np.ndarray) -> Trend:
    """Ordinary least-squares line through (steps, y). steps, y: (m,) with m >= 3 and non-constant steps.

    SE(b) = s / sqrt(sum (x - mean x)^2) with s^2 = RSS / (m - 2) (the textbook OLS slope variance).
    """
    x = steps - steps.mean()
    sxx = float(np.sum(x * x))
    slope = float(np.sum(x * (y - y.mean())) / sxx)
    resid = y - y.mean() - slope * x
    m = y.size
    resid_std = float(np.sqrt(np.sum(resid * resid) / (m - 2)))
    se = resid_std / np.sqrt(sxx)
    if se > 0:
        t = slope / se
    else:
        t = 0.0 if slope == 0 else float(np.copysign(np.inf, slope))
    span = float(steps[-1] - steps[0])
    return Trend(slope, slope * span, float(t), resid_std, float(steps[0]), float(steps[-1]))


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{name}: value at index {int(bad[0])} is {float(arr[bad[0]])!r}; expected finite numbers"
        )
    return arr


def _significant(tr: Trend, min_t: float, min_effect: float) -> int:
    """+1 rising, -1 falling, 0 neither (see the module docstring for the two thresholds)."""
    big_enough = abs(tr.change) >= min_effect * tr.resid_std
    if tr.t >= min_t and big_enough:
        return 1
    if tr.t <= -min_t and big_enough:
        return -1
    return 0


def detect_reward_hacking(
    steps: ArrayLike,
    proxy: ArrayLike,
    gold: ArrayLike | None,
    lengths: ArrayLike | None,
    window: int | None = None,
    later_frac: float = 0.5,
    min_t: float = 3.0,
    min_effect: float = 1.0,
    length_ratio: float = 1.5,
) -> list[str]:
    """Warnings (human-readable strings) about reward hacking in one training run; [] when healthy.

    Args:
        steps: (n,) training step of each measurement; sorted here, need not be evenly spaced.
        proxy: (n,) mean proxy (reward-model) reward at each step.
        gold: (n,) mean gold utility at each step, or None to skip the divergence check.
        lengths: (n,) mean response length (tokens) at each step, or None to skip the length check.
        window: points averaged at each end for the length check; default max(3, n // 5), so a single noisy
            measurement at either end cannot trigger it.
        later_frac: fraction of the steps (the last ones) used for the trend fits.
        min_t: |t| a slope must exceed to count as rising/falling.
        min_effect: fitted change over the span, in residual standard deviations, a trend must reach.
        length_ratio: last-window / first-window mean length above which length inflation is reported.
    """
    s = _as_1d(steps, "steps")
    n = s.size
    curves = {"proxy": _as_1d(proxy, "proxy")}
    if gold is not None:
        curves["gold"] = _as_1d(gold, "gold")
    if lengths is not None:
        curves["lengths"] = _as_1d(lengths, "lengths")
    for name, arr in curves.items():
        if arr.size != n:
            raise ValueError(f"{name} has {arr.size} values but steps has {n}; one value per step expected")
    if not 0.0 < later_frac <= 1.0:
        raise ValueError(f"later_frac: expected a number in (0, 1], got {later_frac!r}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window: expected a positive integer, got {window!r}")

    order = np.argsort(s, kind="stable")
    s = s[order]
    curves = {k: v[order] for k, v in curves.items()}
    warnings: list[str] = []

    if "gold" in curves:
        start = n - max(int(round(later_frac * n)), 0)
        ls = s[start:]
        if ls.size >= 4 and ls[-1] > ls[0]:
            tp = fit_trend(ls, curves["proxy"][start:])
            tg = fit_trend(ls, curves["gold"][start:])
            if _significant(tp, min_t, min_effect) > 0 and _significant(tg, min_t, min_effect) < 0:
                warnings.append(
                    f"Possible reward hacking: over steps {tp.start_step:g}-{tp.end_step:g} the proxy reward "
                    f"rose by {tp.change:+.3g} (t={tp.t:.1f}) while the gold utility fell by {tg.change:+.3g} "
                    f"(t={tg.t:.1f})."
                )

    if "lengths" in curves:
        w = max(3, n // 5) if window is None else int(window)
        if n >= 2 * w:
            first = float(curves["lengths"][:w].mean())
            last = float(curves["lengths"][-w:].mean())
            if first > 0 and last > length_ratio * first:
                warnings.append(
                    f"Response length inflated {last / first:.2f}x: mean length {first:.1f} over the first {w} "
                    f"points vs {last:.1f} over the last {w} (threshold {length_ratio:g}x)."
                )
    return warnings
