"""Experience assembly for PPO / RLOO / GRPO: forward passes over rollouts, reward shaping, running stats.

Layout: every scoring forward runs on ``prompt + response`` as one left-padded batch ``(B, P + R)``; the
response occupies the last ``R`` columns (right-padded inside that block). The log-prob of response token
``t`` comes from the logits at column ``P + t - 1`` (next-token shift), so a forward returns ``(B, R)``
tensors aligned with ``Rollout.response_ids``.

The arithmetic (KL, per-token rewards, GAE, whitening, advantages) lives in
:mod:`alignflow.train.advantages` and the log-softmax gather in :mod:`alignflow.train.logprobs`; this module
only feeds them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignflow.data.packing import TreeBatch, pack_prefix_trees
from alignflow.rollout.generation import Rollout, prompt_position_ids
from alignflow.train.logprobs import selective_log_softmax, splittable, tree_hidden
from alignflow.train.losses import entropy_from_logits


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


@dataclass
class ForwardOut:
    """Per-response-token outputs of :func:`response_forward`, all ``(B, R)``."""

    logprobs: Tensor
    entropy: Tensor | None = None
    values: Tensor | None = None


def _inputs(input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": prompt_position_ids(attention_mask),
    }


def response_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_values: bool = False,
) -> ForwardOut:
    """One forward of a causal LM (or :class:`~alignflow.models.CausalLMWithValueHead`) over prompt+response.

    Args:
        model: returns ``.logits`` (HF) or ``(logits, values)`` (value-head wrapper, needs ``with_values``).
        input_ids, attention_mask: ``(B, P + R)`` from :meth:`Rollout.sequences`.
        response_len: ``R``.
        temperature: logits are divided by it (the sampling temperature; 0 is treated as 1).

    Returns:
        :class:`ForwardOut` with ``logprobs`` ``(B, R)`` of the response tokens; ``entropy`` ``(B, R)`` if asked;
        ``values`` ``(B, R)`` (the value of the state *before* each response token) for a value-head model.
    """
    # The LM head only where a response token is predicted (the prompt's logits are never used).
    out = model(**_inputs(input_ids, attention_mask), logits_to_keep=response_len + 1)
    if isinstance(out, tuple):
        logits, values = out
    else:
        logits, values = out.logits, None
    # Next-token shift: the token at column P + t is predicted by the logits at column P + t - 1.
    logits = logits[:, -response_len - 1 : -1, :]
    if temperature > 0 and temperature != 1.0:
        # Upcast first: dividing bf16 logits rounds them (~4e-3 relative), which the sampler (fp32) never saw.
        logits = logits.float() / temperature
    targets = input_ids[:, -response_len:]
    res = ForwardOut(logprobs=selective_log_softmax(logits, targets))
    if with_entropy:
        res.entropy = entropy_from_logits(logits)
    if with_values:
        if values is None:
            raise TypeError(
                f"{type(model).__name__} returned no values; with_values needs a value-head model"
            )
        res.values = values[:, -response_len - 1 : -1].float()
    return res


def value_forward(
    value_model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_len: int
) -> Tensor:
    """Per-token values ``(B, R)`` from a separate sequence-classification value model (trunk + ``score``).

    ``AutoModelForSequenceClassification`` pools one position; PPO needs every position, so we run its trunk
    (``base_model``) and apply the ``score`` head to all hidden states.
    """
    trunk = value_model.base_model
    hidden = trunk(**_inputs(input_ids, attention_mask)).last_hidden_state  # (B, P+R, H)
    hidden = hidden[:, -response_len - 1 : -1, :]
    return value_model.score(hidden).squeeze(-1).float()  # (B, R)


@torch.no_grad()
def batched(fn: Any, n: int, chunk: int, *tensors: Tensor) -> list[Any]:
    """Call ``fn(*slices)`` over row chunks of ``tensors`` (``chunk`` rows at a time) to bound memory."""
    return [fn(*(t[i : i + chunk] for t in tensors)) for i in range(0, n, chunk)]


# ---------------------------------------------------------------------------------------------------------------------
# packed layout: prompt trees


@dataclass
class RolloutTrees:
    """Rows of a rollout as packed prompt trees (:class:`~alignflow.data.packing.TreeBatch`).

    Rows that share a prompt (a GRPO/RLOO group) become one tree: the prompt once, each response a branch
    that never attends to its siblings. No left padding, the prompt computed once per group instead of once
    per row, and heads run only at the ``T`` response positions. ``row_of_target (T,)`` and ``target_index
    (T,)`` place each target back in the ``(n_rows, R)`` layout of :func:`response_forward`.
    """

    batch: TreeBatch
    row_of_target: Tensor
    n_rows: int
    response_len: int

    def scatter(self, values: Tensor) -> Tensor:
        """``(T,)`` per-target values → ``(n_rows, R)``, 0 where a row has no response token (differentiable)."""
        out = values.new_zeros(self.n_rows, self.response_len)
        return out.index_put((self.row_of_target, self.batch.target_index), values)


def rollout_trees(
    roll: Rollout, rows: Tensor | list[int], groups: Tensor | list[int] | None = None
) -> RolloutTrees:
    """Pack ``rows`` of ``roll`` (prompt + its response tokens up to EOS) as prompt trees.

    Args:
        roll: the rollout.
        rows: row indices, in the order the output layout uses.
        groups: per-row group id of the whole rollout (rows with the same id share the prompt); ``None``
            makes every row its own tree.
    """
    rows = [int(r) for r in rows]
    device = roll.prompt_ids.device
    lengths = roll.response_mask.sum(dim=1).tolist()
    prompts = roll.prompt_ids.cpu()
    pmask = roll.prompt_mask.cpu().bool()
    responses = roll.response_ids.cpu()
    by_group: dict[Any, list[int]] = {}
    for pos, r in enumerate(rows):
        key = int(groups[r]) if groups is not None else ("row", r)
        by_group.setdefault(key, []).append(pos)
    trees, row_of_branch = [], []
    for members in by_group.values():
        first = rows[members[0]]
        prefix = prompts[first][pmask[first]].tolist()
        branches = []
        for pos in members:
            ids = responses[rows[pos]][: int(lengths[rows[pos]])].tolist()
            branches.append((ids, ids))
            row_of_branch.append(pos)
        trees.append((prefix, branches))
    tb = pack_prefix_trees(trees, pad_token_id=0).to(device)
    row_of_target = torch.tensor(row_of_branch, dtype=torch.long, device=device)[tb.target_branch]
    return RolloutTrees(tb, row_of_target, len(rows), roll.response_ids.shape[1])


def packable(model: nn.Module, head: str = "lm_head") -> bool:
    """Whether a packed forward can run ``model``: a separable trunk and ``head``.

    ``"lm_head"`` for :func:`tree_response_forward` (a causal LM or a value-head wrapper), ``"score"`` for
    :func:`tree_value_forward` (a sequence-classification value model).
    """
    return splittable(model.lm if hasattr(model, "value_head") and hasattr(model, "lm") else model, head)


def tree_response_forward(
    model: nn.Module,
    trees: RolloutTrees,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_values: bool = False,
) -> ForwardOut:
    """:func:`response_forward` on packed prompt trees: the same ``(n_rows, R)`` outputs, 0 off the response.

    ``model`` is a causal LM or a :class:`~alignflow.models.CausalLMWithValueHead` (for ``with_values``).
    """
    value_head = getattr(model, "value_head", None)
    lm = model.lm if value_head is not None and hasattr(model, "lm") else model
    tb = trees.batch
    hidden, lm_head = tree_hidden(lm, tb)
    h = hidden[tb.target_rows, tb.target_cols]  # (T, H): the state before each response token
    logits = lm_head(h)  # (T, V)
    if temperature > 0 and temperature != 1.0:
        logits = logits.float() / temperature
    res = ForwardOut(logprobs=trees.scatter(selective_log_softmax(logits, tb.target_ids)))
    if with_entropy:
        res.entropy = trees.scatter(entropy_from_logits(logits))
    if with_values:
        if value_head is None:
            raise TypeError(f"{type(model).__name__} has no value head; with_values needs a value-head model")
        res.values = trees.scatter(value_head(h.to(value_head.summary.weight.dtype)).float())
    return res


def tree_value_forward(value_model: nn.Module, trees: RolloutTrees) -> Tensor:
    """:func:`value_forward` on packed prompt trees: per-token values ``(n_rows, R)``, 0 off the response."""
    tb = trees.batch
    hidden, score = tree_hidden(value_model, tb, head="score")
    h = hidden[tb.target_rows, tb.target_cols]
    return trees.scatter(score(h).squeeze(-1).float())
