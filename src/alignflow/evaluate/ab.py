"""A/B test statistics for serving experiments (pure NumPy/SciPy).

Conventions: every difference is arm ``a`` minus arm ``b``, as in statsmodels'
``proportions_ztest(count=[a, b], ...)``; in an experiment ``a`` is the candidate and ``b`` the control, so a
positive difference means the candidate's rate or mean is higher. The sequential functions broadcast over a
batch shape ``S`` (many simulated experiments at once, or ``()`` for one).

- Fixed horizon: :func:`two_proportion_ztest` (pooled standard error) and :func:`bootstrap_diff_ci`
  (percentile bootstrap of a difference of two independent means).
- Continuous monitoring: the mixture sequential probability ratio test (mSPRT) of Johari, Koomen, Pekelis &
  Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests", Operations Research 70(3), 2022 (the
  KDD 2017 version is "Peeking at A/B Tests"), after Robbins, "Statistical methods related to the law of the
  iterated logarithm", Ann. Math. Statist. 41, 1970. :class:`MSPRT` updates after every batch and returns the
  always-valid p-value and a confidence sequence; peeking as often as one likes keeps P(ever reject | H0) <= α.
- :func:`sample_ratio_mismatch` (Pearson chi-square), :func:`check_guardrails` (one-sided mSPRTs on error,
  thumbs-down and latency-exceedance rates), and :class:`Rollout`, the ramp-and-roll-back policy.

The normal mixture. Let ``d`` estimate the effect θ (a difference of means) with variance ``s²`` (for two arms
``s² = σ_a²/n_a + σ_b²/n_b``). Mixing the likelihood ratio of θ against θ0 over θ ~ N(θ0, τ²) gives

    Λ = sqrt(s² / (s² + τ²)) · exp( τ² (d - θ0)² / (2 s² (s² + τ²)) )                          (1)

which with ``n_a = n_b = n`` and ``V = σ_a² + σ_b²`` (``s² = V/n``) is Johari et al.'s two-stream Λ_n,
sqrt(V/(V + nτ²)) exp(n²τ²(Ȳ_n - X̄_n - θ0)² / (2V(V + nτ²))). Written through ``S = d/s²`` and the
information ``I = 1/s²`` it is ∫ exp(θS - θ²I/2) dH(θ), and with known variances ``exp(θS - θ²I/2)`` is the
likelihood ratio of the shift-invariant part of the data (all within- and between-arm differences), a
martingale under θ0 whatever the (predictable) share of traffic each arm gets. So (1) stays valid while a
rollout ramps the candidate's share. Ville's inequality then gives P(sup_n Λ_n >= 1/α) <= α: the
always-valid p-value is ``p_n = min(1, min_{m<=n} 1/Λ_m)`` (Johari et al.), and the confidence
sequence is the running intersection of ``{θ : Λ_n(θ) < 1/α}``, i.e. ``d ± r`` with

    r² = s² (s² + τ²) / τ² · (2 log(1/α) + log((s² + τ²) / s²)).                               (2)

One-sided tests mix over the half-normal θ - θ0 > 0 (or < 0), which multiplies (1) by
``2 Φ(± (d - θ0) τ / (s sqrt(s² + τ²))))``; a supermartingale under the whole composite null, so a guardrail
"the candidate is no worse than the bound" is tested with the same guarantee.

Variances are plug-in estimates, as in Johari et al. (who use X̄(1 - X̄) for Bernoulli data): for
a proportion ``p̃(1 - p̃)`` with ``p̃ = (x + 1/2)/(n + 1)`` (the half-count keeps a tiny arm that is all
successes from having zero variance and infinite evidence), for a mean the sample variance. Until each arm has
``min_n`` observations the test reports no evidence; skipping early looks never harms validity.

τ² (the mixing variance) sets the effect size the test is quickest to detect: Johari et al. fit it to the
spread of effects seen in past experiments. The default for proportions, ``DEFAULT_TAU2_PROPORTION = 0.05²``,
puts the mixture's scale at a 5-point change in a rate (thumbs-up, error rate), the size a serving experiment
is run to catch; means have no unit-free default and must pass ``tau2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import special
from scipy import stats as sps

ArrayLike = Sequence[float] | np.ndarray | float
Alternative = Literal["two-sided", "larger", "smaller"]

DEFAULT_TAU2_PROPORTION = 0.05**2
DEFAULT_MIN_N = 20
_ALTERNATIVES = ("two-sided", "larger", "smaller")
# The bootstrap draws (n_boot, n) index matrices; chunks bound the memory as in evaluate/stats.py.
_MAX_DRAWS_PER_CHUNK = 4_000_000


def _check_alternative(alternative: str) -> None:
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"alternative: expected one of {', '.join(_ALTERNATIVES)}, got {alternative!r}")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha: expected a number in (0, 1), got {alpha!r}")


def _scalar_or_array(x: np.ndarray) -> np.ndarray | float:
    return float(x) if x.ndim == 0 else x


# ---------------------------------------------------------------------------------------------------------
# Fixed-horizon tests


def two_proportion_ztest(
    successes_a: ArrayLike,
    n_a: ArrayLike,
    successes_b: ArrayLike,
    n_b: ArrayLike,
    alternative: Alternative = "two-sided",
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Two-sample z-test of equal proportions with the pooled standard error.

    z = (p̂_a - p̂_b) / sqrt(p̄ (1 - p̄) (1/n_a + 1/n_b)),  p̄ = (x_a + x_b) / (n_a + n_b)
    (e.g. Agresti, "Categorical Data Analysis", 3rd ed., sec. 3.1.2; statsmodels' ``proportions_ztest`` with
    its default pooled variance). ``alternative="larger"`` tests p_a > p_b.

    Args:
        successes_a, n_a, successes_b, n_b: counts, scalars or arrays broadcasting to one shape ``S``.

    Returns:
        ``(z, p)``, floats for scalar input, arrays of shape ``S`` otherwise. When both arms are all successes
        or all failures the rates are equal and there is no evidence: z = 0, p = 1 (statsmodels gives nan).
    """
    _check_alternative(alternative)
    xa, na, xb, nb = (np.asarray(v, dtype=np.float64) for v in (successes_a, n_a, successes_b, n_b))
    if np.any(na <= 0) or np.any(nb <= 0):
        raise ValueError("n_a, n_b: every sample size must be positive")
    if np.any(xa < 0) or np.any(xb < 0) or np.any(xa > na) or np.any(xb > nb):
        raise ValueError("successes_a, successes_b: expected 0 <= successes <= n")
    pooled = (xa + xb) / (na + nb)
    se = np.sqrt(pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(se > 0, (xa / na - xb / nb) / se, 0.0)
    if alternative == "two-sided":
        p = 2.0 * sps.norm.sf(np.abs(z))
    elif alternative == "larger":
        p = sps.norm.sf(z)
    else:
        p = sps.norm.cdf(z)
    p = np.where(se > 0, p, 1.0)
    return _scalar_or_array(z), _scalar_or_array(p)


def _as_sample(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name}: value at index {int(bad[0])} is {float(arr[bad[0]])!r}; expected finite")
    return arr


def _resampled_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of n_boot resamples of x with replacement. x: (n,) -> (n_boot,)."""
    rows = max(1, _MAX_DRAWS_PER_CHUNK // x.size)
    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        out[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    return out


def bootstrap_diff_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` of two independent samples with a percentile-bootstrap ``1 - alpha`` interval.

    Each arm is resampled with replacement on its own (the arms are different users, so nothing pairs them;
    :func:`alignflow.evaluate.stats.paired_diff_ci` is the paired version), the difference of the resampled
    means is taken ``n_boot`` times, and the interval is its alpha/2 and 1 - alpha/2 quantiles (Efron &
    Tibshirani 1993, "An Introduction to the Bootstrap", eq. 13.5, with the two-sample resampling of ch. 8).

    Args:
        a: (n_a,) per-user values of arm a (e.g. the candidate's ratings); b: (n_b,) those of arm b.

    Returns:
        ``(diff, lo, hi)``: the observed difference of means and the interval.
    """
    if int(n_boot) < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    _check_alpha(alpha)
    xa, xb = _as_sample(a, "a"), _as_sample(b, "b")
    diff = float(xa.mean() - xb.mean())
    if np.all(xa == xa[0]) and np.all(xb == xb[0]):
        return diff, diff, diff
    rng = np.random.default_rng(seed)
    reps = _resampled_means(xa, int(n_boot), rng) - _resampled_means(xb, int(n_boot), rng)
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return diff, float(lo), float(hi)


def sample_ratio_mismatch(counts: Sequence[int], expected_weights: Sequence[float]) -> tuple[float, float]:
    """Pearson chi-square test that users were split across arms in the configured ratio.

    chi2 = Σ_k (O_k - E_k)² / E_k with E_k = N w_k / Σ w, on K - 1 degrees of freedom. A sample-ratio mismatch
    (Fabijan et al., "Diagnosing Sample Ratio Mismatch in Online Controlled Experiments", KDD 2019) means the
    assignment or the logging is broken and the experiment's comparison cannot be trusted; the usual alarm is
    p < 0.001, since the check runs on every experiment.

    Args:
        counts: (K,) users (or requests) observed per arm; expected_weights: (K,) the configured weights.

    Returns:
        ``(chi2, p)``.
    """
    obs = np.asarray(counts, dtype=np.float64)
    w = np.asarray(expected_weights, dtype=np.float64)
    if obs.ndim != 1 or obs.size < 2 or w.shape != obs.shape:
        raise ValueError(
            f"counts and expected_weights: expected two 1-D sequences of one length >= 2, got {obs.shape} "
            f"and {w.shape}"
        )
    if np.any(obs < 0) or obs.sum() <= 0:
        raise ValueError(f"counts: expected non-negative counts with a positive total, got {obs.tolist()}")
    if np.any(w <= 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"expected_weights: expected positive weights, got {w.tolist()}")
    expected = obs.sum() * w / w.sum()
    chi2 = float(((obs - expected) ** 2 / expected).sum())
    return chi2, float(sps.chi2.sf(chi2, df=obs.size - 1))


# ---------------------------------------------------------------------------------------------------------
# mSPRT


def msprt_log_lr(
    diff: ArrayLike, var: ArrayLike, tau2: float, alternative: Alternative = "two-sided"
) -> np.ndarray | float:
    """log Λ of the normal-mixture likelihood ratio, eq. (1) of the module docstring.

    Args:
        diff: (*S) the estimate minus the null value, d - θ0.
        var: (*S) the estimate's variance s² (0 means no information yet: log Λ = 0).
        tau2: the mixing variance τ² > 0, in the estimate's units squared.
        alternative: ``"larger"`` / ``"smaller"`` mix over θ > θ0 / θ < θ0 only (half-normal mixture).

    Returns:
        (*S) log Λ; a float for scalar input.
    """
    _check_alternative(alternative)
    if not float(tau2) > 0:
        raise ValueError(f"tau2: expected a positive mixing variance, got {tau2!r}")
    d = np.asarray(diff, dtype=np.float64)
    v = np.asarray(var, dtype=np.float64)
    info = v > 0
    v_safe = np.where(info, v, 1.0)
    log_lr = 0.5 * np.log(v_safe / (v_safe + tau2)) + tau2 * d**2 / (2.0 * v_safe * (v_safe + tau2))
    if alternative != "two-sided":
        sign = 1.0 if alternative == "larger" else -1.0
        arg = sign * d * np.sqrt(tau2) / (np.sqrt(v_safe) * np.sqrt(v_safe + tau2))
        log_lr = log_lr + np.log(2.0) + special.log_ndtr(arg)
    return _scalar_or_array(np.where(info, log_lr, 0.0))


def always_valid_p_values(log_lr: ArrayLike, axis: int = -1) -> np.ndarray:
    """Always-valid p-values along a path of looks: p_n = min(1, min_{m<=n} 1/Λ_m).

    Args:
        log_lr: (*S, T) log Λ at each of T looks (along ``axis``).

    Returns:
        (*S, T) non-increasing p-values; rejecting the first time p_n <= α has type-I error <= α however
        many looks are taken.
    """
    p = np.minimum(1.0, np.exp(-np.asarray(log_lr, dtype=np.float64)))
    return np.minimum.accumulate(p, axis=axis)


def confidence_radius(var: ArrayLike, tau2: float, alpha: float = 0.05) -> np.ndarray | float:
    """Half-width r of the two-sided mSPRT confidence set {θ : Λ(θ) < 1/α} = d ± r, eq. (2).

    Args:
        var: (*S) the estimate's variance s²; infinite where ``var <= 0`` (no information yet).

    Returns:
        (*S) r, in the estimate's units.
    """
    _check_alpha(alpha)
    v = np.asarray(var, dtype=np.float64)
    v_safe = np.where(v > 0, v, 1.0)
    r = np.sqrt(
        v_safe * (v_safe + tau2) / tau2 * (2.0 * np.log(1.0 / alpha) + np.log((v_safe + tau2) / v_safe))
    )
    return _scalar_or_array(np.where(v > 0, r, np.inf))


def proportion_variance(successes: ArrayLike, n: ArrayLike) -> np.ndarray:
    """Plug-in Bernoulli variance p̃(1 - p̃), p̃ = (x + 1/2)/(n + 1), per observation. (*S) -> (*S)."""
    p = (np.asarray(successes, dtype=np.float64) + 0.5) / (np.asarray(n, dtype=np.float64) + 1.0)
    return p * (1.0 - p)


@dataclass
class SequentialResult:
    """One look of an :class:`MSPRT`; every field has the test's batch shape ``S`` (floats when ``S = ()``)."""

    n_a: np.ndarray | float
    n_b: np.ndarray | float
    estimate: np.ndarray | float  # mean_a - mean_b
    p_value: np.ndarray | float  # always valid, non-increasing over looks
    ci_lo: np.ndarray | float  # the confidence sequence (running intersection), level 1 - alpha
    ci_hi: np.ndarray | float
    reject: np.ndarray | bool  # p_value <= alpha: stop, the arms differ (in the alternative's direction)


@dataclass
class MSPRT:
    """An mSPRT on ``mean_a - mean_b`` (candidate minus control) that is updated batch by batch.

    ``kind="proportion"``: feed counts with :meth:`update_counts`; ``kind="mean"``: feed raw values with
    :meth:`update` or sums with :meth:`update_sums`. State is cumulative per arm; each look recomputes (1)
    from the totals, so batches of any size and an arm split that changes between batches are both fine.

    Args:
        kind: ``"proportion"`` or ``"mean"``.
        tau2: mixing variance τ²; None means ``DEFAULT_TAU2_PROPORTION`` for proportions (required for means).
        alpha: level of the test and of the confidence sequence.
        theta0: the null difference.
        alternative: ``"two-sided"``, ``"larger"`` (a above b) or ``"smaller"``.
        min_n: observations each arm needs before the test may reject.
        shape: batch shape S, for running many independent tests at once (simulations).
    """

    kind: Literal["proportion", "mean"] = "proportion"
    tau2: float | None = None
    alpha: float = 0.05
    theta0: float = 0.0
    alternative: Alternative = "two-sided"
    min_n: int = DEFAULT_MIN_N
    shape: tuple[int, ...] = ()
    _n: np.ndarray = field(init=False, repr=False)
    _sum: np.ndarray = field(init=False, repr=False)
    _sumsq: np.ndarray = field(init=False, repr=False)
    _p: np.ndarray = field(init=False, repr=False)
    _lo: np.ndarray = field(init=False, repr=False)
    _hi: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("proportion", "mean"):
            raise ValueError(f"kind: expected 'proportion' or 'mean', got {self.kind!r}")
        if self.tau2 is None:
            if self.kind == "mean":
                raise ValueError(
                    "tau2: a test on means needs the mixing variance in the metric's units squared, "
                    "e.g. the square of the smallest difference worth detecting"
                )
            self.tau2 = DEFAULT_TAU2_PROPORTION
        if not float(self.tau2) > 0:
            raise ValueError(f"tau2: expected a positive mixing variance, got {self.tau2!r}")
        _check_alpha(self.alpha)
        _check_alternative(self.alternative)
        shape = (2, *self.shape)  # row 0 = arm a, row 1 = arm b
        self._n, self._sum, self._sumsq = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self._p = np.ones(self.shape)
        self._lo, self._hi = np.full(self.shape, -np.inf), np.full(self.shape, np.inf)

    def update_counts(
        self, successes_a: ArrayLike, n_a: ArrayLike, successes_b: ArrayLike, n_b: ArrayLike
    ) -> SequentialResult:
        """Add a batch of Bernoulli outcomes (successes and trials per arm, shape S) and look."""
        if self.kind != "proportion":
            raise ValueError("update_counts: this test is on means; use update() or update_sums()")
        xa, xb = np.asarray(successes_a, dtype=np.float64), np.asarray(successes_b, dtype=np.float64)
        na, nb = np.asarray(n_a, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
        if np.any(xa < 0) or np.any(xb < 0) or np.any(xa > na) or np.any(xb > nb):
            raise ValueError("update_counts: expected 0 <= successes <= n in every arm")
        # A 0/1 outcome is its own square, so the sums also serve update_sums' variance formula.
        return self._add(na, xa, xa, nb, xb, xb)

    def update_sums(
        self,
        n_a: ArrayLike,
        sum_a: ArrayLike,
        sumsq_a: ArrayLike,
        n_b: ArrayLike,
        sum_b: ArrayLike,
        sumsq_b: ArrayLike,
    ) -> SequentialResult:
        """Add a batch given per-arm counts, sums and sums of squares (each of shape S) and look."""
        if self.kind != "mean":
            raise ValueError("update_sums: this test is on proportions; use update_counts()")
        return self._add(
            *(np.asarray(v, dtype=np.float64) for v in (n_a, sum_a, sumsq_a, n_b, sum_b, sumsq_b))
        )

    def update(self, a: ArrayLike, b: ArrayLike) -> SequentialResult:
        """Add raw values of one batch: a (k_a,), b (k_b,) (batch shape () only) and look."""
        if self.shape:
            raise ValueError("update: raw values need shape=(); use update_sums for a batch of tests")
        xa, xb = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        if self.kind == "proportion":
            if not (np.isin(xa, (0.0, 1.0)).all() and np.isin(xb, (0.0, 1.0)).all()):
                raise ValueError("update: a proportion test takes 0/1 outcomes")
            return self.update_counts(xa.sum(), xa.size, xb.sum(), xb.size)
        return self.update_sums(xa.size, xa.sum(), (xa**2).sum(), xb.size, xb.sum(), (xb**2).sum())

    def _add(
        self, na: np.ndarray, sa: np.ndarray, qa: np.ndarray, nb: np.ndarray, sb: np.ndarray, qb: np.ndarray
    ) -> SequentialResult:
        for total, va, vb in ((self._n, na, nb), (self._sum, sa, sb), (self._sumsq, qa, qb)):
            total[0] += np.broadcast_to(va, self.shape)
            total[1] += np.broadcast_to(vb, self.shape)
        return self.result()

    def _variance(self) -> tuple[np.ndarray, np.ndarray]:
        """The difference of means and its plug-in variance s², each (*S)."""
        n = np.maximum(self._n, 1.0)
        mean = self._sum / n
        if self.kind == "proportion":
            per_obs = proportion_variance(self._sum, self._n)
        else:
            per_obs = np.maximum(self._sumsq - n * mean**2, 0.0) / np.maximum(self._n - 1.0, 1.0)
        var = (per_obs / n).sum(axis=0)
        ready = (self._n >= max(self.min_n, 2 if self.kind == "mean" else 1)).all(axis=0)
        return mean[0] - mean[1], np.where(ready, var, 0.0)

    def result(self) -> SequentialResult:
        """The current look without adding data."""
        diff, var = self._variance()
        tau2 = float(self.tau2 or DEFAULT_TAU2_PROPORTION)  # set in __post_init__; `or` only narrows the type
        log_lr = msprt_log_lr(diff - self.theta0, var, tau2, self.alternative)
        self._p = np.minimum(self._p, np.minimum(1.0, np.exp(-np.asarray(log_lr))))
        r = np.asarray(confidence_radius(var, tau2, self.alpha))
        self._lo, self._hi = np.maximum(self._lo, diff - r), np.minimum(self._hi, diff + r)
        out = [self._n[0], self._n[1], diff, self._p, self._lo, self._hi]
        reject = self._p <= self.alpha
        if not self.shape:
            return SequentialResult(*(float(x) for x in out), reject=bool(reject))
        return SequentialResult(*(x.copy() for x in out), reject=reject.copy())


# ---------------------------------------------------------------------------------------------------------
# Guardrails

GuardrailMode = Literal["absolute", "difference", "ratio"]


@dataclass(frozen=True)
class Guardrail:
    """A metric the candidate must not push past a bound.

    ``kind="proportion"``: a rate (error rate, thumbs-down rate); per arm the metric is ``(events, n)``.
    ``kind="quantile"``: e.g. latency p95 (``quantile=0.95``); per arm the metric is the 1-D array of values.

    The bound: ``absolute``: ``limit``; ``difference``: control's value + ``limit``; ``ratio``: control's
    value × ``limit`` (1.2 = at most 20% above control).

    A proportion guardrail is breached when the one-sided mSPRT rejects "candidate <= bound": the contrast
    ``p_cand - k p_ctrl - m`` (k = 0, 1 or ``limit``; m = ``limit`` or 0) with variance
    ``v_cand/n_cand + k² v_ctrl/n_ctrl``. A quantile guardrail becomes one: the candidate's q-quantile
    exceeds a bound L exactly when more than 1 - q of its values exceed L, so the test is on the share of
    candidate values above L against 1 - q (L from the control's sample quantile in the relative modes).
    """

    metric: str
    limit: float
    mode: GuardrailMode = "absolute"
    kind: Literal["proportion", "quantile"] = "proportion"
    quantile: float = 0.95
    tau2: float = DEFAULT_TAU2_PROPORTION

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "difference", "ratio"):
            raise ValueError(f"guardrail {self.metric}: mode must be absolute, difference or ratio")
        if self.kind not in ("proportion", "quantile"):
            raise ValueError(f"guardrail {self.metric}: kind must be proportion or quantile")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"guardrail {self.metric}: quantile must be in (0, 1), got {self.quantile!r}")
        if self.mode == "ratio" and self.limit <= 0:
            raise ValueError(f"guardrail {self.metric}: a ratio limit must be positive, got {self.limit!r}")
        if not self.tau2 > 0:
            raise ValueError(f"guardrail {self.metric}: tau2 must be positive, got {self.tau2!r}")


