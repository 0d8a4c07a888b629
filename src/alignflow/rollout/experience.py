"""Experience for PPO / RLOO / GRPO: reward shaping and running statistics, then the step's tensors.

:func:`make_experience` turns a scored rollout into an :class:`Experience` — old and reference log-probs, the
per-token KL, the critic's values, advantages and returns — through one :class:`~alignflow.rollout.forward.Forwarder`
(which owns the packed/padded layout). The arithmetic (KL estimators, per-token rewards, GAE, whitening, RLOO and
GRPO advantages) lives in :mod:`alignflow.train.advantages`; this module only feeds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from alignflow.rollout.forward import Forwarder, RolloutRows
from alignflow.train.advantages import (
    gae,
    grpo_advantages,
    kl_penalty,
    masked_var,
    masked_whiten,
    per_token_rewards,
    rloo_advantages,
)


class RunningMoments:
    """Running mean and standard deviation of a stream of scalars (Chan et al. 1979 parallel update).

    Used to normalise rewards across PPO steps (``(r - mean) / std``) the way the original
    ``lm-human-preferences`` and TRL's former ``PPOTrainer`` do. State is plain floats (JSON-able) so it goes
    into the checkpoint's ``data_state``.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0  # population variance of everything seen
        self.count = 0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Fold a batch ``(N,)`` in; returns the batch's own ``(mean, std)`` (unbiased std)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            raise ValueError("RunningMoments.update: empty batch")
        b_mean = float(xs.mean())
        b_var = float(xs.var(unbiased=False)) if n > 1 else 0.0
        total = self.count + n
        delta = b_mean - self.mean
        if self.count == 0:
            self.mean, self.var = b_mean, b_var
        else:
            m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / total
            self.mean += delta * n / total
            self.var = m2 / total
        self.count = total
        return b_mean, (float(xs.std()) if n > 1 else 0.0)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


@dataclass(frozen=True)
class ShapingConfig:
    """Reward shaping applied to the scalar scores before the KL penalty (all optional).

    Attributes:
        missing_eos_penalty: subtracted from the score of responses that hit ``max_new_tokens`` without EOS.
        length_penalty: subtracted per response token (``score - c * length``).
        clip: scores are clipped to ``[-clip, clip]`` after normalisation (None = no clip).
        normalize: divide by the running std and subtract the running mean (statistics over all steps so far,
            this batch included).
    """

    missing_eos_penalty: float | None = None
    length_penalty: float = 0.0
    clip: float | None = None
    normalize: bool = False


def shape_scores(
    scores: Tensor, finished: Tensor, lengths: Tensor, cfg: ShapingConfig, moments: RunningMoments | None
) -> Tensor:
    """Apply :class:`ShapingConfig` to raw scores.

    Args:
        scores: ``(B,)`` raw rewards.
        finished: ``(B,)`` bool, the response ended with EOS.
        lengths: ``(B,)`` response lengths in tokens.
        moments: running statistics, updated here when ``cfg.normalize``.

    Returns:
        ``(B,)`` shaped float32 scores.
    """
    out = scores.float().clone()
    if cfg.missing_eos_penalty is not None:
        out = torch.where(finished, out, out - cfg.missing_eos_penalty)
    if cfg.length_penalty:
        out = out - cfg.length_penalty * lengths.to(out.dtype)
    if cfg.normalize:
        if moments is None:
            raise ValueError("shape_scores: normalize=True needs a RunningMoments")
        moments.update(out)
        out = (out - moments.mean) / (moments.std + 1e-8)
    if cfg.clip is not None:
        out = out.clamp(-cfg.clip, cfg.clip)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the step's tensors


@dataclass(frozen=True)
class AdvantageSpec:
    """How a scored rollout becomes advantages.

    Attributes:
        estimator: ``gae`` (per-token reward ``-beta * KL_t`` plus the score at the last token, GAE over the
            critic's values), ``rloo`` (sequence reward ``score - beta * sum_t KL_t``, leave-one-out baseline)
            or ``grpo`` (group-normalised scores; its KL is a loss term, not a reward term).
        group_size: ``k``, samples per prompt (rows grouped contiguously per prompt).
        kl_estimator: ``k1``, ``k2`` or ``k3`` (:func:`alignflow.train.advantages.kl_penalty`).
        gamma, lam: GAE discount and trace parameters.
        whiten: ``gae``: whiten the advantages over the batch; ``rloo``: normalise them.
        grpo_scale: GRPO's std scaling: ``group``, ``batch`` or ``none``.
        recompute_logprobs: old log-probs from a forward in the training layout instead of the sampler's.
    """

    estimator: Literal["gae", "rloo", "grpo"] = "gae"
    group_size: int = 1
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    grpo_scale: Literal["group", "batch", "none"] = "group"
    recompute_logprobs: bool = False


