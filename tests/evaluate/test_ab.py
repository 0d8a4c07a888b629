"""A/B statistics: hand-derived values, statsmodels/scipy parity, the always-valid property by simulation,
detection of true effects, guardrails and the rollout policy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy import stats as sps
from statsmodels.stats.proportion import proportions_ztest

from alignflow.evaluate import ab

ALPHA = 0.05


def _three_se_bound(alpha: float, runs: int) -> float:
    return alpha + 3.0 * math.sqrt(alpha * (1.0 - alpha) / runs)


# --- two-proportion z-test ---------------------------------------------------------------------------------


def test_ztest_hand_value():
    """60/100 vs 45/100: p̄ = 105/200 = 0.525, se = sqrt(0.525 · 0.475 · (1/100 + 1/100)) = 0.0706222,
    z = 0.15 / 0.0706222 = 2.12398, two-sided p = 2 (1 - Φ(2.12398)) = 0.033672; one-sided halves it."""
    z, p = ab.two_proportion_ztest(60, 100, 45, 100)
    assert z == pytest.approx(2.12398, abs=1e-5)
    assert p == pytest.approx(0.033672, abs=1e-6)
    assert ab.two_proportion_ztest(60, 100, 45, 100, "larger")[1] == pytest.approx(0.033672 / 2, abs=1e-6)
    assert ab.two_proportion_ztest(60, 100, 45, 100, "smaller")[1] == pytest.approx(
        1 - 0.033672 / 2, abs=1e-6
    )


@pytest.mark.parametrize("alternative", ["two-sided", "larger", "smaller"])
def test_ztest_matches_statsmodels(alternative):
    rng = np.random.default_rng(3)
    for _ in range(40):
        na, nb = rng.integers(5, 3000, size=2)
        xa, xb = rng.integers(1, na), rng.integers(1, nb)
        z, p = ab.two_proportion_ztest(xa, na, xb, nb, alternative)
        z_ref, p_ref = proportions_ztest([xa, xb], [na, nb], alternative=alternative)
        assert z == pytest.approx(float(z_ref), rel=1e-10)
        assert p == pytest.approx(float(p_ref), rel=1e-9, abs=1e-15)


def test_ztest_broadcasts_and_handles_degenerate_and_bad_input():
    z, p = ab.two_proportion_ztest(np.array([60, 50]), 100, 45, 100)
    assert z.shape == (2,) and z[0] == pytest.approx(2.12398, abs=1e-5) and p[1] > 0.1
    assert ab.two_proportion_ztest(0, 10, 0, 20) == (0.0, 1.0)  # identical all-failure arms: no evidence
    assert ab.two_proportion_ztest(10, 10, 20, 20) == (0.0, 1.0)
    with pytest.raises(ValueError, match="n_a, n_b"):
        ab.two_proportion_ztest(1, 0, 1, 10)
    with pytest.raises(ValueError, match="successes"):
        ab.two_proportion_ztest(11, 10, 1, 10)
    with pytest.raises(ValueError, match="alternative"):
        ab.two_proportion_ztest(1, 10, 1, 10, "greater")  # type: ignore[arg-type]


# --- bootstrap of a difference of means ----------------------------------------------------------------------


def test_bootstrap_diff_matches_a_reference_loop():
    """Arm a resampled n_boot times, then arm b, from one generator; the interval is the quantiles of the
    differences of the resampled means."""
    a, b = np.array([3.0, 5.0, 4.0, 9.0]), np.array([1.0, 2.0, 2.0])
    diff, lo, hi = ab.bootstrap_diff_ci(a, b, n_boot=300, alpha=0.1, seed=5)
    rng = np.random.default_rng(5)
    ma = [a[row].mean() for row in rng.integers(0, 4, size=(300, 4))]
    mb = [b[row].mean() for row in rng.integers(0, 3, size=(300, 3))]
    reps = np.subtract(ma, mb)
    assert diff == pytest.approx(5.25 - 5.0 / 3.0)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])))
    # Every resampled mean of a is within [3, 9] and of b within [1, 2].
    assert 1.0 <= lo < diff < hi <= 8.0


def test_bootstrap_diff_agrees_with_scipy_bootstrap_and_welch():
    rng = np.random.default_rng(11)
    a, b = rng.normal(1.3, 2.0, 400), rng.exponential(1.0, 250)
    diff, lo, hi = ab.bootstrap_diff_ci(a, b, n_boot=4000, seed=1)
    ref = sps.bootstrap(
        (a, b),
        lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
        n_resamples=4000,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(2),
    ).confidence_interval
    welch = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    width = hi - lo
    # Two Monte Carlo runs of one percentile interval: endpoints agree to a few percent of the width.
    assert lo == pytest.approx(ref.low, abs=0.05 * width) and hi == pytest.approx(ref.high, abs=0.05 * width)
    # At these n the bootstrap and the Welch t interval are nearly the same.
    assert lo == pytest.approx(welch.low, abs=0.06 * width) and hi == pytest.approx(
        welch.high, abs=0.06 * width
    )


def test_bootstrap_diff_degenerate_and_errors():
    assert ab.bootstrap_diff_ci([2.0, 2.0], [0.5]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="b: expected a non-empty"):
        ab.bootstrap_diff_ci([1.0], [])
    with pytest.raises(ValueError, match="a: value at index 1"):
        ab.bootstrap_diff_ci([1.0, float("nan")], [1.0])


# --- sample-ratio mismatch ----------------------------------------------------------------------------------


def test_srm_hand_value_and_scipy_parity():
    """510 vs 490 on a 50/50 split: E = 500 each, chi2 = 2 · 10²/500 = 0.4, p = P(χ²₁ > 0.4) = 0.52709."""
    chi2, p = ab.sample_ratio_mismatch([510, 490], [0.5, 0.5])
    assert chi2 == pytest.approx(0.4)
    assert p == pytest.approx(0.527089, abs=1e-6)
    counts, weights = [9100, 420, 480], [90, 5, 5]
    ref = sps.chisquare(counts, f_exp=np.sum(counts) * np.array(weights) / 100)
    assert ab.sample_ratio_mismatch(counts, weights) == pytest.approx((ref.statistic, ref.pvalue))
    assert ab.sample_ratio_mismatch([5200, 4800], [1, 1])[1] < 1e-4  # a 52/48 split of 10,000 users
    with pytest.raises(ValueError, match="one length"):
        ab.sample_ratio_mismatch([1, 2, 3], [1, 1])
    with pytest.raises(ValueError, match="expected_weights"):
        ab.sample_ratio_mismatch([1, 2], [1, 0])


# --- mSPRT -----------------------------------------------------------------------------------------------


def test_msprt_hand_value_and_johari_form():
    """d = 0.1, s² = 0.01, τ² = 0.01: Λ = sqrt(0.01/0.02) · exp(0.01 · 0.01 / (2 · 0.01 · 0.02)) = 0.70711 ·
    e^0.25 = 0.90794. With n per arm and V = σ_a² + σ_b², eq. (1) is Johari et al.'s Λ_n."""
    assert math.exp(ab.msprt_log_lr(0.1, 0.01, 0.01)) == pytest.approx(0.907943, abs=1e-6)
    n, v, tau2, d = 500, 0.24 + 0.2275, 0.0025, 0.04
    johari = math.sqrt(v / (v + n * tau2)) * math.exp(n**2 * tau2 * d**2 / (2 * v * (v + n * tau2)))
    assert math.exp(ab.msprt_log_lr(d, v / n, tau2)) == pytest.approx(johari, rel=1e-12)
    assert ab.msprt_log_lr(0.3, 0.0, tau2) == 0.0  # no information yet


