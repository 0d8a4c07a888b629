"""A/B tests under continuous monitoring: the mSPRT of `alignflow.evaluate.ab` against the naive repeated z-test,
and the ramp-and-roll-back policy, on simulated thumbs-up data.

Setup (all simulated with numpy, every experiment of a scenario advanced together):
- fixed-horizon experiments: EXPERIMENTS experiments of at most MAX_USERS users; users arrive in looks of LOOK
  users, each assigned to candidate or control by a fair coin, each giving a thumbs-up with the arm's rate.
  After every look: the mSPRT (two-sided, τ² = 0.05², α = 0.05; always-valid p-value <= α stops the
  experiment) and the naive rule "stop at the first look where the pooled two-proportion z-test has p < α".
  The fixed-horizon z-test at MAX_USERS (one look) is the reference. Null: both arms at BASE; effect: the
  candidate at BASE + EFFECT. Users to a decision are counted at the look that stops the experiment.
- τ² sensitivity: the same null and effect runs for τ = 0.02, 0.05 (the default) and 0.10.
- rollout: ROLLOUTS rollouts per candidate, requests in batches of BATCH, each sent to the candidate with its
  current share (binomial); shares 1% -> 5% -> 25% -> 50% -> 100%, a stage ends when the candidate has served
  STAGE_USERS users there; after every batch the one-sided mSPRT "candidate's thumbs-up below control's" and
  the error-rate guardrail (candidate <= control + 1 point, one-sided mSPRT, τ = 0.02), each at α = 0.05,
  decide a rollback (`alignflow.evaluate.ab.Rollout`). Control: thumbs-up BASE, errors 1%. Candidates:
  harmful (thumbs-up -5 points), broken (errors 1% -> 4%), neutral, better (+5 points).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ab.py [--experiments 2000] [--rollouts 2000] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.evaluate import ab  # noqa: E402

ALPHA = 0.05
BASE = 0.60
EFFECT = 0.05
LOOK = 100
MAX_USERS = 10_000
BATCH = 1_000
STAGE_USERS = 2_000
BASE_ERRORS = 0.01
ERROR_GUARDRAIL = ab.Guardrail("error_rate", 0.01, "difference", tau2=0.02**2)
CANDIDATES = {  # name: (thumbs-up rate, error rate)
    "harmful (thumbs-up 0.60 -> 0.55)": (BASE - 0.05, BASE_ERRORS),
    "broken (errors 1% -> 4%)": (BASE, 0.04),
    "neutral": (BASE, BASE_ERRORS),
    "better (thumbs-up 0.60 -> 0.65)": (BASE + 0.05, BASE_ERRORS),
}


@dataclass
class Peeking:
    """Per experiment (E,): stopped by each rule, users at the stop (inf if never), the end state."""

    msprt: np.ndarray
    msprt_users: np.ndarray
    msprt_sign: np.ndarray  # sign of the estimate at the mSPRT's stop
    naive: np.ndarray
    naive_users: np.ndarray
    fixed: np.ndarray  # the z-test at MAX_USERS, one look
    covered: np.ndarray  # the final confidence sequence holds the true difference


def simulate_peeking(p_cand: float, experiments: int, tau2: float, rng: np.random.Generator) -> Peeking:
    test = ab.MSPRT(tau2=tau2, alpha=ALPHA, shape=(experiments,))
    n_c = x_c = n_0 = x_0 = np.zeros(experiments)
    msprt_users = np.full(experiments, np.inf)
    naive_users = np.full(experiments, np.inf)
    sign = np.zeros(experiments)
    for look in range(1, MAX_USERS // LOOK + 1):
        k = rng.binomial(LOOK, 0.5, experiments)  # candidate users in this look
        s_c, s_0 = rng.binomial(k, p_cand), rng.binomial(LOOK - k, BASE)
        res = test.update_counts(s_c, k, s_0, LOOK - k)
        n_c, x_c, n_0, x_0 = n_c + k, x_c + s_c, n_0 + LOOK - k, x_0 + s_0
        _, p_naive = ab.two_proportion_ztest(x_c, n_c, x_0, n_0)
        new = res.reject & np.isinf(msprt_users)
        sign = np.where(new, np.sign(res.estimate), sign)
        msprt_users = np.where(new, look * LOOK, msprt_users)
        naive_users = np.where((p_naive < ALPHA) & np.isinf(naive_users), look * LOOK, naive_users)
    truth = p_cand - BASE
    return Peeking(
        msprt=np.isfinite(msprt_users),
        msprt_users=msprt_users,
        msprt_sign=sign,
        naive=np.isfinite(naive_users),
        naive_users=naive_users,
        fixed=p_naive < ALPHA,
        covered=(res.ci_lo <= truth) & (res.ci_hi >= truth),
    )


def simulate_rollout(
    up: float, err: float, runs: int, rng: np.random.Generator, stage_users: int = STAGE_USERS
) -> tuple[ab.Rollout, int]:
    policy = ab.RolloutPolicy(
        primary="thumbs_up", min_candidate_users=stage_users, alpha=ALPHA, guardrails=(ERROR_GUARDRAIL,)
    )
    rollout = ab.Rollout(policy, runs)
    batches = 0
    while (rollout.status == ab.RUNNING).any() and batches < 100_000:
        n_c = rng.binomial(BATCH, rollout.share)
        n_0 = BATCH - n_c
        rollout.observe(
            {
                "thumbs_up": (rng.binomial(n_0, BASE), n_0),
                "error_rate": (rng.binomial(n_0, BASE_ERRORS), n_0),
            },
            {"thumbs_up": (rng.binomial(n_c, up), n_c), "error_rate": (rng.binomial(n_c, err), n_c)},
        )
        batches += 1
    return rollout, batches


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def rate_se(flags: np.ndarray) -> str:
    p = float(flags.mean())
    return f"{pct(p)} ± {pct(math.sqrt(p * (1 - p) / flags.size))}"


def users(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    if not x.size:
        return "-"
    q1, med, q3 = np.quantile(x, [0.25, 0.5, 0.75])
    return f"{med:,.0f} ({q1:,.0f}–{q3:,.0f})"


def main(experiments: int, rollouts: int, seed: int, write: bool) -> None:
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    tau2 = ab.DEFAULT_TAU2_PROPORTION
    null = simulate_peeking(BASE, experiments, tau2, rng)
    alt = simulate_peeking(BASE + EFFECT, experiments, tau2, rng)
    seq_rows = [
        [
            f"mSPRT (τ = {math.sqrt(tau2):.2f}), a look every {LOOK}",
            rate_se(null.msprt),
            rate_se(alt.msprt),
            users(alt.msprt_users),
            pct(float((alt.msprt_sign[alt.msprt] > 0).mean())),
        ],
        [
            f"naive z-test, a look every {LOOK}",
            rate_se(null.naive),
            rate_se(alt.naive),
            users(alt.naive_users),
            "-",
        ],
        [
            f"fixed-horizon z-test at {MAX_USERS:,} (one look)",
            rate_se(null.fixed),
            rate_se(alt.fixed),
            f"{MAX_USERS:,}",
            "-",
        ],
    ]
    seq_header = [
        "rule",
        "false-positive rate (no difference)",
        f"power (+{EFFECT * 100:.0f} points)",
        "users to a decision, median (IQR)",
        "right sign",
    ]
    cover = f"{pct(float(null.covered.mean()))} (null), {pct(float(alt.covered.mean()))} (effect)"
    t_seq = time.perf_counter() - t0

    tau_rows = []
    for tau in (0.02, 0.05, 0.10):
        n_, a_ = (
            simulate_peeking(BASE, experiments, tau**2, rng),
            simulate_peeking(BASE + EFFECT, experiments, tau**2, rng),
        )
        tau_rows.append([f"{tau:.2f}", rate_se(n_.msprt), rate_se(a_.msprt), users(a_.msprt_users)])
    tau_header = ["τ", "false-positive rate", f"power (+{EFFECT * 100:.0f} points)", "users to a decision"]

    roll_rows = []
    acceptance = None
    for name, (up, err) in CANDIDATES.items():
        ro, batches = simulate_rollout(up, err, rollouts, rng)
        back = ro.status == ab.ROLLED_BACK
        early = back & (ro.stopped_share <= 0.05)
        at = {s: int((back & (ro.stopped_share == s)).sum()) for s in ro.policy.shares[:-1]}
        reasons = ro.reasons()
        by = {r: reasons.count(r) for r in ("thumbs_up", "error_rate")}
        roll_rows.append(
            [
                name,
                rate_se(back),
                rate_se(early),
                " / ".join(str(at[s]) for s in ro.policy.shares[:-1]),
                f"{by['thumbs_up']} / {by['error_rate']}",
                users(np.where(back, ro.candidate_users, np.inf)),
                users(np.where(back, ro.total_users, np.inf)),
                pct(float((ro.status == ab.COMPLETE).mean())),
            ]
        )
        if name.startswith("harmful"):
            acceptance = float(early.mean())
    roll_header = [
        "candidate",
        "rolled back",
        "rolled back at ≤ 5% traffic",
        "rollbacks at 1% / 5% / 25% / 50%",
        "by thumbs-up / error guardrail",
        "candidate users at rollback, median (IQR)",
        "all requests at rollback, median (IQR)",
        "completed to 100%",
    ]

    # The stage quota is the policy's speed knob: a faster ramp gives the test fewer candidate users per stage.
    quota_rows = []
    for quota in (250, 500, 1000, STAGE_USERS):
        ro, _ = simulate_rollout(BASE - 0.05, BASE_ERRORS, rollouts, rng, stage_users=quota)
        early = (ro.status == ab.ROLLED_BACK) & (ro.stopped_share <= 0.05)
        quota_rows.append([f"{quota:,}", rate_se(early), pct(float((ro.status == ab.ROLLED_BACK).mean()))])
    quota_header = ["candidate users per stage", "harmful rolled back at ≤ 5% traffic", "rolled back at all"]
    elapsed = time.perf_counter() - t0

    body = "\n".join(
        [
            f"Sequential testing: {experiments:,} simulated experiments per row, thumbs-up rate {BASE:.2f} in both "
            f"arms (no difference) or {BASE:.2f} vs {BASE + EFFECT:.2f}; users split 50/50 at random, a look after "
            f"every {LOOK} users, at most {MAX_USERS:,} users per experiment; α = {ALPHA}. The mSPRT is the "
            "normal-mixture always-valid test of Johari et al. (2022) with plug-in variances "
            "(`alignflow.evaluate.ab.MSPRT`); the naive rule stops at the first look with a z-test p < α. "
            "± is one binomial standard error.",
            "",
            markdown_table(seq_header, seq_rows),
            "",
            f"The mSPRT's confidence sequence at the last look covers the true difference in {cover}.",
            "",
            "τ (the mixture's scale) sets where the test is quickest; the default is 0.05 (a 5-point change). Fresh "
            "draws, so the 0.05 row differs from the table above by simulation noise only:",
            "",
            markdown_table(tau_header, tau_rows),
            "",
            f"Rollout: {rollouts:,} rollouts per candidate; requests in batches of {BATCH:,}; shares 1% → 5% → 25% → "
            f"50% → 100%, each stage until the candidate has served {STAGE_USERS:,} users there; after every batch "
            "a one-sided mSPRT of the thumbs-up rate (candidate below control) and of the error-rate guardrail "
            f"(candidate above control + 1 point, τ = 0.02), each at α = {ALPHA}, on all data since the start "
            f"(`alignflow.evaluate.ab.Rollout`). Control: thumbs-up {BASE:.2f}, errors {BASE_ERRORS:.0%}.",
            "",
            markdown_table(roll_header, roll_rows),
            "",
            "The harmful candidate again, with faster ramps (fewer candidate users per stage):",
            "",
            markdown_table(quota_header, quota_rows),
            "",
            f"Acceptance: the harmful candidate (−5 points) is rolled back before it exceeds 5% of traffic in "
            f"{pct(acceptance or 0.0)} of runs (target ≥ 95%); the mSPRT's false-positive rate under peeking is "
            f"{pct(float(null.msprt.mean()))} (target ≤ 5%) against {pct(float(null.naive.mean()))} for the naive "
            "repeated z-test.",
            "",
            f"Run time: {elapsed:.1f} s on one thread (the first table {t_seq:.1f} s).",
        ]
    )
    print(body)
    if write:
        write_section(
            "ab", "A/B tests: sequential testing and the rollout policy", body, pkgs=("numpy", "scipy")
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiments", type=int, default=2000)
    ap.add_argument("--rollouts", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    main(args.experiments, args.rollouts, args.seed, not args.no_write)
