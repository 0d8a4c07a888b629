"""RLHF losses as pure tensor functions: SFT token NLL, Bradley-Terry reward loss, the DPO family and PPO.

Shapes: ``B`` batch, ``T`` tokens, ``V`` vocabulary. Sequence log-probs ``(B,)`` are sums over completion
tokens (see :mod:`alignflow.train.logprobs`) unless a function says it wants per-token means.

Every preference loss returns ``(loss, chosen_rewards, rejected_rewards)`` like TRL: a scalar loss and the
detached implicit rewards used for logging (``beta * (log pi - log pi_ref)`` for reference-based losses,
``beta * log pi`` for reference-free ones). A recipe picks a loss by name with :func:`dpo_loss`.

KTO (Ethayarajh et al. 2024) is not here: it takes unpaired data, which no recipe reads, so its loss and
reference-point estimate were removed rather than kept tested but unreachable.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from alignflow.train.advantages import masked_mean
from alignflow.train.logprobs import DEFAULT_CHUNK_ROWS, IGNORE_INDEX, count_target_tokens, token_logps

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# ---------------------------------------------------------------------------------------------- SFT


def token_nll(
    logits: Tensor,
    labels: Tensor,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Completion-only next-token negative log-likelihood.

    ``loss = -(1 / N) * sum_{b,t: labels[b,t+1] != -100} log p(labels[b,t+1] | tokens <= t)``.

    Normalisation: ``N`` is the number of non-ignored target tokens of the whole batch
    (:func:`~alignflow.train.logprobs.count_target_tokens`), i.e. every token weighs the same, not every
    sequence. Under gradient accumulation pass ``num_items_in_batch`` = the token count summed over all
    micro-batches of the optimizer step (and ranks), so the summed gradients equal the big-batch gradient.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` aligned with ``input_ids`` (the shift happens inside), ``ignore_index`` on
            prompt and padding tokens.
        num_items_in_batch: optional global token count to divide by instead of this batch's count.

    Returns:
        Scalar loss (0 if no token carries loss and no normaliser is given).
    """
    logps, _ = token_logps(logits, labels, ignore_index)
    total = -logps.sum()
    if num_items_in_batch is None:
        denom = count_target_tokens(labels, ignore_index).clamp(min=1)
    else:
        denom = torch.as_tensor(num_items_in_batch, device=total.device)
        if denom.numel() != 1 or denom.item() <= 0:
            raise ValueError(f"num_items_in_batch must be a positive scalar, got {num_items_in_batch!r}")
    return total / denom.to(total.dtype)


# ---------------------------------------------------------------------------------------- reward model


def _as_vector(name: str, x: Tensor) -> Tensor:
    # Reward heads commonly emit (B, 1); accept it, refuse anything else that is not (B,).
    if x.dim() == 2 and x.shape[1] == 1:
        x = x.squeeze(1)
    if x.dim() != 1:
        raise ValueError(f"{name} must be (B,) (or (B, 1)), got {tuple(x.shape)}")
    return x