@pytest.mark.parametrize("alternative", ["two-sided", "larger", "smaller"])
@pytest.mark.parametrize(("d", "s2"), [(0.03, 1e-4), (-0.02, 4e-4), (0.001, 2e-3)])
def test_msprt_closed_form_equals_the_mixture_integral(alternative, d, s2):
    """Λ = ∫ N(d; θ, s²)/N(d; 0, s²) dH(θ), H = N(0, τ²) or its half-normal on θ > 0 (θ < 0), by quadrature."""
    tau2 = 0.03**2
    tau = math.sqrt(tau2)

    def lr(t: float) -> float:
        return math.exp((t * d - t * t / 2.0) / s2)

    density = {
        "two-sided": (lambda t: sps.norm.pdf(t, 0, tau), -np.inf, np.inf),
        "larger": (lambda t: 2 * sps.norm.pdf(t, 0, tau), 0.0, np.inf),
        "smaller": (lambda t: 2 * sps.norm.pdf(t, 0, tau), -np.inf, 0.0),
    }[alternative]
    h, lo, hi = density
    ref, _ = integrate.quad(lambda t: lr(t) * h(t), lo, hi, epsabs=0, epsrel=1e-10, limit=200)
    assert math.exp(ab.msprt_log_lr(d, s2, tau2, alternative)) == pytest.approx(ref, rel=1e-6)


