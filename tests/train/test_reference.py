"""train/reference.py: reference log-probs precomputed once and looked up by pair id, or computed on demand."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from alignflow.train.logprobs import PairLogps
from alignflow.train.reference import ReferenceLogps, cache_key, reference_forward


@dataclass
class _Item:
    id: str
    value: float


def _compute(calls: list[list[str]]):
    def compute(items):
        calls.append([it.id for it in items])
        v = torch.tensor([it.value for it in items])
        return v, -v

    return compute


def test_precomputed_table_answers_batches_in_any_order_without_running_the_reference() -> None:
    calls: list[list[str]] = []
    ref = ReferenceLogps(_compute(calls), torch.device("cpu"))
    items = [_Item(f"p{i}", float(i)) for i in range(5)]
    assert not ref.precomputed
    rows = ref.precompute(items, batch_size=2)
    assert calls == [["p0", "p1"], ["p2", "p3"], ["p4"]] and ref.precomputed
    assert rows[3] == {"id": "p3", "chosen_logps": 3.0, "rejected_logps": -3.0}
    chosen, rejected = ref([items[4], items[1]])
    assert (
        chosen.tolist() == [4.0, 1.0] and rejected.tolist() == [-4.0, -1.0] and chosen.dtype == torch.float32
    )
    assert len(calls) == 3  # answered from the table
    with pytest.raises(KeyError, match="'q9'"):
        ref([_Item("q9", 0.0)])

    reloaded = ReferenceLogps(_compute(calls), torch.device("cpu"))
    reloaded.load(rows)
    assert reloaded([items[2]])[0].tolist() == [2.0] and len(calls) == 3


def test_without_a_table_every_batch_runs_the_reference() -> None:
    calls: list[list[str]] = []
    ref = ReferenceLogps(_compute(calls), torch.device("cpu"))
    ref([_Item("a", 1.0)])
    ref([_Item("a", 1.0)])
    assert calls == [["a"], ["a"]]


def test_reference_forward_runs_in_eval_mode_without_grad_and_restores_the_mode() -> None:
    model = torch.nn.Linear(2, 1)
    seen = {}

    def forward(m, items):
        seen["training"] = m.training
        out = m(torch.ones(len(items), 2)).squeeze(-1)
        seen["grad"] = out.requires_grad
        n = torch.ones(len(items))
        return PairLogps(out, out, out, out, n, n, out.mean(), out.mean(), out.mean())

    logps = reference_forward(torch.nn.Linear(2, 1), model, forward)
    model.train()
    chosen, rejected = logps([0, 1, 2])
    assert chosen.shape == rejected.shape == (3,)
    assert seen == {"training": False, "grad": False} and model.training


def test_cache_key_ignores_key_order_and_sees_every_value() -> None:
    a = {"pairs": "x", "max_length": 64}
    assert cache_key(a) == cache_key({"max_length": 64, "pairs": "x"})
    assert cache_key(a) != cache_key({"pairs": "x", "max_length": 65})