def _soft_bce(logits: Tensor, p: Tensor) -> Tensor:
    """Elementwise ``-[p log sigmoid(x) + (1 - p) log sigmoid(-x)]``: the cross-entropy of a Bradley-Terry /
    DPO preference probability ``sigmoid(x)`` against the target ``P(chosen better) = p``."""
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
    weights: Tensor | None = None,
    soft_labels: Tensor | None = None,
) -> Tensor:
    """Bradley-Terry pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1).

    With ``delta = r_c - r_r - m``: per pair ``-log sigmoid(delta)`` (Llama-2's margin variant when ``m`` is
    given). With soft labels ``p = P(chosen is better)``: ``-[p log sigmoid(delta) + (1-p) log sigmoid(-delta)]``,
    the binary cross-entropy against ``p``. The batch loss is the mean over pairs, or
    ``sum_i w_i l_i / sum_i w_i`` with ``weights``. ``center_coef > 0`` adds TRL's centering regulariser
    ``center_coef * mean((r_c + r_r)^2)`` (Eisenstein et al. 2023), unweighted, which pins the reward's free
    offset near 0.

    Args:
        chosen_rewards, rejected_rewards: ``(B,)`` (or ``(B, 1)``) scalar rewards.
        margin: ``(B,)`` or a float; the required reward gap.
        center_coef: centering coefficient (0 disables).
        weights: ``(B,)`` non-negative per-pair weights (e.g. annotator agreement).
        soft_labels: ``(B,)`` targets in ``[0, 1]``.

    Returns:
        Scalar loss.
    """
    rc = _as_vector("chosen_rewards", chosen_rewards)
    rr = _as_vector("rejected_rewards", rejected_rewards)
    if rc.shape != rr.shape:
        raise ValueError(f"chosen_rewards {tuple(rc.shape)} and rejected_rewards {tuple(rr.shape)} differ")
    delta = rc - rr
    if margin is not None:
        margin_t = torch.as_tensor(margin, dtype=delta.dtype, device=delta.device)
        if margin_t.dim() > 0 and margin_t.shape != delta.shape:
            raise ValueError(
                f"margin must be a float or (B,) = {tuple(delta.shape)}, got {tuple(margin_t.shape)}"
            )
        delta = delta - margin_t
    if soft_labels is None:
        per_pair = -F.logsigmoid(delta)
    else:
        if soft_labels.shape != delta.shape:
            raise ValueError(f"soft_labels must be {tuple(delta.shape)}, got {tuple(soft_labels.shape)}")
        if ((soft_labels < 0) | (soft_labels > 1)).any():
            raise ValueError("soft_labels must lie in [0, 1]")
        p = soft_labels.to(delta.dtype)
        per_pair = _soft_bce(delta, p)
    if weights is None:
        loss = per_pair.mean()
    else:
        if weights.shape != delta.shape:
            raise ValueError(f"weights must be {tuple(delta.shape)}, got {tuple(weights.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        w = weights.to(delta.dtype)
        loss = (w * per_pair).sum() / w.sum()
    if center_coef:
        loss = loss + center_coef * torch.mean((rc + rr) ** 2)
    return loss


# ----------------------------------------------------------------------------------------- DPO family

LossAndRewards = tuple[Tensor, Tensor, Tensor]


def multi_head_bradley_terry_sums(
    chosen_rewards: Tensor, rejected_rewards: Tensor, targets: Tensor, mask: Tensor
) -> Tensor:
    """Per-head SUMMED soft Bradley-Terry losses of a multi-head reward model over the pairs labelled for it.

    Each head h is its own Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1) of one rated
    dimension: with ``delta = r_c[:, h] - r_r[:, h]`` and ``p = targets[:, h] = P(chosen better on h)`` a pair
    costs ``-[p log sigmoid(delta) + (1 - p) log sigmoid(-delta)]``; pairs whose ``mask[:, h]`` is False (no
    label for h) cost nothing and get no gradient. Sums, not means, so a caller that accumulates micro-batches
    divides each head by its labelled-pair count over the whole step and gets the same loss for any split.

    Args:
        chosen_rewards, rejected_rewards: ``(B, H)`` rewards, one column per head.
        targets: ``(B, H)`` soft labels in ``[0, 1]`` (any value where masked).
        mask: ``(B, H)`` bool, True where the pair carries the head's label.

    Returns:
        ``(H,)`` summed losses.
    """
    if not (chosen_rewards.shape == rejected_rewards.shape == targets.shape == mask.shape):
        raise ValueError(
            f"chosen {tuple(chosen_rewards.shape)}, rejected {tuple(rejected_rewards.shape)}, targets "
            f"{tuple(targets.shape)} and mask {tuple(mask.shape)} must all be (B, H)"
        )
    delta = chosen_rewards - rejected_rewards
    p = torch.where(mask, targets.to(delta.dtype), torch.zeros_like(delta))
    if ((p < 0) | (p > 1)).any():
        raise ValueError("targets must lie in [0, 1]")
    per_pair = _soft_bce(delta, p)
    return torch.where(mask, per_pair, torch.zeros_like(per_pair)).sum(0)


def _check_pairs(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected equal (B,) tensors, got {shapes}")


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    _check_pairs(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr)
    return pc - rc, pr - rr


def _implicit_rewards(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    return beta * chosen.detach(), beta * rejected.detach()


def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossAndRewards:
    """DPO (Rafailov et al. 2023, eq. 7) and, with ``label_smoothing = eps > 0``, conservative DPO (cDPO).

    ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``;
    ``loss = mean[-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)]`` (cDPO: labels flipped with
    probability ``eps``; Mitchell 2023, "A note on DPO with noisy preferences").

    Args:
        policy_*_logps, ref_*_logps: ``(B,)`` summed completion log-probs.

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses.mean(), *_implicit_rewards(beta, chosen, rejected))


def dpo_soft_label_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    soft_labels: Tensor,
    beta: float = 0.1,
) -> LossAndRewards:
    """DPO against a per-pair probability that ``chosen`` is better: cDPO with each pair's own flip rate.

    With ``p_i`` the soft label (e.g. the annotators' aggregated P(chosen better)) and ``h`` as in
    :func:`dpo_sigmoid_loss`: ``loss = mean[-p_i log sigmoid(beta h_i) - (1 - p_i) log sigmoid(-beta h_i)]``,
    the binary cross-entropy of the DPO preference model (Rafailov et al. 2023, eq. 7) against ``p_i``. A
    constant ``p_i = 1 - eps`` is cDPO with ``label_smoothing = eps`` (Mitchell 2023); ``p_i = 1`` is DPO.

    Args:
        policy_*_logps, ref_*_logps: ``(B,)`` summed completion log-probs.
        soft_labels: ``(B,)`` in ``[0, 1]``.

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``.
    """
    if soft_labels.shape != policy_chosen_logps.shape:
        raise ValueError(
            f"soft_labels must be {tuple(policy_chosen_logps.shape)}, got {tuple(soft_labels.shape)}"
        )
    if ((soft_labels < 0) | (soft_labels > 1)).any():
        raise ValueError("soft_labels must lie in [0, 1]")
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    losses = _soft_bce(logits, soft_labels.to(logits.dtype))
    return (losses.mean(), *_implicit_rewards(beta, chosen, rejected))


def dpo_robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> LossAndRewards:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8), unbiased under label-flip rate ``eps``.

    With ``l(x) = -log sigmoid(beta x)`` and ``h`` as in :func:`dpo_sigmoid_loss`:
    ``loss = mean[((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps)]``.

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing (flip rate) must be in [0, 0.5), got {label_smoothing}")
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return (losses.mean(), *_implicit_rewards(beta, chosen, rejected))


def dpo_ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> LossAndRewards:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17): ``mean[(h - 1 / (2 tau))^2]``, ``tau = beta``.

    Summed log-ratios make the squared loss grow with completion length, so when ``chosen_lengths`` /
    ``rejected_lengths`` (completion token counts ``(B,)``) are given each log-ratio is divided by its length
    first, as TRL does (a normalisation the IPO authors confirmed). Without them ``h`` uses the inputs as given.

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``; rewards use the un-normalised log-ratios.
    """
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    h_chosen, h_rejected = chosen, rejected
    if chosen_lengths is not None and rejected_lengths is not None:
        _check_pairs(chosen=chosen, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
        h_chosen = chosen / chosen_lengths.clamp(min=1).to(chosen.dtype)
        h_rejected = rejected / rejected_lengths.clamp(min=1).to(rejected.dtype)
    losses = (h_chosen - h_rejected - 1 / (2 * beta)) ** 2
    return (losses.mean(), *_implicit_rewards(beta, chosen, rejected))


def dpo_hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> LossAndRewards:
    """SLiC-HF hinge calibration loss (Zhao et al. 2023, eq. 1) on reference-normalised log-ratios, as in TRL:
    ``mean[max(0, 1 - beta h)]`` (margin ``1 / beta`` in log-ratio units).

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``.
    """
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1 - beta * (chosen - rejected))
    return (losses.mean(), *_implicit_rewards(beta, chosen, rejected))


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossAndRewards:
    """SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with target margin ``gamma``.

    ``loss = mean[-log sigmoid(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)]``; with
    ``label_smoothing`` the same conservative mixing as cDPO.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` **per-token mean** completion log-probs
            (``sequence_logps(..., average=True)`` / ``PairLogps.*_logps_mean``).

    Returns:
        ``(loss, chosen_rewards = beta * avg_logp(y_w), rejected_rewards)``.
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses.mean(), *_implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps))


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0`` (Maechler 2012): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` below -ln 2."""
    threshold = -math.log(2.0)
    # Each branch gets inputs valid for it so that the unused branch never produces inf/NaN gradients.
    near = torch.where(x >= threshold, x, torch.full_like(x, threshold))
    far = torch.where(x < threshold, x, torch.full_like(x, threshold))
    return torch.where(x >= threshold, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_nll: Tensor,
    beta: float = 0.1,
) -> LossAndRewards:
    """ORPO (Hong et al. 2024, eqs. 6-7): ``L_SFT + lambda * L_OR`` with ``lambda = beta``.

    ``odds(y) = P(y) / (1 - P(y))`` with ``P = exp(avg_logp)``; ``log odds(y_w) - log odds(y_l) =
    (a_w - a_l) - (log(1 - e^{a_w}) - log(1 - e^{a_l}))``; ``L_OR = -mean log sigmoid(log odds ratio)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` **per-token mean** log-probs (< 0).
        chosen_nll: scalar NLL of the chosen completions (``PairLogps.chosen_nll`` or :func:`token_nll`).

    Returns:
        ``(loss, chosen_rewards = beta * avg_logp(y_w), rejected_rewards)``.
    """
    _check_pairs(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
    if chosen_nll.dim() != 0:
        raise ValueError(f"chosen_nll must be a scalar, got shape {tuple(chosen_nll.shape)}")
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        _log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps)
    )
    loss = chosen_nll - beta * F.logsigmoid(log_odds).mean()
    return (loss, *_implicit_rewards(beta, policy_chosen_logps, policy_rejected_logps))


DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo")


def dpo_loss(
    loss_type: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    chosen_nll: Tensor | None = None,
) -> LossAndRewards:
    """Pick a pairwise preference loss by name (the value of a recipe's ``loss_type`` config field).

    ``sigmoid`` DPO (``label_smoothing`` > 0 gives cDPO); ``cdpo`` the same, requiring ``label_smoothing`` > 0;
    ``robust`` rDPO; ``ipo`` (uses ``chosen_lengths``/``rejected_lengths`` if given); ``hinge`` SLiC;
    ``simpo`` (reference-free, ``gamma``; pass per-token mean log-probs); ``orpo`` (reference-free, needs
    ``chosen_nll``; pass per-token mean log-probs). KTO, which takes unpaired data, was removed (module docstring).

    Returns:
        ``(loss, chosen_rewards (B,), rejected_rewards (B,))``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if loss_type == "simpo":
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, beta, gamma, label_smoothing)
    if loss_type == "orpo":
        if chosen_nll is None:
            raise ValueError("loss_type 'orpo' needs chosen_nll (the SFT term on chosen completions)")
        return orpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_nll, beta)
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"loss_type {loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    refs = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if loss_type == "cdpo":
        if not label_smoothing > 0:
            raise ValueError("loss_type 'cdpo' needs label_smoothing > 0 (the assumed label-flip rate)")
        return dpo_sigmoid_loss(*refs, beta, label_smoothing)
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(*refs, beta, label_smoothing)
    if loss_type == "robust":
        return dpo_robust_loss(*refs, beta, label_smoothing)
    if loss_type == "ipo":
        return dpo_ipo_loss(*refs, beta, chosen_lengths, rejected_lengths)
    return dpo_hinge_loss(*refs, beta)


# ------------------------------------------------------------------------------------------------ PPO


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    aggregation: Aggregation = "token-mean",
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` over a response mask to a scalar.

    ``token-mean``: ``sum(l * m) / sum(m)`` (every token equal; ``num_items_in_batch`` overrides ``sum(m)``
    for gradient accumulation); ``seq-mean-token-mean``: mean over sequences of each sequence's token mean
    (every sequence equal; sequences without tokens are skipped); ``seq-mean-token-sum``: mean over
    sequences of token sums (Dr. GRPO's length-unbiased form, Liu et al. 2025).
    """
    if per_token.shape != mask.shape or per_token.dim() != 2:
        raise ValueError(
            f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} must be equal (B, T)"
        )
    keep = mask.bool()
    masked = torch.where(keep, per_token, torch.zeros_like(per_token))
    if aggregation == "token-mean":
        if num_items_in_batch is None:
            return masked.sum() / keep.sum().clamp(min=1).to(masked.dtype)
        return masked.sum() / torch.as_tensor(num_items_in_batch, device=masked.device).to(masked.dtype)
    if num_items_in_batch is not None:
        raise ValueError("num_items_in_batch only applies to aggregation='token-mean'")
    counts = keep.sum(dim=1)
    if aggregation == "seq-mean-token-mean":
        has = counts > 0
        return (masked.sum(dim=1)[has] / counts[has].to(masked.dtype)).mean()
    if aggregation == "seq-mean-token-sum":
        return masked.sum(dim=1).mean()
    raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    aggregation: Aggregation = "token-mean",
    num_items_in_batch: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token, as a loss to minimise.

    ``rho = exp(log pi - log pi_old)``; ``l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))``
    (the negative of ``min(rho A, clip(rho) A)``); ``eps_high = clip_range_high`` if given (DAPO's
    asymmetric clip) else ``clip_range``.

    Args:
        logprobs: ``(B, T)`` current-policy log-probs of the sampled tokens (requires grad).
        old_logprobs: ``(B, T)`` log-probs at sampling time.
        advantages: ``(B, T)`` (or ``(B,)``, broadcast over tokens, as GRPO/RLOO produce).
        mask: ``(B, T)`` response mask.

    Returns:
        ``(loss, stats)``; detached stats: ``clip_frac`` (fraction of tokens where the clipped term is
        active), ``approx_kl`` (k3 estimate of ``KL(pi_old || pi)``, token mean), ``ratio_mean``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == mask.shape):
        raise ValueError(
            f"shapes differ: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"advantages {tuple(advantages.shape)}, mask {tuple(mask.shape)}"
        )
    eps_high = clip_range if clip_range_high is None else clip_range_high
    keep = mask.bool()
    # Zero the log-ratio on padding so exp() cannot overflow there and poison the backward pass with NaN.
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + eps_high)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, aggregation, num_items_in_batch)
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float | None = 0.2,
    aggregation: Aggregation = "token-mean",
    num_items_in_batch: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (OpenAI baselines ppo2; TRL's former PPOTrainer):
    ``0.5 * agg(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))``; ``clip_range_value=None`` disables
    clipping (plain ``0.5 * (V - R)^2``).

    Args:
        values: ``(B, T)`` current value predictions (requires grad).
        old_values: ``(B, T)`` predictions at rollout time.
        returns: ``(B, T)`` targets (from :func:`alignflow.train.advantages.gae`).
        mask: ``(B, T)`` response mask.

    Returns:
        ``(loss, stats)`` with detached ``clip_frac`` (fraction of tokens where the clipped error is larger).
    """
    if not (values.shape == old_values.shape == returns.shape == mask.shape):
        raise ValueError(
            f"shapes differ: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
            f"returns {tuple(returns.shape)}, mask {tuple(mask.shape)}"
        )
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        per_token = unclipped
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
        clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clip_frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    loss = 0.5 * aggregate_loss(per_token, mask, aggregation, num_items_in_batch)
    return loss, {"clip_frac": clip_frac}


def entropy_from_logits(
    logits: Tensor, mask: Tensor | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Shannon entropy ``H = -sum_v p_v log p_v`` (nats) of each row of ``logits``, in row chunks.

    ``chunk_rows`` rows at a time so only one chunk's log-softmax exists at once; half-precision chunks are
    upcast to float32 one at a time.

    Args:
        logits: ``(..., V)``, e.g. ``(B, T, V)``.
        mask: optional ``(...)`` mask; entropies at masked-out positions are set to 0. Reduce with
            :func:`aggregate_loss` for a scalar.

    Returns:
        ``(...)`` entropies.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    parts = []
    for chunk in flat.split(chunk_rows):
        if low_precision:
            chunk = chunk.float()
        logp = torch.log_softmax(chunk, dim=-1)
        parts.append(-(logp.exp() * logp).sum(dim=-1))
    entropy = torch.cat(parts).reshape(logits.shape[:-1])
    if mask is not None:
        if mask.shape != entropy.shape:
            raise ValueError(
                f"mask {tuple(mask.shape)} must match logits without vocab dim {tuple(entropy.shape)}"
            )
        entropy = torch.where(mask.bool(), entropy, torch.zeros_like(entropy))
    return entropy


__all__: list[str] = [
    "dpo_soft_label_loss",
    "multi_head_bradley_terry_sums",
    "AGGREGATIONS",
    "DPO_LOSS_TYPES",
    "aggregate_loss",
    "bradley_terry_loss",
    "dpo_hinge_loss",
    "dpo_ipo_loss",
    "dpo_loss",
    "dpo_robust_loss",
    "dpo_sigmoid_loss",
    "entropy_from_logits",
    "orpo_loss",
    "ppo_policy_loss",
    "simpo_loss",
    "token_nll",
    "value_loss",
]
