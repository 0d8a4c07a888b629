"""Forwards over rollout rows for PPO / RLOO / GRPO: log-probs, entropy and values of the response tokens.

Two layouts, the same numbers on every response token (tests/rollout/test_experience.py, test_forward.py):

- padded rows: ``prompt + response`` as one left-padded batch ``(B, P + R)``; the response occupies the last
  ``R`` columns (right-padded inside that block). The log-prob of response token ``t`` comes from the logits
  at column ``P + t - 1`` (next-token shift), so a forward returns ``(B, R)`` tensors aligned with
  ``Rollout.response_ids`` (:func:`response_forward`, :func:`value_forward`);
- packed prompt trees: a group's shared prompt once, each response a branch, no padding, heads only at the
  response positions (:func:`rollout_trees`, :func:`tree_response_forward`, :func:`tree_value_forward`),
  scattered back to the same ``(B, R)`` layout.

:class:`Forwarder` makes the choice once for a run and runs every forward a PPO step needs: the policy's
log-probs with entropy and values (with grad, per minibatch), and the no-grad scoring of a whole rollout in
chunks (old log-probs, reference log-probs — a frozen model, or the LoRA policy with its adapters off — and
the critic's values).

The log-softmax gather is in :mod:`alignflow.train.logprobs`; this module only feeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alignflow.data.packing import TreeBatch, pack_prefix_trees
from alignflow.models import reference_mode
from alignflow.rollout.generation import Rollout, prompt_position_ids
from alignflow.train.logprobs import selective_log_softmax, splittable, tree_hidden
from alignflow.train.losses import entropy_from_logits


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


# ---------------------------------------------------------------------------------------------------------------------
# the forwarder: one layout for every forward of a run


class RolloutRows:
    """A rollout as the forwards see it: ``B`` rows grouped per prompt, padded or as prompt trees on demand.

    Attributes:
        rollout: the sampled rollout.
        groups: ``(B,)`` group id of each row; rows ``g * k ... g * k + k - 1`` share prompt ``g``.
        sequences, attention_mask: ``(B, P + R)`` prompt + response, the padded layout.
        response_len: ``R``.
    """

    def __init__(self, rollout: Rollout, group_size: int) -> None:
        self.rollout = rollout
        self.groups = torch.arange(rollout.response_ids.shape[0]) // group_size
        self.sequences, self.attention_mask = rollout.sequences()
        self.response_len = rollout.response_ids.shape[1]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def trees(self, rows: list[int]) -> RolloutTrees:
        """``rows`` (in this order) packed as prompt trees, group members sharing their prompt."""
        return rollout_trees(self.rollout, rows, self.groups)


class Forwarder:
    """Every forward of a PPO step, in one layout chosen for the run: packed prompt trees where every model
    allows it (a head that splits off its trunk), else padded rows.

    Args:
        policy: the sampling policy; a ``peft`` model when ``reference`` is ``None``.
        reference: the frozen reference model, or ``None``: the policy with its LoRA adapters disabled.
        critic: a separate sequence-classification value model (trunk + ``score``), or ``None``.
        policy_with_value: the policy with a value head on its trunk (a shared-trunk critic), or ``None``.
        temperature: the sampling temperature; policy and reference logits are divided by it.
        packing: use packed prompt trees when the models allow it.
        chunk_size: rows per no-grad scoring forward (bounds activation memory).
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        critic: nn.Module | None = None,
        policy_with_value: nn.Module | None = None,
        temperature: float = 1.0,
        packing: bool = True,
        chunk_size: int = 32,
    ) -> None:
        if critic is not None and policy_with_value is not None:
            raise ValueError("Forwarder: pass a separate critic or a policy with a value head, not both")
        self.policy, self.reference, self.critic = policy, reference, critic
        self.policy_with_value = policy_with_value
        # The module the policy loss trains: the value-head wrapper when the critic shares the trunk.
        self.trained: nn.Module = policy_with_value if policy_with_value is not None else policy
        self.temperature, self.chunk_size = temperature, chunk_size
        self.packed = (
            packing
            and packable(self.trained)
            and (reference is None or packable(reference))
            and (critic is None or packable(critic, head="score"))
        )

    @property
    def has_critic(self) -> bool:
        return self.critic is not None or self.policy_with_value is not None

    @property
    def layout(self) -> str:
        """``"packed prompt trees"`` or ``"padded rows"`` (recorded in the run summary)."""
        return "packed prompt trees" if self.packed else "padded rows"

    def eval(self) -> None:
        """Sampling and scoring mode (no dropout) for the trained modules."""
        self.trained.eval()
        if self.critic is not None:
            self.critic.eval()

    def train(self) -> None:
        """Update mode for the trained modules."""
        self.trained.train()
        if self.critic is not None:
            self.critic.train()

    # -- one minibatch, with grad ----------------------------------------------------------------------------

    def train_forward(self, rows: RolloutRows, idx: list[int]) -> ForwardOut:
        """Log-probs and entropy ``(len(idx), R)`` of rows ``idx`` under the trained policy, and the critic's
        values when there is one; policy and a separate critic share one packing of the rows."""
        trees = rows.trees(idx) if self.packed else None
        out = self._lm(
            self.trained, rows, idx, trees, with_entropy=True, with_values=self.policy_with_value is not None
        )
        if self.critic is not None:
            out.values = self._critic_values(rows, idx, trees)
        return out

    # -- a whole rollout, no grad, in chunks of rows -----------------------------------------------------------

    def policy_logprobs(self, rows: RolloutRows) -> Tensor:
        """``(B, R)`` log-probs of the sampled tokens under the current policy (the training layout)."""
        return self._chunked(lambda idx: self._lm(self.policy, rows, idx).logprobs, len(rows))

    def reference_logprobs(self, rows: RolloutRows) -> Tensor:
        """``(B, R)`` log-probs under the reference: the frozen model, or the policy with adapters off."""
        return self._chunked(lambda idx: self._reference(rows, idx), len(rows))

    def values(self, rows: RolloutRows) -> Tensor:
        """``(B, R)`` critic values: the value of the state before each response token."""
        if self.policy_with_value is not None:
            vh = self.policy_with_value
            return self._chunked(lambda idx: self._lm(vh, rows, idx, with_values=True).values, len(rows))
        if self.critic is None:
            raise ValueError("Forwarder.values: no critic (pass critic= or policy_with_value=)")
        return self._chunked(lambda idx: self._critic_values(rows, idx), len(rows))

    # -- the two layouts -------------------------------------------------------------------------------------

    def _lm(
        self,
        model: nn.Module,
        rows: RolloutRows,
        idx: list[int],
        trees: RolloutTrees | None = None,
        **kw: bool,
    ) -> ForwardOut:
        if self.packed:
            return tree_response_forward(
                model, trees if trees is not None else rows.trees(idx), self.temperature, **kw
            )
        return response_forward(
            model, rows.sequences[idx], rows.attention_mask[idx], rows.response_len, self.temperature, **kw
        )

    def _critic_values(self, rows: RolloutRows, idx: list[int], trees: RolloutTrees | None = None) -> Tensor:
        if self.packed:
            return tree_value_forward(self.critic, trees if trees is not None else rows.trees(idx))
        return value_forward(self.critic, rows.sequences[idx], rows.attention_mask[idx], rows.response_len)

    def _reference(self, rows: RolloutRows, idx: list[int]) -> Tensor:
        if self.reference is not None:
            return self._lm(self.reference, rows, idx).logprobs
        with reference_mode(self.policy):
            return self._lm(self.policy, rows, idx).logprobs

    def _chunked(self, fn: Callable[[list[int]], Tensor], n: int) -> Tensor:
        with torch.no_grad():
            chunks = [list(range(i, min(i + self.chunk_size, n))) for i in range(0, n, self.chunk_size)]
            return torch.cat([fn(idx) for idx in chunks])


__all__ = [
    "ForwardOut",
    "Forwarder",
    "RolloutRows",
    "RolloutTrees",
    "packable",
    "response_forward",
    "rollout_trees",
    "tree_response_forward",
    "tree_value_forward",
    "value_forward",
]
