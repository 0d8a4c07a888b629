"""Advantages, returns, KL estimators and KL controllers for on-policy RLHF (PPO, RLOO, GRPO).

Shapes: ``B`` sequences (rollouts), ``T`` response tokens, ``N = P * k`` completions for ``P`` prompts with
``k`` samples each (grouped contiguously: rows ``[i*k, (i+1)*k)`` belong to prompt ``i``).

Masks are 0/1 (or bool) ``(B, T)`` tensors marking real response tokens; every function here ignores the
values at masked-out positions and returns zeros there where it returns per-token tensors.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1.

    Args:
        values: any shape, e.g. ``(B, T)``.
        mask: same shape, 0/1 or bool.
        dim: reduce only this dimension (e.g. ``1`` for a per-sequence mean ``(B,)``); None reduces all.

    Returns:
        0-dim tensor, or ``values`` with ``dim`` removed. Division by a zero count gives NaN, as an empty mean
        should; callers that may see empty rows must handle it.
    """
    _check_same_shape(values=values, mask=mask)
    mask = mask.to(values.dtype)
    # where() rather than values * mask so that inf/NaN at masked positions cannot leak into the sum.
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))
    if dim is None:
        return masked.sum() / mask.sum()
    return masked.sum(dim=dim) / mask.sum(dim=dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over masked-in positions (all dims reduced).

    ``unbiased=True`` applies Bessel's correction ``n / (n - 1)`` with ``n = mask.sum()``.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: if the mask is empty, or has a single element with ``unbiased=True``.
    """
    count = mask.to(values.dtype).sum()
    if count == 0:
        raise ValueError("masked_var: mask selects no elements")
    if unbiased and count == 1:
        raise ValueError("masked_var: unbiased variance needs at least 2 masked-in elements, mask selects 1")
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise ``values`` with the masked mean and unbiased masked variance: ``(x - mu) / sqrt(var + eps)``.

    ``shift_mean=False`` adds the mean back (only rescales), as PPO does when whitening rewards so that the
    sign of the reward is kept. Masked-out positions are returned as 0.

    Args:
        values, mask: ``(B, T)`` (any equal shapes).

    Returns:
        Tensor shaped like ``values``.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = sum_l (gamma * lam)^l delta_{t+l}``, computed with the
    backward recursion ``A_t = delta_t + gamma * lam * A_{t+1}``. The episode ends at the last masked-in
    token: a masked-out next position contributes neither its value nor its advantage, so right padding,
    left padding and garbage values at padded positions are all handled. (An interior hole in the mask is
    treated as an episode boundary.)

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. from :func:`per_token_rewards`).
        values: ``(B, T)`` value estimates ``V(s_t)``.
        mask: ``(B, T)`` 1 on response tokens.
        gamma: discount; lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 at masked-out positions; ``returns = advantages + values``
        (the lambda-return target for the value head).
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"gae expects (B, T) tensors, got {tuple(rewards.shape)}")
    keep = mask.bool()
    zeros = torch.zeros_like(rewards)
    rewards = torch.where(keep, rewards, zeros)
    values = torch.where(keep, values, zeros)
    keep_f = keep.to(rewards.dtype)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = rewards.new_zeros(rewards.shape[0])
    next_value = rewards.new_zeros(rewards.shape[0])
    next_keep = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value * next_keep - values[:, t]
        next_adv = delta + gamma * lam * next_adv * next_keep
        advantages[:, t] = next_adv
        next_value, next_keep = values[:, t], keep_f[:, t]
    advantages = torch.where(keep, advantages, zeros)
    returns = torch.where(keep, advantages + values, zeros)
    return advantages, returns


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi`` (Schulman, "Approximating KL
    Divergence", 2020).

    With ``log r = log pi_ref(x) - log pi(x)``: ``k1 = -log r`` (unbiased, can be negative),
    ``k2 = (log r)^2 / 2`` (biased, low variance), ``k3 = (r - 1) - log r`` (unbiased, always >= 0).

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` under the reference model.
        estimator: ``"k1" | "k2" | "k3"``.

    Returns:
        ``(B, T)`` per-token estimates (not masked; multiply by the response mask before summing).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def per_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-RLHF reward per token (Ziegler et al. 2019; Ouyang et al. 2022 eq. 2): ``-kl_coef * KL_t`` on every
    response token plus the scalar reward-model score at the last response token.

    Args:
        scores: ``(B,)`` reward-model scores of the full responses.
        logprobs, ref_logprobs: ``(B, T)`` sampled-token log-probs under the policy and the reference.
        mask: ``(B, T)`` response mask; each row needs at least one 1 (the score lands on its last 1).
        kl_coef: penalty coefficient (e.g. ``controller.value``).

    Returns:
        ``(rewards, non_score_rewards, kl)``, all ``(B, T)`` and 0 at masked-out positions.
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"scores must be (B,) = ({logprobs.shape[0]},), got {tuple(scores.shape)}")
    keep = mask.bool()
    empty = ~keep.any(dim=1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"per_token_rewards: rows {rows} have an empty response mask, nowhere to put the score"
        )
    zeros = torch.zeros_like(logprobs)
    kl = torch.where(keep, kl_penalty(logprobs, ref_logprobs, estimator), zeros)
    non_score = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    rewards = non_score.clone()
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, non_score, kl


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> float:
        """No-op; returns the coefficient."""
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2).

    ``e = clip(KL_current / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``, where
    ``n_steps`` is the number of samples (episodes) seen since the last update, as in TRL's former
    ``PPOTrainer``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0, horizon > 0; got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current: float, n_steps: int) -> float:
        """Update the coefficient from the measured KL ``current`` (nats per sequence); returns the new value."""
        error = min(max(float(current) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def _grouped(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), got {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of num_generations={num_generations}"
        )
    return rewards.view(-1, num_generations)


def rloo_advantages(
    rewards: Tensor, num_generations: int, normalize: bool = False, eps: float = 1e-4
) -> Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, eq. 5).

    ``A_i = r_i - (1 / (k - 1)) * sum_{j != i} r_j`` within each prompt's group of ``k`` samples.

    Args:
        rewards: ``(N,)`` with ``N = P * k``, grouped contiguously per prompt.
        num_generations: ``k``, at least 2.
        normalize: standardise the advantages over the whole batch afterwards (unbiased std, ``+ eps``), as
            TRL's ``normalize_advantages``.

    Returns:
        ``(N,)`` advantages.
    """
    if num_generations < 2:
        raise ValueError(f"RLOO needs num_generations >= 2 (leave-one-out), got {num_generations}")
    grouped = _grouped(rewards, num_generations)  # (P, k)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (num_generations - 1)
    advantages = (grouped - baseline).reshape(-1)
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + eps)
    return advantages


def grpo_advantages(
    rewards: Tensor,
    num_generations: int,
    scale_rewards: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2): ``(r_i - mean_g) / (std + eps)``.

    Args:
        rewards: ``(N,)`` with ``N = P * k``, grouped contiguously per prompt.
        num_generations: ``k``.
        scale_rewards: ``"group"`` divides by each group's unbiased std (the paper); ``"batch"`` by the whole
            batch's std; ``"none"`` only centres (Dr. GRPO, Liu et al. 2025, which argues the std division biases
            toward easy/hard prompts). Groups of one get std 0.
        eps: added to the std (TRL uses 1e-4).

    Returns:
        ``(N,)`` advantages.
    """
    grouped = _grouped(rewards, num_generations)  # (P, k)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(grouped)
        std = std.expand_as(grouped).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    else:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: 'group', 'batch', 'none'")
    return centred / (std + eps)