def test_confidence_radius_is_where_lambda_crosses_one_over_alpha():
    s2, tau2 = 3e-4, 0.0025
    r = ab.confidence_radius(s2, tau2, ALPHA)
    for theta in (0.1 - r, 0.1 + r):
        assert ab.msprt_log_lr(0.1 - theta, s2, tau2) == pytest.approx(math.log(1 / ALPHA), rel=1e-10)
    assert ab.confidence_radius(0.0, tau2) == math.inf


def _simulate_peeking(p_a: float, p_b: float, runs: int, looks: int, batch: int, seed: int):
    """`runs` experiments, `batch` users per look split 50/50 at random; the mSPRT and the naive z-test."""
    rng = np.random.default_rng(seed)
    test = ab.MSPRT(shape=(runs,))
    na = xa = nb = xb = np.zeros(runs)
    naive = np.zeros(runs, dtype=bool)
    first = np.full(runs, np.inf)
    p_prev = np.ones(runs)
    for look in range(1, looks + 1):
        k_a = rng.binomial(batch, 0.5, runs)
        s_a, s_b = rng.binomial(k_a, p_a), rng.binomial(batch - k_a, p_b)
        res = test.update_counts(s_a, k_a, s_b, batch - k_a)
        na, xa, nb, xb = na + k_a, xa + s_a, nb + batch - k_a, xb + s_b
        naive |= ab.two_proportion_ztest(xa, na, xb, nb)[1] < ALPHA
        assert np.all(res.p_value <= p_prev)  # always-valid p-values never go back up
        p_prev = res.p_value
        first = np.where(res.reject & np.isinf(first), look * batch, first)
    return res, naive, first


def test_always_valid_under_continuous_monitoring():
    """300 null experiments (both arms 0.6), a look after every 50 users up to 2,000: the mSPRT rejects in
    at most α + 3 SE of them; the same looks with the fixed-horizon z-test reject far more often, so the
    simulation is sharp enough to see the inflation it guards against."""
    res, naive, _ = _simulate_peeking(0.6, 0.6, runs=300, looks=40, batch=50, seed=7)
    bound = _three_se_bound(ALPHA, 300)
    assert res.reject.mean() <= bound
    assert naive.mean() > bound
    covered = (res.ci_lo <= 0.0) & (res.ci_hi >= 0.0)
    assert covered.mean() >= 1 - bound  # the confidence sequence covers 0 at the end in as many