@dataclass
class Experience:
    """One rollout round, ready for the PPO update. ``B`` rows (grouped per prompt), ``R`` response columns.

    Attributes:
        rows: the rollout as the forwards see it (:class:`~alignflow.rollout.forward.RolloutRows`).
        prompts: the ``B`` prompt texts (row ``i``'s prompt; repeated within a group).
        raw_scores: ``(B,)`` reward-source scores before shaping.
        scores: ``(B,)`` shaped scores (:func:`shape_scores`).
        mask: ``(B, R)`` float, 1 on response tokens (EOS included).
        old_logprobs: ``(B, R)`` ``log pi_old`` of the sampled tokens.
        ref_logprobs: ``(B, R)`` reference log-probs of the sampled tokens.
        kl: ``(B, R)`` per-token KL estimate ``old`` vs ``ref``, 0 off the response.
        kl_seq: ``(B,)`` ``kl`` summed over the response.
        beta: the KL coefficient this round used.
        advantages: ``(B, R)`` for ``gae``; ``(B,)`` for ``rloo`` / ``grpo`` (the loss broadcasts it over tokens).
        values: ``(B, R)`` the critic's values at rollout time (``gae`` only, else ``None``).
        returns: ``(B, R)`` GAE value targets (``gae`` only, else ``None``).
    """

    rows: RolloutRows
    prompts: list[str]
    raw_scores: Tensor
    scores: Tensor
    mask: Tensor
    old_logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor
    kl_seq: Tensor
    beta: float
    advantages: Tensor
    values: Tensor | None = None
    returns: Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)


def make_experience(
    forwarder: Forwarder,
    rows: RolloutRows,
    prompts: list[str],
    raw_scores: Tensor,
    scores: Tensor,
    beta: float,
    spec: AdvantageSpec,
) -> Experience:
    """Old and reference log-probs, KL, values (``gae``), advantages and returns of a scored rollout.

    Args:
        forwarder: runs the no-grad scoring forwards, in the run's layout.
        rows: the rollout, ``B`` rows grouped per prompt in groups of ``spec.group_size``.
        prompts: ``B`` prompt texts.
        raw_scores, scores: ``(B,)`` scores before and after shaping.
        beta: the KL coefficient (from the KL controller).
    """
    old, ref, values = scoring_forwards(forwarder, rows, spec)
    return experience_from(rows, prompts, raw_scores, scores, old, ref, values, beta, spec)


def scoring_forwards(
    forwarder: Forwarder, rows: RolloutRows, spec: AdvantageSpec
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The no-grad forwards of :func:`make_experience`: ``(old, ref, values)`` log-probs and critic values,
    all ``(B, R)`` (values ``None`` unless ``gae``). Row by row, so a process can run them on its own rows."""
    old = forwarder.policy_logprobs(rows) if spec.recompute_logprobs else rows.rollout.logprobs
    ref = forwarder.reference_logprobs(rows)
    values = forwarder.values(rows) if spec.estimator == "gae" else None
    return old, ref, values


def experience_from(
    rows: RolloutRows,
    prompts: list[str],
    raw_scores: Tensor,
    scores: Tensor,
    old: Tensor,
    ref: Tensor,
    values: Tensor | None,
    beta: float,
    spec: AdvantageSpec,
) -> Experience:
    """The arithmetic of :func:`make_experience` (KL, advantages, returns, whitening over the whole batch) on
    given forwards (:func:`scoring_forwards`, e.g. gathered from several processes)."""
    mask = rows.rollout.response_mask.float()
    kl = kl_penalty(old, ref, spec.kl_estimator) * mask  # (B, R)
    kl_seq = kl.sum(dim=1)  # (B,)
    returns = None
    k = spec.group_size
    if spec.estimator == "gae":
        if values is None:
            raise ValueError("experience_from: estimator 'gae' needs the critic's values")
        rewards, _, _ = per_token_rewards(scores, old, ref, mask, beta, spec.kl_estimator)
        advantages, returns = gae(rewards, values, mask, spec.gamma, spec.lam)
        if spec.whiten:
            advantages = masked_whiten(advantages, mask)
    elif spec.estimator == "rloo":
        advantages = rloo_advantages(scores - beta * kl_seq, k, normalize=spec.whiten)
        values = None
    elif spec.estimator == "grpo":
        advantages = grpo_advantages(scores, k, scale_rewards=spec.grpo_scale)
        values = None
    else:
        raise ValueError(f"unknown advantage estimator {spec.estimator!r}; valid: 'gae', 'rloo', 'grpo'")
    return Experience(
        rows, prompts, raw_scores, scores, mask, old, ref, kl, kl_seq, beta, advantages, values, returns
    )


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over response tokens of ``(B, R)`` values and returns: 1 is a perfect
    critic, <= 0 no better than a constant; NaN when the returns do not vary or fewer than 2 tokens count."""
    var_r = masked_var(returns, mask)
    if float(var_r) == 0.0 or int(mask.sum()) < 2:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)
