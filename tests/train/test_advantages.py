"""Hand-derived values and float64 reference loops for alignflow.train.advantages.

TRL 1.16 removed PPO (and with it ``masked_mean``/``masked_whiten``/GAE/``AdaptiveKLController``), so those are
checked against naive Python loops written from the papers. GRPO/RLOO advantages live inside TRL's trainers'
``_generate_and_score_completions``; the reference here reuses TRL's ``nanstd`` and the trainers' formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.train.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    rloo_advantages,
)

D = torch.float64
LN2 = math.log(2.0)


def _random_mask(g: torch.Generator, b: int, t: int, kind: str) -> torch.Tensor:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    pos = torch.arange(t).expand(b, t)
    if kind == "right":
        return (pos < lengths.unsqueeze(1)).long()
    if kind == "left":
        return (pos >= (t - lengths).unsqueeze(1)).long()
    mask = (torch.rand(b, t, generator=g) < 0.6).long()
    mask[:, 0] = 1
    return mask


# ------------------------------------------------------------------------------------ masked statistics


def test_masked_stats_hand_values():
    """values (1, 2, 3, 100) with the last masked: mean 2; biased var ((1 + 0 + 1) / 3) = 2/3; unbiased 2/2 = 1.
    Whitened (unbiased): (x - 2) / sqrt(1 + 1e-8) -> (-1, 0, 1, 0); shift_mean=False adds 2 back -> (1, 2, 3, 0).
    """
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=D)
    m = torch.tensor([[1, 1, 1, 0]])
    assert masked_mean(x, m).item() == 2.0
    assert abs(masked_var(x, m, unbiased=False).item() - 2 / 3) < 1e-15
    assert masked_var(x, m).item() == 1.0
    torch.testing.assert_close(
        masked_whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=D), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(
        masked_whiten(x, m, shift_mean=False),
        torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=D),
        atol=1e-7,
        rtol=0,
    )
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([2.0], dtype=D))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["right", "left", "holes"])
def test_masked_stats_match_naive_loop(seed, kind):
    g = torch.Generator().manual_seed(seed)
    for b, t in [(1, 2), (4, 7), (9, 31)]:
        x = torch.randn(b, t, generator=g, dtype=D) * 3 + 1
        m = _random_mask(g, b, t, kind)
        if m.sum() < 2:
            m[0, :2] = 1
        kept = [x[i, j].item() for i in range(b) for j in range(t) if m[i, j]]
        n = len(kept)
        mean = sum(kept) / n
        var_b = sum((v - mean) ** 2 for v in kept) / n
        var_u = var_b * n / (n - 1)
        x_garbage = x.masked_fill(m == 0, float("nan"))  # masked positions must not leak in
        assert abs(masked_mean(x_garbage, m).item() - mean) <= 1e-12
        assert abs(masked_var(x_garbage, m, unbiased=False).item() - var_b) <= 1e-12
        assert abs(masked_var(x_garbage, m).item() - var_u) <= 1e-12
        w = masked_whiten(x_garbage, m)
        for i in range(b):
            for j in range(t):
                want = (x[i, j].item() - mean) / math.sqrt(var_u + 1e-8) if m[i, j] else 0.0
                assert abs(w[i, j].item() - want) <= 1e-12
        per_row = masked_mean(x_garbage, m, dim=1)
        for i in range(b):
            row = [x[i, j].item() for j in range(t) if m[i, j]]
            assert abs(per_row[i].item() - sum(row) / len(row)) <= 1e-12


def test_masked_var_errors():
    with pytest.raises(ValueError, match="no elements"):
        masked_var(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.ones(2, 2), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="shape mismatch"):
        masked_mean(torch.ones(2, 2), torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------- GAE


def test_gae_hand_values():
    """rewards (0, 1), values (0.5, 0.5), gamma = lam = 1.

    delta_1 = 1 + 0 - 0.5 = 0.5 (episode ends), delta_0 = 0 + 0.5 - 0.5 = 0. A_1 = 0.5, A_0 = 0 + 0.5 = 0.5;
    returns = A + V = (1, 1), i.e. the undiscounted reward-to-go. With lam = 0, A = delta = (0, 0.5).
    A third, padded position with value 9 must not bootstrap anything.
    """
    r = torch.tensor([[0.0, 1.0, 7.0]], dtype=D)
    v = torch.tensor([[0.5, 0.5, 9.0]], dtype=D)
    m = torch.tensor([[1, 1, 0]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]], dtype=D))
    adv, _ = gae(r, v, m, gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.0]], dtype=D))


def test_gae_interior_hole_is_an_episode_boundary():
    """mask (1, 0, 1), rewards (0, x, 1), values (0.5, x, 0.5), gamma = lam = 1 (x = garbage at the hole).

    Position 2: delta = 1 - 0.5 = 0.5, A = 0.5. Position 0 ends its segment (the next token is masked out):
    delta = 0 + 0 - 0.5 = -0.5 and nothing flows back across the hole, so A = -0.5.
    """
    r = torch.tensor([[0.0, 5.0, 1.0]], dtype=D)
    v = torch.tensor([[0.5, 7.0, 0.5]], dtype=D)
    adv, _ = gae(r, v, torch.tensor([[1, 0, 1]]), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.0, 0.5]], dtype=D))


def _gae_explicit_sum(r, v, m, gamma, lam):
    """Eq. 16 as the explicit sum A_t = sum_{l>=0} (gamma lam)^l delta_{t+l} over the row's valid tokens,
    with V = 0 after the last valid token (terminal)."""
    b, t = r.shape
    adv = [[0.0] * t for _ in range(b)]
    for i in range(b):
        idx = [j for j in range(t) if m[i, j]]
        rr = [r[i, j].item() for j in idx]
        vv = [v[i, j].item() for j in idx] + [0.0]
        deltas = [rr[k] + gamma * vv[k + 1] - vv[k] for k in range(len(idx))]
        for k, j in enumerate(idx):
            adv[i][j] = sum((gamma * lam) ** ll * deltas[k + ll] for ll in range(len(idx) - k))
    return torch.tensor(adv, dtype=D)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["right", "left"])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_matches_explicit_sum(seed, kind, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    for b, t in [(1, 1), (3, 6), (5, 17)]:
        r = torch.randn(b, t, generator=g, dtype=D)
        v = torch.randn(b, t, generator=g, dtype=D)
        m = _random_mask(g, b, t, kind)
        adv, ret = gae(r, v, m, gamma=gamma, lam=lam)
        want = _gae_explicit_sum(r, v, m, gamma, lam)
        torch.testing.assert_close(adv, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(ret, (want + v) * m, atol=1e-12, rtol=0)


def test_gae_matches_trl_legacy_ppo_loop_on_right_padding():
    """TRL <= 1.12 PPOTrainer: values/rewards zeroed on padding, then an unmasked reverse loop over the response."""
    g = torch.Generator().manual_seed(9)
    b, t, gamma, lam = 6, 12, 1.0, 0.95
    m = _random_mask(g, b, t, "right")
    r = torch.randn(b, t, generator=g, dtype=D) * m
    v = torch.randn(b, t, generator=g, dtype=D) * m
    lastgaelam = 0
    advantages_reversed = []
    for k in reversed(range(t)):
        nextvalues = v[:, k + 1] if k < t - 1 else 0.0
        delta = r[:, k] + gamma * nextvalues - v[:, k]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    want_adv = torch.stack(advantages_reversed[::-1], dim=1)
    want_ret = want_adv + v
    adv, ret = gae(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, want_adv * m, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, want_ret * m, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    """log pi = log 1/2, log pi_ref = log 1/4, so log r = log(pi_ref / pi) = -ln 2, r = 1/2.
    k1 = ln 2; k2 = (ln 2)^2 / 2; k3 = (1/2 - 1) + ln 2 = ln 2 - 1/2.
    """
    lp, ref = torch.tensor([[math.log(0.5)]], dtype=D), torch.tensor([[math.log(0.25)]], dtype=D)
    assert abs(kl_penalty(lp, ref, "k1").item() - LN2) < 1e-15
    assert abs(kl_penalty(lp, ref, "k2").item() - LN2**2 / 2) < 1e-15
    assert abs(kl_penalty(lp, ref, "k3").item() - (LN2 - 0.5)) < 1e-15
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(lp, ref, "k4")  # type: ignore[arg-type]


def test_kl_estimators_are_unbiased_for_kl_pi_ref():
    """Monte Carlo: tokens drawn from pi; the means of k1 and k3 approach KL(pi || pi_ref) computed exactly."""
    g = torch.Generator().manual_seed(0)
    logits_pi = torch.randn(6, dtype=D, generator=g)
    logits_ref = torch.randn(6, dtype=D, generator=g)
    log_pi, log_ref = logits_pi.log_softmax(-1), logits_ref.log_softmax(-1)
    exact = (log_pi.exp() * (log_pi - log_ref)).sum().item()
    tokens = torch.multinomial(log_pi.exp(), 200_000, replacement=True, generator=g)
    lp, lr = log_pi[tokens].unsqueeze(0), log_ref[tokens].unsqueeze(0)
    k1, k3 = kl_penalty(lp, lr, "k1"), kl_penalty(lp, lr, "k3")
    se1 = k1.std().item() / math.sqrt(tokens.numel())
    se3 = k3.std().item() / math.sqrt(tokens.numel())
    assert abs(k1.mean().item() - exact) < 5 * se1
    assert abs(k3.mean().item() - exact) < 5 * se3
    assert (k3 >= 0).all()


def test_per_token_rewards_hand_values():
    """kl_coef 0.5, k1 per token = log pi - log pi_ref = (0.2, 0.4, x) with the third padded; score 3 on the
    last real token (index 1): rewards (-0.1, -0.2 + 3, 0). Row 2 is left-padded: score on index 2.
    """
    lp = torch.tensor([[0.2, 0.4, 5.0], [9.0, 0.0, 0.0]], dtype=D)
    ref = torch.zeros(2, 3, dtype=D)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    rewards, non_score, kl = per_token_rewards(torch.tensor([3.0, -1.0], dtype=D), lp, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 2.8, 0.0], [0.0, 0.0, -1.0]], dtype=D))
    torch.testing.assert_close(non_score, torch.tensor([[-0.1, -0.2, 0.0], [0.0, 0.0, 0.0]], dtype=D))
    torch.testing.assert_close(kl, torch.tensor([[0.2, 0.4, 0.0], [0.0, 0.0, 0.0]], dtype=D))
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        per_token_rewards(torch.zeros(2, dtype=D), lp, ref, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


# ---------------------------------------------------------------------------------------- KL control


def test_adaptive_kl_controller_hand_values():
    """init 0.2, target 6, horizon 10000. KL 12: error = clip(12/6 - 1) = 0.2; 256 samples:
    0.2 * (1 + 0.2 * 256 / 10000) = 0.201024. KL 6: error 0 -> unchanged. KL 3: error -0.5 clipped to -0.2.
    """
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert abs(ctl.update(12.0, 256) - 0.201024) < 1e-15
    assert abs(ctl.update(6.0, 256) - 0.201024) < 1e-15
    assert abs(ctl.update(3.0, 256) - 0.201024 * (1 - 0.2 * 256 / 10000)) < 1e-15
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05 and fixed.value == 0.05
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=1)


def test_adaptive_kl_controller_matches_trl_legacy_loop():
    """The update rule of TRL's former AdaptiveKLController (numpy clip), replayed over a KL trajectory."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(1)
    kls = (torch.rand(50, generator=g, dtype=D) * 20).tolist()
    ours = AdaptiveKLController(0.1, 6.0, 10000)
    value = 0.1
    for kl in kls:
        proportional_error = np.clip(kl / 6.0 - 1, -0.2, 0.2)
        value *= 1 + proportional_error * 64 / 10000
        ours.update(kl, 64)
        assert abs(ours.value - value) <= 1e-15