def test_true_effect_is_detected_and_covered():
    """0.60 vs 0.50 (+10 points), up to 3,000 users: nearly every experiment stops with the right sign, and
    the confidence sequence covers the true +0.10."""
    res, _, first = _simulate_peeking(0.6, 0.5, runs=200, looks=30, batch=100, seed=8)
    assert res.reject.mean() >= 0.95
    assert np.all(res.estimate[res.reject] > 0)
    assert np.median(first[res.reject]) < 2000
    assert ((res.ci_lo <= 0.1) & (res.ci_hi >= 0.1)).mean() >= 0.9


def test_batched_msprt_equals_one_test_at_a_time():
    rng = np.random.default_rng(0)
    counts = [(rng.binomial(40, 0.6, 3), rng.binomial(40, 0.5, 3)) for _ in range(6)]
    batched = ab.MSPRT(alternative="larger", shape=(3,))
    singles = [ab.MSPRT(alternative="larger") for _ in range(3)]
    for x_a, x_b in counts:
        res = batched.update_counts(x_a, 40, x_b, 40)
        for i, t in enumerate(singles):
            one = t.update_counts(x_a[i], 40, x_b[i], 40)
            assert one.p_value == pytest.approx(res.p_value[i])
            assert (one.ci_lo, one.ci_hi) == pytest.approx((res.ci_lo[i], res.ci_hi[i]))
            assert one.reject == bool(res.reject[i])


