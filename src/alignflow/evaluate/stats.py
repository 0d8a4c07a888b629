"""Bootstrap confidence intervals over prompts (pure NumPy).

Every function returns `(point_estimate, lo, hi)` where `[lo, hi]` is a two-sided percentile-bootstrap
interval at level `1 - alpha` (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", eq. 13.5):
resample the n prompts with replacement `n_boot` times, recompute the statistic on each resample, and take
the `alpha/2` and `1 - alpha/2` quantiles of those replicates. The point estimate is the statistic on the
original sample, not the mean of the replicates. The unit resampled is always the prompt, so paired
comparisons keep each prompt's two scores together.

Degenerate inputs are well defined: n = 1 or all-equal values give a zero-width interval; an empty input
raises `ValueError`. A fixed `seed` makes every interval reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

# Resampling draws an (n_boot, n) index matrix; chunking keeps memory bounded (~32 MB of int64) for long
# evaluation sets. The chunk layout depends only on n, so results stay a function of (x, n_boot, seed).
_MAX_DRAWS_PER_CHUNK = 4_000_000


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: is empty; a confidence interval needs at least one value")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(
            f"{name}: value at index {int(bad[0])} is {float(arr[bad[0]])!r}; expected finite numbers"
        )
    return arr


def _check_params(n_boot: int, alpha: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of `n_boot` resamples of `x` with replacement. x: (n,) -> (n_boot,)."""
    n = x.size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_DRAWS_PER_CHUNK // n)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows_per_chunk):
        stop = min(n_boot, start + rows_per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (chunk, n)
        out[start:stop] = x[idx].mean(axis=1)
    return out


def _percentile_ci(x: np.ndarray, n_boot: int, alpha: float, seed: int) -> tuple[float, float, float]:
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        # Every resample has the same mean; skip the work and avoid quantile rounding noise.
        return mean, mean, mean
    reps = _bootstrap_means(x, n_boot, seed)
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean, float(lo), float(hi)


def bootstrap_mean_ci(
    x: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `x` with its percentile-bootstrap `1 - alpha` confidence interval.

    Args:
        x: (n,) per-prompt values, e.g. gold utility of one policy's responses.
        n_boot: number of bootstrap resamples.
        alpha: 0.05 gives a 95% interval.
        seed: seed of the resampling RNG.

    Returns:
        `(mean, lo, hi)`: the sample mean and the alpha/2, 1 - alpha/2 quantiles of the resampled means.
    """
    _check_params(n_boot, alpha)
    return _percentile_ci(_as_1d(x, "x"), int(n_boot), float(alpha), seed)


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = _as_1d(a, "a"), _as_1d(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be paired per prompt: a has {a_arr.size} values, b has {b_arr.size}")
    return a_arr, b_arr


def paired_diff_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean paired difference `mean(a - b)` with a percentile-bootstrap CI over prompts.

    `a[i]` and `b[i]` must score the same prompt i (e.g. gold utility of the PPO and the SFT response), so
    the interval reflects prompt-level pairing: prompt difficulty cancels out, and the interval is usually
    much narrower than comparing two independent CIs.

    Args:
        a, b: (n,) per-prompt scores of the two systems, aligned by prompt.

    Returns:
        `(mean_diff, lo, hi)` with `[lo, hi]` the `1 - alpha` percentile interval of the resampled mean of
        `a - b`. An interval excluding 0 means a significant difference at level alpha.
    """
    _check_params(n_boot, alpha)
    a_arr, b_arr = _paired(a, b)
    return _percentile_ci(a_arr - b_arr, int(n_boot), float(alpha), seed)


def win_rate(
    a: ArrayLike,
    b: ArrayLike,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    tie_eps: float = 0.0,
) -> tuple[float, float, float]:
    """Fraction of prompts where `a` beats `b`, ties counting one half, with a bootstrap CI over prompts.

    Per prompt the outcome is w_i = 1 if a_i - b_i > tie_eps, 0 if a_i - b_i < -tie_eps, else 1/2; the
    win rate is mean(w), so 0.5 means "no better than b".

    Args:
        a, b: (n,) per-prompt scores of the two systems, aligned by prompt.
        tie_eps: |a_i - b_i| <= tie_eps counts as a tie (0 means exact equality only).

    Returns:
        `(rate, lo, hi)`: win rate in [0, 1] and its `1 - alpha` percentile-bootstrap interval.
    """
    _check_params(n_boot, alpha)
    if tie_eps < 0:
        raise ValueError(f"tie_eps: expected >= 0, got {tie_eps!r}")
    a_arr, b_arr = _paired(a, b)
    d = a_arr - b_arr
    wins = np.where(d > tie_eps, 1.0, np.where(d < -tie_eps, 0.0, 0.5))
    return _percentile_ci(wins, int(n_boot), float(alpha), seed)
