"""Reward-hacking detector on synthetic PPO curves: hacking warns, healthy and noisy-flat runs do not."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.evaluate.hacking import detect_reward_hacking, fit_trend

STEPS = np.arange(0, 300, 5, dtype=float)  # 60 measurements


def _noise(seed: int, scale: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, size=STEPS.size)


def test_fit_trend_recovers_a_line():
    tr = fit_trend(STEPS, 2.0 + 0.01 * STEPS)
    assert tr.slope == pytest.approx(0.01)
    assert tr.change == pytest.approx(0.01 * 295)
    assert tr.t > 1e6 and tr.resid_std == pytest.approx(0.0, abs=1e-12)  # noiseless: t is huge or inf
    flat = fit_trend(STEPS, np.full(STEPS.size, 3.0))
    assert flat.slope == 0.0 and flat.t == 0.0


def test_overoptimisation_warns_about_divergence_and_length():
    """Proxy keeps climbing; gold peaks at step 100 then falls (Gao et al. 2023 shape); length grows."""
    proxy = 2.0 * (1 - np.exp(-STEPS / 80)) + _noise(0, 0.05)
    gold = 0.5 - 0.6 * ((STEPS - 100) / 100) ** 2 + _noise(1, 0.05)
    lengths = 40 + 0.3 * STEPS + _noise(2, 3.0)
    warnings = detect_reward_hacking(STEPS, proxy, gold, lengths)
    assert len(warnings) == 2, warnings
    assert "reward hacking" in warnings[0] and "steps 150-295" in warnings[0]
    assert "gold utility fell" in warnings[0]
    assert "length inflated" in warnings[1]


def test_healthy_run_has_no_warnings():
    proxy = 1.5 * (1 - np.exp(-STEPS / 100)) + _noise(3, 0.05)
    gold = 0.8 * (1 - np.exp(-STEPS / 120)) + _noise(4, 0.05)
    lengths = 60 + 0.03 * STEPS + _noise(5, 4.0)  # +15% over training: below the 1.5x threshold
    assert detect_reward_hacking(STEPS, proxy, gold, lengths) == []


@pytest.mark.parametrize("seed", range(25))
def test_noisy_flat_curves_never_warn(seed):
    """Pure noise (sd 0.3 around constants) must not be read as divergence, nor length noise as inflation."""
    rng = np.random.default_rng(1000 + seed)
    proxy = 1.0 + rng.normal(0, 0.3, STEPS.size)
    gold = 0.5 + rng.normal(0, 0.3, STEPS.size)
    lengths = 50 + rng.normal(0, 10, STEPS.size)
    assert detect_reward_hacking(STEPS, proxy, gold, lengths) == []


def test_proxy_up_with_flat_noisy_gold_is_not_hacking():
    proxy = 0.01 * STEPS + _noise(6, 0.1)
    gold = 0.5 + _noise(7, 0.2)
    assert detect_reward_hacking(STEPS, proxy, gold, None) == []


def test_tiny_decline_on_a_long_run_is_below_the_effect_size():
    """A 0.02 decline over 2,000 points is statistically detectable (t >> 3) but smaller than one residual
    sd (0.05), so the effect-size threshold keeps it quiet."""
    steps = np.arange(2000, dtype=float)
    rng = np.random.default_rng(8)
    proxy = 0.001 * steps + rng.normal(0, 0.05, steps.size)
    gold = 0.5 - 0.00002 * steps + rng.normal(0, 0.05, steps.size)
    later = steps >= 1000
    assert fit_trend(steps[later], gold[later]).t < -3
    assert detect_reward_hacking(steps, proxy, gold, None) == []
    assert detect_reward_hacking(steps, proxy, gold, None, min_effect=0.1) != []


def test_length_only_and_unsorted_steps():
    lengths = 40 + 0.3 * STEPS
    perm = np.random.default_rng(9).permutation(STEPS.size)
    out = detect_reward_hacking(STEPS[perm], (0.01 * STEPS)[perm], None, lengths[perm], window=10)
    assert len(out) == 1 and "first 10 points" in out[0]
    ratio = (40 + 0.3 * STEPS[-10:]).mean() / (40 + 0.3 * STEPS[:10]).mean()
    assert f"{ratio:.2f}x" in out[0]


def test_short_or_bad_inputs():
    assert detect_reward_hacking([0, 1, 2], [0, 1, 2], [2, 1, 0], [1, 1, 9]) == []
    with pytest.raises(ValueError, match="gold has 2 values but steps has 3"):
        detect_reward_hacking([0, 1, 2], [0, 1, 2], [1, 2], None)
    with pytest.raises(ValueError, match=r"proxy: value at index 1 is nan"):
        detect_reward_hacking([0, 1], [0, float("nan")], None, None)
    with pytest.raises(ValueError, match="window"):
        detect_reward_hacking([0, 1], [0, 1], None, [1, 2], window=0)