def test_msprt_on_means_and_min_n():
    """Raw values (e.g. 1-5 ratings): a +0.5 shift with σ = 1 is found; update() equals update_sums()."""
    rng = np.random.default_rng(4)
    test, twin = ab.MSPRT(kind="mean", tau2=0.25**2), ab.MSPRT(kind="mean", tau2=0.25**2)
    a0, b0 = rng.normal(3.5, 1.0, 5), rng.normal(3.0, 1.0, 5)
    first = test.update(a0, b0)
    twin.update_sums(5, a0.sum(), (a0**2).sum(), 5, b0.sum(), (b0**2).sum())
    assert first.p_value == 1.0 and math.isinf(first.ci_lo)  # fewer than min_n per arm: no evidence yet
    for _ in range(20):
        a, b = rng.normal(3.5, 1.0, 20), rng.normal(3.0, 1.0, 20)
        res = test.update(a, b)
        ref = twin.update_sums(a.size, a.sum(), (a**2).sum(), b.size, b.sum(), (b**2).sum())
        assert res.p_value == pytest.approx(ref.p_value)
    assert res.reject and res.ci_lo > 0.0 and res.ci_lo < 0.5 < res.ci_hi
    with pytest.raises(ValueError, match="tau2: a test on means"):
        ab.MSPRT(kind="mean")
    with pytest.raises(ValueError, match="0/1 outcomes"):
        ab.MSPRT().update([0.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="update_sums"):
        ab.MSPRT(shape=(2,)).update([1.0], [0.0])


# --- guardrails -------------------------------------------------------------------------------------------


def test_proportion_guardrails_in_each_mode():
    """Control errors 20/2000 (1%). Absolute 5%: 30/200 = 15% is breached, 8/200 = 4% is not. Difference
    +2 points: 10/200 = 5% vs 3% bound is not yet (200 users), 150/2000 = 7.5% is. Ratio 2x: with control
    at 200/20000 (1%), 120/4000 = 3% against a 2% bound is breached (s² = 0.0291/4000 + 2² · 0.0099/20000,
    z ≈ 3.3), 60/2000 against 20/2000 is not yet (z ≈ 1.7: the control's own noise, doubled, counts too)."""
    rails = [ab.Guardrail("error_rate", 0.05), ab.Guardrail("error_rate", 0.02, "difference")]
    ratio = [ab.Guardrail("error_rate", 2.0, "ratio", tau2=0.02**2)]
    ctrl = {"error_rate": (20, 2000)}
    hi, lo = (
        ab.check_guardrails(rails[:1], ctrl, {"error_rate": (30, 200)}),
        ab.check_guardrails(rails[:1], ctrl, {"error_rate": (8, 200)}),
    )
    assert hi[0].breached and hi[0].candidate == pytest.approx(0.15) and hi[0].bound == 0.05
    assert not lo[0].breached and lo[0].p_value == 1.0  # below the bound: the one-sided Λ < 1
    diff_small = ab.check_guardrails(rails[1:], ctrl, {"error_rate": (10, 200)})[0]
    diff_big = ab.check_guardrails(rails[1:], ctrl, {"error_rate": (150, 2000)})[0]
    assert diff_small.bound == pytest.approx(0.03) and not diff_small.breached
    assert diff_big.breached and diff_big.p_value < ALPHA
    r = ab.check_guardrails(ratio, {"error_rate": (200, 20000)}, {"error_rate": (120, 4000)})[0]
    assert r.bound == pytest.approx(0.02) and r.breached
    assert not ab.check_guardrails(ratio, ctrl, {"error_rate": (60, 2000)})[0].breached


def test_guardrail_at_its_bound_stays_within_alpha_under_peeking():
    """300 candidates whose error rate is exactly the absolute bound (2%), checked after every 100 users up
    to 4,000: the share ever flagged stays within α + 3 SE."""
    rng = np.random.default_rng(9)
    g = ab.Guardrail("error_rate", 0.02, tau2=0.02**2)
    events = n = np.zeros(300)
    flagged = np.zeros(300, dtype=bool)
    for _ in range(40):
        events, n = events + rng.binomial(100, 0.02, 300), n + 100
        flagged |= ab.check_guardrails([g], {"error_rate": (0, 0)}, {"error_rate": (events, n)})[0].breached
    assert flagged.mean() <= _three_se_bound(ALPHA, 300)


def test_latency_quantile_guardrail():
    """p95 latency: bound 1.2x the control's p95. A candidate 50% slower is breached; one drawn from the
    control's distribution is not. The absolute mode compares with a fixed budget in ms."""
    rng = np.random.default_rng(2)
    ctrl = {"latency_ms": rng.lognormal(5.0, 0.4, 3000)}
    slow = {"latency_ms": 1.5 * rng.lognormal(5.0, 0.4, 500)}
    same = {"latency_ms": rng.lognormal(5.0, 0.4, 500)}
    g = ab.Guardrail("latency_ms", 1.2, "ratio", kind="quantile", tau2=0.05**2)
    hit, ok = ab.check_guardrails([g], ctrl, slow)[0], ab.check_guardrails([g], ctrl, same)[0]
    assert hit.breached and hit.candidate > hit.bound
    assert hit.bound == pytest.approx(1.2 * np.quantile(ctrl["latency_ms"], 0.95))
    assert not ok.breached
    budget = ab.Guardrail("latency_ms", 200.0, kind="quantile")
    assert not ab.check_guardrails([budget], {"latency_ms": [1.0]}, {"latency_ms": np.full(100, 150.0)})[
        0
    ].breached
    assert ab.check_guardrails([budget], {"latency_ms": [1.0]}, {"latency_ms": np.full(100, 250.0)})[
        0
    ].breached
    with pytest.raises(ValueError, match="candidate arm has no 'latency_ms'"):
        ab.check_guardrails([budget], ctrl, {})


# --- rollout -------------------------------------------------------------------------------------------------


def _run_rollout(policy: ab.RolloutPolicy, runs: int, up: float, err: float, seed: int) -> ab.Rollout:
    rng = np.random.default_rng(seed)
    rollout = ab.Rollout(policy, runs)
    for _ in range(2000):
        if not (rollout.status == ab.RUNNING).any():
            break
        n_c = rng.binomial(1000, rollout.share)
        n_0 = 1000 - n_c
        rollout.observe(
            {"thumbs_up": (rng.binomial(n_0, 0.6), n_0), "error_rate": (rng.binomial(n_0, 0.01), n_0)},
            {"thumbs_up": (rng.binomial(n_c, up), n_c), "error_rate": (rng.binomial(n_c, err), n_c)},
        )
    return rollout


def test_harmful_candidate_is_rolled_back_early_and_a_good_one_ships():
    """Control 60% thumbs-up. A candidate at 55% is rolled back while at <= 5% of traffic in >= 95% of 200
    rollouts; one at 65% completes the ramp in every run."""
    policy = ab.RolloutPolicy(min_candidate_users=1000)
    bad = _run_rollout(policy, 200, up=0.55, err=0.01, seed=1)
    early = (bad.status == ab.ROLLED_BACK) & (bad.stopped_share <= 0.05)
    assert early.mean() >= 0.95
    assert set(bad.reasons()) <= {"thumbs_up", ""}
    good = _run_rollout(policy, 200, up=0.65, err=0.01, seed=2)
    assert np.all(good.status == ab.COMPLETE) and np.all(good.stopped_share == 1.0)
    assert np.all(good.candidate_users >= 4 * 1000)  # four stages below 100%, each with its quota


def test_rollout_rolls_back_on_a_guardrail_and_rarely_on_a_neutral_candidate():
    g = ab.Guardrail("error_rate", 0.01, "difference", tau2=0.02**2)
    policy = ab.RolloutPolicy(min_candidate_users=1000, guardrails=(g,))
    broken = _run_rollout(policy, 100, up=0.6, err=0.08, seed=3)  # errors 1% -> 8%
    assert np.all(broken.status == ab.ROLLED_BACK)
    assert broken.reasons().count("error_rate") >= 95
    neutral = _run_rollout(ab.RolloutPolicy(min_candidate_users=1000), 300, up=0.6, err=0.01, seed=4)
    assert (neutral.status == ab.ROLLED_BACK).mean() <= _three_se_bound(ALPHA, 300)


def test_one_rollout_ramps_then_rolls_back_by_hand():
    """R = 1 with scalar counts. Stage quota 10: a first batch where the candidate's 10 users all liked it
    moves the ramp to 5%; then 0 thumbs-up from 100 candidate users against 60% is a clear harm: rolled back
    at 5%, by the primary metric."""
    rollout = ab.Rollout(ab.RolloutPolicy(min_candidate_users=10))
    assert rollout.share.tolist() == [0.01]
    rollout.observe({"thumbs_up": (594, 990)}, {"thumbs_up": (10, 10)})
    assert rollout.stage.tolist() == [1] and rollout.status.tolist() == [ab.RUNNING]
    rollout.observe({"thumbs_up": (570, 950)}, {"thumbs_up": (0, 100)})
    assert rollout.status.tolist() == [ab.ROLLED_BACK] and rollout.stopped_share.tolist() == [0.05]
    assert rollout.reasons() == ["thumbs_up"] and rollout.share.tolist() == [0.0]
    assert rollout.candidate_users.tolist() == [110] and rollout.total_users.tolist() == [2050]
    rollout.observe({"thumbs_up": (0, 1000)}, {"thumbs_up": (0, 0)})  # a stopped rollout ignores new data
    assert rollout.total_users.tolist() == [2050]


def test_rollout_policy_validation():
    with pytest.raises(ValueError, match="shares"):
        ab.RolloutPolicy(shares=(0.05, 0.01, 1.0))
    with pytest.raises(ValueError, match="shares"):
        ab.RolloutPolicy(shares=(0.01, 0.5))
    with pytest.raises(ValueError, match="proportion guardrails"):
        ab.RolloutPolicy(guardrails=(ab.Guardrail("latency_ms", 1.2, "ratio", kind="quantile"),))
    with pytest.raises(ValueError, match="no 'thumbs_up'"):
        ab.Rollout(ab.RolloutPolicy()).observe({}, {})
