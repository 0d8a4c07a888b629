"""Hand-derived values, float64 reference loops, gradient checks and input validation for alignflow.train.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alignflow.train.logprobs import count_target_tokens
from alignflow.train.losses import (
    DPO_LOSS_TYPES,
    aggregate_loss,
    bradley_terry_loss,
    dpo_hinge_loss,
    dpo_ipo_loss,
    dpo_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    entropy_from_logits,
    orpo_loss,
    ppo_policy_loss,
    simpo_loss,
    token_nll,
    value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
D = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


def close(x: torch.Tensor | float, expected: float, tol: float = 1e-12) -> bool:
    return abs(float(x) - expected) <= tol


# ------------------------------------------------------------------------------------------ token NLL


def test_token_nll_uniform_logits_is_log_vocab():
    """Zero logits over V=4 give p = 1/4 for every token, so each target costs log 4.

    labels [[-100, 1, 2]]: after the shift the targets are (1, 2), 2 tokens, mean NLL = log 4. With
    num_items_in_batch = 4 (a global count under accumulation) the sum 2 log 4 is divided by 4: log(4) / 2.
    """
    logits = torch.zeros(1, 3, 4, dtype=D)
    labels = torch.tensor([[-100, 1, 2]])
    assert close(token_nll(logits, labels), math.log(4))
    assert close(token_nll(logits, labels, num_items_in_batch=4), math.log(4) / 2)


def test_token_nll_only_counts_completion_tokens():
    """Logits (0, ln 3) over V=2 give p(1) = 3/4, p(0) = 1/4.

    Row 0 labels [-100, 1, 1] -> targets 1, 1: 2 * log(4/3). Row 1 labels [-100, -100, 0] -> target 0: log 4.
    The last position's logits predict nothing. Token mean over the 3 tokens: (2 log(4/3) + log 4) / 3.
    """
    logits = torch.tensor([0.0, LN3], dtype=D).expand(2, 3, 2).clone()
    labels = torch.tensor([[-100, 1, 1], [-100, -100, 0]])
    assert count_target_tokens(labels).item() == 3
    assert close(token_nll(logits, labels), (2 * math.log(4 / 3) + math.log(4)) / 3)


def test_token_nll_matches_transformers_causal_lm_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    g = torch.Generator().manual_seed(5)
    for b, seq, vocab in [(1, 3, 5), (4, 9, 17), (3, 20, 64)]:
        logits = torch.randn(b, seq, vocab, generator=g, dtype=D)
        labels = torch.randint(0, vocab, (b, seq), generator=g)
        labels[torch.rand(b, seq, generator=g) < 0.4] = -100
        labels[0, 1] = 3  # at least one target
        want = loss_utils.ForCausalLMLoss(logits, labels, vocab)
        assert abs(token_nll(logits, labels).item() - want.item()) <= 1e-6
        n = count_target_tokens(labels) + 7
        want_n = loss_utils.ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=n)
        assert abs(token_nll(logits, labels, num_items_in_batch=n).item() - want_n.item()) <= 1e-6


def test_token_nll_gradient_accumulation_equals_full_batch():
    """Micro-batches normalised by the global token count sum to the full-batch loss and gradient."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 8, 11, generator=g, dtype=D, requires_grad=True)
    labels = torch.randint(0, 11, (6, 8), generator=g)
    labels[:, :3] = -100
    labels[1, 3:6] = -100  # uneven completion lengths: a per-micro-batch mean would be wrong
    full = token_nll(logits, labels)
    (full_grad,) = torch.autograd.grad(full, logits)

    total = sum(count_target_tokens(labels[i : i + 2]) for i in range(0, 6, 2))
    accumulated = sum(
        token_nll(logits[i : i + 2], labels[i : i + 2], num_items_in_batch=total) for i in range(0, 6, 2)
    )
    (acc_grad,) = torch.autograd.grad(accumulated, logits)
    assert abs(accumulated.item() - full.item()) <= 1e-12
    torch.testing.assert_close(acc_grad, full_grad, atol=1e-12, rtol=0)
    naive = sum(token_nll(logits[i : i + 2], labels[i : i + 2]) for i in range(0, 6, 2)) / 3
    assert abs(naive.item() - full.item()) > 1e-4  # the drift the shared normaliser prevents


