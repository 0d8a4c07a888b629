"""Bootstrap CIs: hand-checked cases, coverage on normal samples, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.evaluate.stats import bootstrap_mean_ci, paired_diff_ci, win_rate


def test_bootstrap_mean_ci_matches_a_reference_loop():
    """The percentile interval equals the quantiles of resampled means drawn the same way, by a plain loop."""
    x = np.array([1.0, 2.0, 4.0, 8.0, 3.0])
    mean, lo, hi = bootstrap_mean_ci(x, n_boot=500, alpha=0.1, seed=7)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, x.size, size=(500, x.size))
    reps = [float(np.mean(x[row])) for row in idx]
    assert mean == pytest.approx(3.6)
    assert lo == pytest.approx(np.quantile(reps, 0.05))
    assert hi == pytest.approx(np.quantile(reps, 0.95))
    # Resampled means of 5 values from {1,2,3,4,8} are multiples of 0.2 within [1, 8].
    assert 1.0 <= lo < 3.6 < hi <= 8.0


def test_two_point_sample_interval_is_bounded_by_the_values():
    """x = [0, 1]: every resampled mean is 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4), so the 95% interval
    is [0, 1] and the 40% interval is [0.5, 0.5]."""
    assert bootstrap_mean_ci([0.0, 1.0], n_boot=4000, seed=1) == (0.5, 0.0, 1.0)
    assert bootstrap_mean_ci([0.0, 1.0], n_boot=4000, alpha=0.6, seed=1) == (0.5, 0.5, 0.5)


def test_coverage_on_normal_samples_is_near_nominal():
    """400 samples of n=60 from N(3, 2^2): the 95% percentile interval should cover 3 in ~95% of them.

    The percentile bootstrap under-covers slightly at small n (about 93-94% here); the bounds allow for that
    and for binomial noise (sd ~1.1 points at 400 reps). With fixed seeds the result is deterministic.
    """
    rng = np.random.default_rng(12345)
    covered = 0
    widths = []
    for rep in range(400):
        x = rng.normal(3.0, 2.0, size=60)
        _, lo, hi = bootstrap_mean_ci(x, n_boot=1000, seed=rep)
        covered += lo <= 3.0 <= hi
        widths.append(hi - lo)
    coverage = covered / 400
    assert 0.90 <= coverage <= 0.98, coverage
    # Width should be close to 2 * 1.96 * sigma / sqrt(n) = 1.012.
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 2.0 / np.sqrt(60), rel=0.08)


def test_90_percent_interval_is_narrower_than_95():
    x = np.random.default_rng(0).normal(size=100)
    _, lo95, hi95 = bootstrap_mean_ci(x)
    _, lo90, hi90 = bootstrap_mean_ci(x, alpha=0.1)
    assert lo95 < lo90 < hi90 < hi95


def test_same_seed_same_interval_and_different_seed_differs():
    x = np.random.default_rng(0).normal(size=50)
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)
    assert bootstrap_mean_ci(x, seed=3) != bootstrap_mean_ci(x, seed=4)


def test_degenerate_inputs():
    fn = bootstrap_mean_ci
    assert fn([2.5]) == (2.5, 2.5, 2.5)
    assert fn([4.0] * 30) == (4.0, 4.0, 4.0)
    with pytest.raises(ValueError, match="x: is empty"):
        fn([])
    with pytest.raises(ValueError, match=r"x: value at index 1 is nan"):
        fn([1.0, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match="alpha"):
        fn([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        fn([1.0, 2.0], n_boot=0)


def test_large_input_is_chunked_and_still_correct():
    """n = 20,000 forces several resampling chunks; the interval must still be ~ mean +- 1.96 sd/sqrt(n)."""
    x = np.random.default_rng(5).normal(1.0, 1.0, size=20_000)
    mean, lo, hi = bootstrap_mean_ci(x, n_boot=400)
    se = x.std() / np.sqrt(x.size)
    assert lo < mean < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_paired_diff_uses_per_prompt_differences():
    """Prompt difficulty varies a lot, but b = a - 0.1 exactly, so the paired interval has zero width."""
    a = np.random.default_rng(0).normal(0, 5, size=200)
    diff, lo, hi = paired_diff_ci(a, a - 0.1)
    assert diff == pytest.approx(0.1)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_paired_diff_equals_bootstrap_of_differences():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=80), rng.normal(size=80)
    assert paired_diff_ci(a, b, seed=9) == bootstrap_mean_ci(a - b, seed=9)
    with pytest.raises(ValueError, match="paired per prompt: a has 80 values, b has 79"):
        paired_diff_ci(a, b[:79])
    with pytest.raises(ValueError, match="a: is empty"):
        paired_diff_ci([], [])


def test_win_rate_hand_case():
    """a beats b on prompts 0 and 1, ties on 2, loses on 3: (1 + 1 + 0.5 + 0) / 4 = 0.625."""
    rate, lo, hi = win_rate([3, 2, 1, 0], [1, 1, 1, 5], n_boot=3000, seed=0)
    assert rate == 0.625
    assert 0.0 <= lo < rate < hi <= 1.0


def test_win_rate_ties_and_degenerate():
    assert win_rate([1, 2, 3], [1, 2, 3]) == (0.5, 0.5, 0.5)
    assert win_rate([2.0], [1.0]) == (1.0, 1.0, 1.0)
    assert win_rate([1.0, 2.0], [1.05, 1.0], tie_eps=0.1) == (0.75, 0.5, 1.0)
    with pytest.raises(ValueError, match="tie_eps"):
        win_rate([1.0], [1.0], tie_eps=-1)


def test_win_rate_interval_excludes_half_for_a_clearly_better_system():
    rng = np.random.default_rng(2)
    base = rng.normal(size=300)
    rate, lo, hi = win_rate(base + 0.5 + rng.normal(0, 0.5, 300), base)
    assert rate > 0.75 and lo > 0.5
