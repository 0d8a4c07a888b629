"""Reference-model log-probs for DPO-family losses: computed once and looked up by pair id, or on demand.

DPO compares the policy's summed completion log-probs with a frozen reference's, ``log pi_ref(y|x)`` for
the chosen and the rejected completion of every pair. Those never change during training, so
:class:`ReferenceLogps` can compute them once (:meth:`ReferenceLogps.precompute`, or :meth:`load` rows
stored earlier) and then answer each batch from a table keyed by pair id; without a table it runs the
reference on every batch. The reference is a separate frozen model, or the policy itself with its LoRA
adapters disabled (:func:`reference_forward`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from alignflow.models import reference_mode
from alignflow.train.logprobs import PairLogps


class HasId(Protocol):
    id: str


Item = TypeVar("Item", bound=HasId)
PairForward = Callable[[nn.Module, Sequence[Any]], PairLogps]


def reference_forward(
    policy: nn.Module, reference: nn.Module | None, forward: PairForward
) -> Callable[[Sequence[Any]], tuple[Tensor, Tensor]]:
    """``items -> (chosen_logps (B,), rejected_logps (B,))`` of the reference, in eval mode without gradients.

    ``reference`` is a separately loaded frozen model, or ``None`` for the policy with its LoRA adapters
    disabled (:func:`alignflow.models.reference_mode`). ``forward(model, items)`` is the recipe's pair
    forward (packed or padded); the model's train/eval mode is restored afterwards.
    """
    model = reference if reference is not None else policy

    def logps(items: Sequence[Any]) -> tuple[Tensor, Tensor]:
        ctx = reference_mode(policy) if reference is None else nullcontext()
        was_training = model.training
        model.eval()
        with torch.no_grad(), ctx:
            out = forward(model, items)
        model.train(was_training)
        return out.chosen_logps.detach(), out.rejected_logps.detach()

    return logps


def cache_key(spec: Mapping[str, Any]) -> str:
    """SHA-256 of everything the reference log-probs depend on (data, reference model, tokenisation, dtype)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class ReferenceLogps:
    """Reference log-probs of preference pairs, ``(chosen (B,), rejected (B,))`` float32 per batch.

    ``compute(items)`` runs the reference (:func:`reference_forward`). After :meth:`precompute` or
    :meth:`load` every batch is answered from the table (a pair missing from it is an error naming its id);
    before, every batch is computed on demand.
    """

    def __init__(
        self, compute: Callable[[Sequence[Any]], tuple[Tensor, Tensor]], device: torch.device
    ) -> None:
        self._compute = compute
        self._device = device
        self._table: dict[str, tuple[float, float]] = {}

    @property
    def precomputed(self) -> bool:
        return bool(self._table)

    def precompute(self, items: Sequence[Item], batch_size: int) -> list[dict[str, Any]]:
        """Run the reference over ``items`` in batches, keep the table, and return it as rows
        ``{"id", "chosen_logps", "rejected_logps"}`` (what :meth:`load` reads back)."""
        rows = []
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            chosen, rejected = self._compute(chunk)
            for item, c, r in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                self._table[item.id] = (c, r)
                rows.append({"id": item.id, "chosen_logps": c, "rejected_logps": r})
        return rows

    def load(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Fill the table from rows written by :meth:`precompute`."""
        for row in rows:
            self._table[row["id"]] = (row["chosen_logps"], row["rejected_logps"])

    def __call__(self, items: Sequence[Item]) -> tuple[Tensor, Tensor]:
        if not self._table:
            return self._compute(items)
        missing = [it.id for it in items if it.id not in self._table]
        if missing:
            raise KeyError(f"no cached reference log-probs for pairs {missing[:5]}")
        vals = torch.tensor(
            [self._table[it.id] for it in items], dtype=torch.float32, device=self._device
        )  # (B, 2)
        return vals[:, 0], vals[:, 1]