def test_token_nll_rejects_bad_inputs():
    with pytest.raises(ValueError, match="disagree"):
        token_nll(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        token_nll(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), num_items_in_batch=0)


# -------------------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_values():
    """delta = 0 -> -log sigmoid(0) = log 2; delta = ln 3 -> sigmoid = 3/4 -> log(4/3).

    Margin ln 3 on delta ln 3 -> log 2 again. Centering with r_c = r_r = 1: log 2 + 0.5 * (1 + 1)^2 = log 2 + 2.
    Soft label p = 1/2 on delta = ln 3: -(1/2 log 3/4 + 1/2 log 1/4) = 1/2 log(16/3).
    Weights (1, 3) on per-pair losses (log 2, log 4/3): (log 2 + 3 log(4/3)) / 4.
    """
    assert close(bradley_terry_loss(t(0.3), t(0.3)), LN2)
    assert close(bradley_terry_loss(t(LN3), t(0.0)), math.log(4 / 3))
    assert close(bradley_terry_loss(t(LN3), t(0.0), margin=t(LN3)), LN2)
    assert close(bradley_terry_loss(t(LN3), t(0.0), margin=LN3), LN2)
    assert close(bradley_terry_loss(t(1.0), t(1.0), center_coef=0.5), LN2 + 2)
    assert close(bradley_terry_loss(t(LN3), t(0.0), soft_labels=t(0.5)), 0.5 * math.log(16 / 3))
    assert close(
        bradley_terry_loss(t(0.0, LN3), t(0.0, 0.0), weights=t(1.0, 3.0)), (LN2 + 3 * math.log(4 / 3)) / 4
    )
    # (B, 1) reward-head output is accepted
    assert close(bradley_terry_loss(t(LN3).view(1, 1), t(0.0).view(1, 1)), math.log(4 / 3))


def test_bradley_terry_soft_label_one_equals_hard_label():
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(9, generator=g, dtype=D), torch.randn(9, generator=g, dtype=D)
    assert close(
        bradley_terry_loss(rc, rr, soft_labels=torch.ones(9, dtype=D)), bradley_terry_loss(rc, rr).item()
    )
    # p = 0 is the same as swapping the pair
    assert close(
        bradley_terry_loss(rc, rr, soft_labels=torch.zeros(9, dtype=D)), bradley_terry_loss(rr, rc).item()
    )


def test_bradley_terry_rejects_bad_inputs():
    with pytest.raises(ValueError, match="differ"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bradley_terry_loss(t(1.0), t(0.0), soft_labels=t(1.5))
    with pytest.raises(ValueError, match="non-negative"):
        bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), weights=t(-1.0, 1.0))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), margin=t(1.0, 2.0, 3.0))


# ----------------------------------------------------------------------------------------- DPO family


def _dpo_inputs(h: float, beta: float = 1.0):
    """Policy/reference log-probs whose reference-normalised margin is exactly ``h``."""
    return t(-1.0), t(-2.0), t(-1.0 - h), t(-2.0)