@dataclass
class GuardrailResult:
    """The check of one guardrail; array fields carry the batch shape S of the counts given."""

    metric: str
    breached: np.ndarray | bool
    candidate: np.ndarray | float  # the candidate's rate or sample quantile
    control: np.ndarray | float  # the control's (nan in absolute mode for a quantile)
    bound: np.ndarray | float  # the value the candidate must stay at or below
    p_value: np.ndarray | float  # 1/Λ of the one-sided test "candidate above the bound"


def proportion_guardrail_log_lr(
    g: Guardrail,
    events_cand: ArrayLike,
    n_cand: ArrayLike,
    events_ctrl: ArrayLike,
    n_ctrl: ArrayLike,
    min_n: int = DEFAULT_MIN_N,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One-sided log Λ of "candidate's rate above the bound" for a proportion guardrail. Counts (*S).

    Returns ``(log_lr, candidate_rate, control_rate, bound)``, each (*S).
    """
    xc, nc = np.asarray(events_cand, dtype=np.float64), np.asarray(n_cand, dtype=np.float64)
    x0, n0 = np.asarray(events_ctrl, dtype=np.float64), np.asarray(n_ctrl, dtype=np.float64)
    k, m = {"absolute": (0.0, g.limit), "difference": (1.0, g.limit), "ratio": (g.limit, 0.0)}[g.mode]
    rate_c, rate_0 = xc / np.maximum(nc, 1.0), x0 / np.maximum(n0, 1.0)
    bound = k * rate_0 + m
    var = proportion_variance(xc, nc) / np.maximum(nc, 1.0)
    if k:
        var = var + k**2 * proportion_variance(x0, n0) / np.maximum(n0, 1.0)
    ready = (nc >= min_n) & ((n0 >= min_n) | (k == 0.0))
    log_lr = msprt_log_lr(rate_c - bound, np.where(ready, var, 0.0), g.tau2, "larger")
    return np.asarray(log_lr), rate_c, rate_0, bound


def check_guardrails(
    guardrails: Sequence[Guardrail],
    control: Mapping[str, object],
    candidate: Mapping[str, object],
    alpha: float = 0.05,
    min_n: int = DEFAULT_MIN_N,
) -> list[GuardrailResult]:
    """Which guardrails the candidate breaches, each by a one-sided mSPRT at level ``alpha``.

    Safe to call at every look: each test's type-I error over all looks together is <= alpha (Ville), for the
    absolute and difference modes exactly and for ratio and relative-quantile bounds up to the plug-in
    estimate of the control's value. Across G guardrails a harmless candidate trips some guardrail with
    probability <= G·alpha (union bound), which errs on the side of rolling back.

    Args:
        control, candidate: per metric, ``(events, n)`` counts (scalars or arrays of one shape S) for
            proportion guardrails, a 1-D array of values for quantile guardrails.

    Returns:
        One :class:`GuardrailResult` per guardrail, in order.
    """
    _check_alpha(alpha)
    results = []
    for g in guardrails:
        for side, arm in (("control", control), ("candidate", candidate)):
            if g.metric not in arm:
                raise ValueError(f"guardrail {g.metric}: the {side} arm has no {g.metric!r} metric")
        if g.kind == "proportion":
            (xc, nc), (x0, n0) = candidate[g.metric], control[g.metric]  # type: ignore[misc]
            log_lr, rate_c, rate_0, bound = proportion_guardrail_log_lr(g, xc, nc, x0, n0, min_n)
            p = np.minimum(1.0, np.exp(-log_lr))
            results.append(
                GuardrailResult(
                    g.metric,
                    _bool_or_array(p <= alpha),
                    *(_scalar_or_array(np.asarray(v)) for v in (rate_c, rate_0, bound, p)),
                )
            )
            continue
        vc = _as_sample(candidate[g.metric], f"{g.metric} (candidate)")  # type: ignore[arg-type]
        v0 = _as_sample(control[g.metric], f"{g.metric} (control)")  # type: ignore[arg-type]
        q_c, q_0 = float(np.quantile(vc, g.quantile)), float(np.quantile(v0, g.quantile))
        bound = {"absolute": g.limit, "difference": q_0 + g.limit, "ratio": q_0 * g.limit}[g.mode]
        exceed = Guardrail(g.metric, 1.0 - g.quantile, "absolute", tau2=g.tau2)
        log_lr, *_ = proportion_guardrail_log_lr(exceed, float((vc > bound).sum()), vc.size, 0.0, 0.0, min_n)
        p = float(min(1.0, np.exp(-float(log_lr))))
        control_value = float("nan") if g.mode == "absolute" else q_0
        results.append(GuardrailResult(g.metric, p <= alpha, q_c, control_value, float(bound), p))
    return results


def _bool_or_array(x: np.ndarray) -> np.ndarray | bool:
    return bool(x) if np.ndim(x) == 0 else x


# ---------------------------------------------------------------------------------------------------------
# Rollout

RUNNING, ROLLED_BACK, COMPLETE = 0, 1, 2


@dataclass(frozen=True)
class RolloutPolicy:
    """Ramp the candidate's traffic share stage by stage; roll back as soon as it is shown to be worse.

    At each stage but the last the candidate serves ``shares[k]`` of traffic until it has served
    ``min_candidate_users`` users at that stage with no alarm, then moves on; reaching the last share (100%)
    completes the rollout. After every batch: the primary metric (a rate, ``primary``) gets a one-sided mSPRT
    of "candidate below control" (or above when ``higher_is_better`` is False) and every guardrail its
    one-sided mSPRT; either rejecting rolls the candidate back. The tests use all data since the start
    (valid across the changing split, see the module docstring), each at level ``alpha``.
    """

    primary: str = "thumbs_up"
    higher_is_better: bool = True
    shares: tuple[float, ...] = (0.01, 0.05, 0.25, 0.5, 1.0)
    min_candidate_users: int = 2000
    alpha: float = 0.05
    tau2: float = DEFAULT_TAU2_PROPORTION
    guardrails: tuple[Guardrail, ...] = ()
    min_n: int = DEFAULT_MIN_N

    def __post_init__(self) -> None:
        s = self.shares
        if len(s) < 2 or any(not 0 < x <= 1 for x in s) or list(s) != sorted(set(s)) or s[-1] != 1.0:
            raise ValueError(f"shares: expected increasing shares in (0, 1] ending at 1.0, got {s}")
        if self.min_candidate_users < 1:
            raise ValueError(f"min_candidate_users: expected >= 1, got {self.min_candidate_users}")
        _check_alpha(self.alpha)
        for g in self.guardrails:
            if g.kind != "proportion":
                raise ValueError(f"guardrail {g.metric}: a rollout takes proportion guardrails (counts)")


class Rollout:
    """The state of R independent rollouts under one :class:`RolloutPolicy` (R = 1 for a real one).

    Attributes (each (R,)): ``stage`` (index into ``policy.shares``), ``status`` (RUNNING, ROLLED_BACK or
    COMPLETE), ``stopped_share`` (the share at rollback or completion, nan while running), ``reason`` (-1, 0 =
    primary, 1 + i = guardrail i), ``candidate_users`` and ``total_users`` at the stop.
    """

    def __init__(self, policy: RolloutPolicy, n_runs: int = 1) -> None:
        self.policy = policy
        metrics = (policy.primary, *(g.metric for g in policy.guardrails))
        # (arm, metric, run): arm 0 = control, 1 = candidate; events then trials.
        self._events = np.zeros((2, len(metrics), n_runs))
        self._trials = np.zeros((2, len(metrics), n_runs))
        self._metrics = metrics
        self.stage = np.zeros(n_runs, dtype=np.int64)
        self.stage_users = np.zeros(n_runs)
        self.status = np.full(n_runs, RUNNING, dtype=np.int64)
        self.reason = np.full(n_runs, -1, dtype=np.int64)
        self.stopped_share = np.full(n_runs, np.nan)
        self.candidate_users = np.zeros(n_runs)
        self.total_users = np.zeros(n_runs)

    @property
    def share(self) -> np.ndarray:
        """(R,) the candidate's traffic share for the next batch (0 once rolled back, 1 once complete)."""
        shares = np.asarray(self.policy.shares)[np.minimum(self.stage, len(self.policy.shares) - 1)]
        return np.where(self.status == ROLLED_BACK, 0.0, shares)

    def observe(
        self, control: Mapping[str, tuple[ArrayLike, ArrayLike]], candidate: Mapping[str, tuple]
    ) -> None:
        """Add one batch: per metric ``(events, n)``, arrays (R,) (or scalars when R = 1); the primary's ``n``
        is the arm's users. Stopped runs ignore the batch. Then test, roll back or ramp."""
        running = self.status == RUNNING
        for j, name in enumerate(self._metrics):
            for arm, counts in ((0, control), (1, candidate)):
                if name not in counts:
                    side = ("control", "candidate")[arm]
                    raise ValueError(f"observe: the {side} batch has no {name!r} metric")
                x, n = (np.broadcast_to(np.asarray(v, dtype=np.float64), running.shape) for v in counts[name])
                self._events[arm, j] += np.where(running, x, 0.0)
                self._trials[arm, j] += np.where(running, n, 0.0)
        cand_users = np.broadcast_to(
            np.asarray(candidate[self.policy.primary][1], dtype=np.float64), running.shape
        )
        ctrl_users = np.broadcast_to(
            np.asarray(control[self.policy.primary][1], dtype=np.float64), running.shape
        )
        self.stage_users += np.where(running, cand_users, 0.0)
        self.candidate_users += np.where(running, cand_users, 0.0)
        self.total_users += np.where(running, cand_users + ctrl_users, 0.0)

        alarm = np.full(running.shape, -1, dtype=np.int64)
        for i, g in reversed(list(enumerate(self.policy.guardrails))):
            j = 1 + i
            log_lr, *_ = proportion_guardrail_log_lr(
                g,
                self._events[1, j],
                self._trials[1, j],
                self._events[0, j],
                self._trials[0, j],
                self.policy.min_n,
            )
            alarm = np.where(log_lr >= np.log(1.0 / self.policy.alpha), j, alarm)
        diff, var = self._primary_diff()
        worse = "smaller" if self.policy.higher_is_better else "larger"
        primary_lr = np.asarray(msprt_log_lr(diff, var, self.policy.tau2, worse))
        alarm = np.where(primary_lr >= np.log(1.0 / self.policy.alpha), 0, alarm)

        back = running & (alarm >= 0)
        self.stopped_share = np.where(back, self.share, self.stopped_share)
        self.status = np.where(back, ROLLED_BACK, self.status)
        self.reason = np.where(back, alarm, self.reason)

        ramp = (self.status == RUNNING) & (self.stage_users >= self.policy.min_candidate_users)
        self.stage = np.where(ramp, self.stage + 1, self.stage)
        self.stage_users = np.where(ramp, 0.0, self.stage_users)
        done = ramp & (self.stage == len(self.policy.shares) - 1)
        self.status = np.where(done, COMPLETE, self.status)
        self.stopped_share = np.where(done, 1.0, self.stopped_share)

    def _primary_diff(self) -> tuple[np.ndarray, np.ndarray]:
        x, n = self._events[:, 0], self._trials[:, 0]  # (2, R)
        rate = x / np.maximum(n, 1.0)
        var = (proportion_variance(x, n) / np.maximum(n, 1.0)).sum(axis=0)
        ready = (n >= self.policy.min_n).all(axis=0)
        return rate[1] - rate[0], np.where(ready, var, 0.0)

    def reasons(self) -> list[str]:
        """Per run, why it stopped: ``""`` (not rolled back), the primary metric's name or a guardrail's."""
        return [self._metrics[r] if r >= 0 else "" for r in self.reason.tolist()]