# -------------------------------------------------------------------------------------- RLOO and GRPO


def test_rloo_and_grpo_hand_values():
    """RLOO, k = 3, rewards (1, 2, 3): baselines (2.5, 2, 1.5) -> advantages (-1.5, 0, 1.5).
    GRPO, k = 2, rewards (1, 3): mean 2, unbiased std sqrt(2) -> (-1, 1) / (sqrt 2 + eps); "none" -> (-1, 1).
    """
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0], dtype=D), 3), torch.tensor([-1.5, 0, 1.5], dtype=D)
    )
    r = torch.tensor([1.0, 3.0], dtype=D)
    s = math.sqrt(2) + 1e-4
    torch.testing.assert_close(grpo_advantages(r, 2), torch.tensor([-1 / s, 1 / s], dtype=D))
    torch.testing.assert_close(
        grpo_advantages(r, 2, scale_rewards="none"), torch.tensor([-1.0, 1.0], dtype=D)
    )
    with pytest.raises(ValueError, match="multiple of num_generations"):
        grpo_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        grpo_advantages(torch.ones(4), 2, scale_rewards="z")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 2"):
        rloo_advantages(torch.ones(4), 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("prompts", "k"), [(1, 2), (3, 4), (8, 16)])
def test_rloo_matches_trl_formula_and_loop(seed, prompts, k):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(prompts * k, generator=g, dtype=D)
    # RLOOTrainer._generate_and_score_completions (TRL 1.16), no unscorable rows:
    grouped = rewards.view(-1, k)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = ((torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)).view(-1)
    trl_adv = rewards - baselines
    trl_norm = (trl_adv - torch.nanmean(trl_adv)) / (trl_utils.nanstd(trl_adv) + 1e-4)
    torch.testing.assert_close(rloo_advantages(rewards, k), trl_adv, atol=1e-12, rtol=0)
    # TRL's nanstd forms its Bessel factor count / (count - 1) in float32, hence 1e-6 rather than 1e-12.
    torch.testing.assert_close(rloo_advantages(rewards, k, normalize=True), trl_norm, atol=1e-6, rtol=0)
    for i in range(prompts * k):
        group = range((i // k) * k, (i // k + 1) * k)
        others = [rewards[j].item() for j in group if j != i]
        assert (
            abs(rloo_advantages(rewards, k)[i].item() - (rewards[i].item() - sum(others) / len(others)))
            <= 1e-12
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("prompts", "k"), [(1, 2), (3, 4), (8, 16)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_trl_formula_and_loop(seed, prompts, k, scale):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(prompts * k, generator=g, dtype=D)
    # GRPOTrainer._generate_and_score_completions (TRL 1.16), "sum_then_normalize" with one reward function:
    mean_grouped = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    if scale == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(rewards.view(-1, k), dim=1).repeat_interleave(k, dim=0)
    want = rewards - mean_grouped
    if scale != "none":
        want = want / (std + 1e-4)
    got = grpo_advantages(rewards, k, scale_rewards=scale)
    # TRL's nanstd forms its Bessel factor count / (count - 1) in float32, hence 1e-6 here; the loop below is 1e-12.
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # and a plain loop for the paper's group normalisation
    if scale == "group":
        for i in range(prompts * k):
            grp = [rewards[j].item() for j in range((i // k) * k, (i // k + 1) * k)]
            mu = sum(grp) / k
            sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (k - 1))
            assert abs(got[i].item() - (rewards[i].item() - mu) / (sd + 1e-4)) <= 1e-12