def test_dpo_sigmoid_hand_values():
    """pi = pi_ref -> h = 0 -> loss = -log sigmoid(0) = log 2, rewards 0.

    beta = 1, h = ln 3 -> sigmoid(ln 3) = 3/4 -> log(4/3); chosen reward = beta * (log pi - log pi_ref) = ln 3.
    cDPO eps = 1/4 at h = ln 3: -(3/4 log(3/4) + 1/4 log(1/4)) = 3/4 log(4/3) + 1/4 log 4.
    """
    loss, rc, rr = dpo_sigmoid_loss(t(-3.0), t(-4.0), t(-3.0), t(-4.0), beta=0.1)
    assert close(loss, LN2) and close(rc, 0.0) and close(rr, 0.0)
    loss, rc, rr = dpo_sigmoid_loss(*_dpo_inputs(LN3), beta=1.0)
    assert close(loss, math.log(4 / 3)) and close(rc, LN3) and close(rr, 0.0)
    assert not rc.requires_grad
    loss, _, _ = dpo_loss("cdpo", *_dpo_inputs(LN3), beta=1.0, label_smoothing=0.25)
    assert close(loss, 0.75 * math.log(4 / 3) + 0.25 * math.log(4))


def test_dpo_robust_hand_value():
    """eps = 1/4, beta h = ln 3: ((3/4) log(4/3) - (1/4) log 4) / (1 - 1/2) = 3/2 log(4/3) - 1/2 log 4."""
    loss, _, _ = dpo_robust_loss(*_dpo_inputs(LN3), beta=1.0, label_smoothing=0.25)
    assert close(loss, 1.5 * math.log(4 / 3) - 0.5 * math.log(4))
    # eps = 0 reduces to plain DPO
    assert close(dpo_robust_loss(*_dpo_inputs(LN3), beta=1.0)[0], math.log(4 / 3))


def test_dpo_ipo_and_hinge_hand_values():
    """IPO: h = 0, tau = 1/2 -> (0 - 1/(2 tau))^2 = 1. With lengths (2, 1) and log-ratios (2, 0): h = 2/2 - 0 = 1
    -> (1 - 1)^2 = 0. Hinge: beta = 1/2, h = 2 -> max(0, 1 - 1) = 0; h = 0 -> 1.
    """
    assert close(dpo_ipo_loss(*_dpo_inputs(0.0), beta=0.5)[0], 1.0)
    loss, rc, _ = dpo_ipo_loss(
        t(0.0), t(-1.0), t(-2.0), t(-1.0), beta=0.5, chosen_lengths=t(2), rejected_lengths=t(1)
    )
    assert close(loss, 0.0) and close(rc, 1.0)  # reward uses the un-normalised log-ratio: 0.5 * 2
    assert close(dpo_hinge_loss(*_dpo_inputs(2.0), beta=0.5)[0], 0.0)
    assert close(dpo_hinge_loss(*_dpo_inputs(0.0), beta=0.5)[0], 1.0)


def test_simpo_and_orpo_hand_values():
    """SimPO: beta = 2, gamma = 1/2, mean log-probs -1 and -1.25: 2 * 0.25 - 0.5 = 0 -> log 2.

    ORPO: avg logp log(1/2) -> odds 1; log(1/3) -> odds (1/3)/(2/3) = 1/2; log odds ratio = log 2,
    sigmoid(log 2) = 2/3, so L_OR = log(3/2); with NLL 1 and lambda = 0.1: 1 + 0.1 log(3/2).
    """
    loss, rc, rr = simpo_loss(t(-1.0), t(-1.25), beta=2.0, gamma=0.5)
    assert close(loss, LN2) and close(rc, -2.0) and close(rr, -2.5)
    loss, rc, _ = orpo_loss(t(math.log(0.5)), t(math.log(1 / 3)), torch.tensor(1.0, dtype=D), beta=0.1)
    assert close(loss, 1 + 0.1 * math.log(1.5)) and close(rc, 0.1 * math.log(0.5))


def test_cdpo_matches_reference_loop():
    """Conservative DPO (Mitchell 2023) evaluated term by term with Python floats; TRL 1.16's sigmoid ignores
    label smoothing, so the reference is written from the paper."""
    g = torch.Generator().manual_seed(3)
    for b in (1, 4, 33):
        pc, pr, rc, rr = (-10 * torch.rand(b, generator=g, dtype=D) for _ in range(4))
        beta, eps = 0.3, 0.15
        got, _, _ = dpo_loss("sigmoid", pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        total = 0.0
        for i in range(b):
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
            total += -(1 - eps) * math.log(1 / (1 + math.exp(-z))) - eps * math.log(1 / (1 + math.exp(z)))
        assert abs(got.item() - total / b) <= 1e-12


def test_dpo_dispatcher_errors_name_valid_types():
    x = t(-1.0)
    with pytest.raises(ValueError) as info:
        dpo_loss("dpo++", x, x, x, x)
    for name in DPO_LOSS_TYPES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss("sigmoid", x, x)
    with pytest.raises(ValueError, match="chosen_nll"):
        dpo_loss("orpo", x, x)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss("cdpo", x, x, x, x)
    with pytest.raises(ValueError, match="equal"):
        dpo_loss("sigmoid", t(-1.0, -2.0), x, x, x)


# ------------------------------------------------------------------------------------------------ PPO


def test_ppo_policy_loss_hand_values():
    """ratio 1: per-token loss = -A. A = (1, -2), both kept -> (-1 + 2) / 2 = 1/2, nothing clipped.

    ratio 3/2, eps 0.2: for A = 1 the terms are -1.5 and -1.2, max -1.2 (clipped); for A = -1 they are 1.5 and
    1.2, max 1.5 (not clipped). Mean (-1.2 + 1.5) / 2 = 0.15, clip fraction 1/2.
    approx KL (k3) with log r = ln 1.5: (1.5 - 1) - ln 1.5.
    """
    zeros = torch.zeros(1, 2, dtype=D)
    loss, stats = ppo_policy_loss(zeros, zeros, t(1.0, -2.0).view(1, 2), torch.ones(1, 2))
    assert close(loss, 0.5) and close(stats["clip_frac"], 0.0) and close(stats["approx_kl"], 0.0)

    new = torch.full((1, 2), math.log(1.5), dtype=D)
    loss, stats = ppo_policy_loss(new, zeros, t(1.0, -1.0).view(1, 2), torch.ones(1, 2), clip_range=0.2)
    assert close(loss, 0.15) and close(stats["clip_frac"], 0.5)
    assert close(stats["approx_kl"], 0.5 - math.log(1.5))
    # DAPO clip-higher: eps_high = 0.6 leaves ratio 1.5 unclipped for A = 1
    loss, stats = ppo_policy_loss(new, zeros, t(1.0, -1.0).view(1, 2), torch.ones(1, 2), clip_range_high=0.6)
    assert close(loss, 0.0) and close(stats["clip_frac"], 0.0)


def test_aggregations_hand_values():
    """Per-token losses [[1, 2, x], [3, x, x]] (x masked): token-mean 6/3 = 2; seq-mean-token-mean
    (1.5 + 3) / 2 = 2.25; seq-mean-token-sum (3 + 3) / 2 = 3."""
    per = torch.tensor([[1.0, 2.0, 1e30], [3.0, float("nan"), float("inf")]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert close(aggregate_loss(per, mask, "token-mean"), 2.0)
    assert close(aggregate_loss(per, mask, "seq-mean-token-mean"), 2.25)
    assert close(aggregate_loss(per, mask, "seq-mean-token-sum"), 3.0)
    assert close(aggregate_loss(per, mask, "token-mean", num_items_in_batch=6), 1.0)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean, seq-mean-token-sum"):
        aggregate_loss(per, mask, "sum")  # type: ignore[arg-type]


def _ppo_reference(new, old, adv, mask, eps, aggregation):
    """Per-token loop of Schulman et al. 2017 eq. 7 with Python floats."""
    rows = []
    for b in range(new.shape[0]):
        row = []
        for k in range(new.shape[1]):
            if mask[b, k]:
                r = math.exp(new[b, k].item() - old[b, k].item())
                a = adv[b, k].item()
                row.append(-min(r * a, min(max(r, 1 - eps), 1 + eps) * a))
        rows.append(row)
    if aggregation == "token-mean":
        flat = [x for row in rows for x in row]
        return sum(flat) / len(flat)
    if aggregation == "seq-mean-token-mean":
        vals = [sum(row) / len(row) for row in rows if row]
        return sum(vals) / len(vals)
    return sum(sum(row) for row in rows) / len(rows)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_policy_loss_matches_reference_loop(aggregation, seed):
    g = torch.Generator().manual_seed(seed)
    for b, seq in [(1, 1), (3, 5), (6, 13)]:
        old = -3 * torch.rand(b, seq, generator=g, dtype=D)
        new = old + 0.5 * torch.randn(b, seq, generator=g, dtype=D)
        adv = torch.randn(b, seq, generator=g, dtype=D)
        mask = (torch.rand(b, seq, generator=g) < 0.7).long()
        mask[:, 0] = 1
        new_padded = new.masked_fill(mask == 0, 500.0)  # garbage at padding must not matter (nor overflow)
        got, _ = ppo_policy_loss(new_padded, old, adv, mask, clip_range=0.2, aggregation=aggregation)
        assert abs(got.item() - _ppo_reference(new, old, adv, mask, 0.2, aggregation)) <= 1e-12


def test_ppo_policy_loss_broadcasts_sequence_advantages():
    g = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 4, generator=g, dtype=D)
    new = old + 0.3 * torch.randn(3, 4, generator=g, dtype=D)
    adv = torch.randn(3, generator=g, dtype=D)
    mask = torch.ones(3, 4)
    a, _ = ppo_policy_loss(new, old, adv, mask)
    b, _ = ppo_policy_loss(new, old, adv.unsqueeze(1).expand(3, 4), mask)
    assert a.item() == b.item()


def test_value_loss_hand_values():
    """c = 0.2, old V = 0. V = 1, R = 0: unclipped 1, clipped (0.2)^2 -> max 1 -> x0.5 = 0.5 (clip_frac 0).
    V = 0.5, R = 1: unclipped 0.25, clipped (0.2 - 1)^2 = 0.64 -> 0.32 (clip_frac 1).
    """
    zero = torch.zeros(1, 1, dtype=D)
    loss, stats = value_loss(torch.ones(1, 1, dtype=D), zero, zero, torch.ones(1, 1))
    assert close(loss, 0.5) and close(stats["clip_frac"], 0.0)
    loss, stats = value_loss(
        torch.full((1, 1), 0.5, dtype=D), zero, torch.ones(1, 1, dtype=D), torch.ones(1, 1)
    )
    assert close(loss, 0.32) and close(stats["clip_frac"], 1.0)
    loss, _ = value_loss(
        torch.full((1, 1), 0.5, dtype=D), zero, torch.ones(1, 1, dtype=D), torch.ones(1, 1), None
    )
    assert close(loss, 0.125)


def test_value_loss_matches_reference_loop():
    g = torch.Generator().manual_seed(8)
    for b, seq in [(1, 3), (4, 9)]:
        v, old, ret = (torch.randn(b, seq, generator=g, dtype=D) for _ in range(3))
        mask = (torch.rand(b, seq, generator=g) < 0.6).long()
        mask[:, 0] = 1
        got, _ = value_loss(v, old, ret, mask, clip_range_value=0.3)
        terms = []
        for i in range(b):
            for k in range(seq):
                if mask[i, k]:
                    vc = min(max(v[i, k].item(), old[i, k].item() - 0.3), old[i, k].item() + 0.3)
                    terms.append(max((v[i, k].item() - ret[i, k].item()) ** 2, (vc - ret[i, k].item()) ** 2))
        assert abs(got.item() - 0.5 * sum(terms) / len(terms)) <= 1e-12


def test_entropy_hand_values_and_mask():
    """Uniform logits over V give entropy log V; a one-hot (very peaked) distribution gives ~0."""
    logits = torch.zeros(2, 3, 8, dtype=D)
    logits[1, 2, 0] = 1e4
    ent = entropy_from_logits(logits)
    assert close(ent[0, 0], math.log(8)) and abs(ent[1, 2].item()) < 1e-12
    masked = entropy_from_logits(logits, mask=torch.tensor([[1, 0, 1], [1, 1, 1]]))
    assert masked[0, 1].item() == 0.0 and close(masked[0, 2], math.log(8))
    half = entropy_from_logits(torch.zeros(1, 2, 8, dtype=torch.bfloat16))
    assert half.dtype == torch.float32 and abs(half[0, 0].item() - math.log(8)) < 1e-6


# ------------------------------------------------------------------------------------------ gradcheck


def _rand(g, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=D)).requires_grad_()


def test_gradcheck_dpo_family():
    g = torch.Generator().manual_seed(0)
    inputs = tuple(_rand(g, 5, scale=3.0) for _ in range(4))
    for loss_type in ("sigmoid", "robust", "ipo"):

        def f(pc, pr, rc, rr, loss_type=loss_type):
            return dpo_loss(
                loss_type, pc, pr, rc, rr, beta=0.2, label_smoothing=0.1 if loss_type != "ipo" else 0.0
            )[0]

        assert torch.autograd.gradcheck(f, inputs)
    means = tuple((-2 * torch.rand(5, generator=g, dtype=D) - 0.01).requires_grad_() for _ in range(2))
    nll = torch.tensor(1.3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, r, n: orpo_loss(c, r, n, beta=0.3)[0], (*means, nll))
    assert torch.autograd.gradcheck(lambda c, r: simpo_loss(c, r)[0], means)


def test_gradcheck_bradley_terry():
    g = torch.Generator().manual_seed(1)
    rc, rr = _rand(g, 6), _rand(g, 6)
    margin = torch.rand(6, generator=g, dtype=D)
    weights = torch.rand(6, generator=g, dtype=D) + 0.1
    soft = torch.rand(6, generator=g, dtype=D)
    assert torch.autograd.gradcheck(
        lambda a, b: bradley_terry_loss(
            a, b, margin=margin, center_coef=0.05, weights=weights, soft_labels=soft
        ),
        (rc, rr),
    )


def test_gradcheck_ppo_policy_and_value_loss():
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 5, generator=g, dtype=D)
    new = (old + 0.4 * torch.randn(3, 5, generator=g, dtype=D)).requires_grad_()
    adv = torch.randn(3, 5, generator=g, dtype=D)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert torch.autograd.gradcheck(
            lambda x, aggregation=aggregation: ppo_policy_loss(x, old, adv, mask, aggregation=aggregation)[0],
            (new,),
        )
    values = _rand(g, 3, 5)
    old_v, ret = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    assert torch.autograd.gradcheck(lambda v: value_loss(v, old_v, ret, mask, 0.3)[0], (values,))


def test_gradcheck_token_nll():
    g = torch.Generator().manual_seed(3)
    logits = _rand(g, 2, 4, 6)
    labels = torch.tensor([[-100, 1, 5, 2], [-100, -100, 0, -100]])
    assert torch.autograd.gradcheck(lambda x: token_nll(x, labels), (logits,))


def test_ppo_loss_gradient_is_zero_on_padding():
    old = torch.zeros(1, 3, dtype=D)
    new = torch.tensor([[0.1, 0.2, 800.0]], dtype=D, requires_grad=True)
    loss, _ = ppo_policy_loss(new, old, torch.ones(1, 3, dtype=D), torch.tensor([[1, 1, 0]]))
    loss.backward()
    assert torch.isfinite(new.grad).all() and new.grad[0, 2].item() == 0.0


def test_log_sigmoid_identity_used_in_hand_values():
    # guards the arithmetic the docstrings rely on
    assert close(-F.logsigmoid(torch.tensor(LN3, dtype=D)), math.log(4 / 3))
