"""Reward-head combination and Lagrange multipliers (train/constraints.py), expected values derived by hand."""

from __future__ import annotations

import json

import pytest
import torch

from alignflow.train.constraints import LagrangeMultipliers, combine_heads, parse_constraint

HEADS = ["a", "b", "c"]
SCORES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # (B=2, H=3)


def test_combine_heads_by_hand():
    """weights a=1, b=1; multiplier c=2; total weight 4.

    row 0: (1*1 + 1*2 + 2*3) / 4 = 9 / 4 = 2.25
    row 1: (1*4 + 1*5 + 2*6) / 4 = 21 / 4 = 5.25
    """
    out = combine_heads(SCORES, HEADS, {"a": 1.0, "b": 1.0}, {"c": 2.0})
    assert out.shape == (2,)
    torch.testing.assert_close(out, torch.tensor([2.25, 5.25]))


def test_combine_heads_head_weighted_and_constrained():
    """weight a=2 and multiplier a=1, c=1 (b unused): total 4.

    row 0: (3*1 + 1*3) / 4 = 1.5;  row 1: (3*4 + 1*6) / 4 = 4.5
    """
    out = combine_heads(SCORES, HEADS, {"a": 2.0}, {"a": 1.0, "c": 1.0})
    torch.testing.assert_close(out, torch.tensor([1.5, 4.5]))
    # multipliers at 0: the plain weighted mean of the weighted heads, whatever the weights' scale
    torch.testing.assert_close(
        combine_heads(SCORES, HEADS, {"a": 3.0, "c": 1.0}, {"b": 0.0}), torch.tensor([1.5, 4.5])
    )


def test_combine_heads_errors():
    with pytest.raises(ValueError, match="unknown head 'z'"):
        combine_heads(SCORES, HEADS, {"z": 1.0}, {})
    with pytest.raises(ValueError, match="at least one weight must be positive"):
        combine_heads(SCORES, HEADS, {"a": 0.0}, {"b": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        combine_heads(SCORES, HEADS, {"a": 1.0}, {"b": -0.5})
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        combine_heads(SCORES[:, :2], HEADS, {"a": 1.0}, {})


def test_multiplier_rises_while_violated_is_capped_then_relaxes_to_zero():
    """threshold 0.5, lr 0.5, cap 0.9. Mean 0.0 (violation 0.5): +0.25 a step, 0.25, 0.5, 0.75, then the cap
    0.9 twice. Mean 1.0 (slack 0.5): -0.25 a step, 0.65, 0.4, 0.15, then 0 (never below) twice."""
    lm = LagrangeMultipliers({"b": 0.5}, lr=0.5, init=0.0, max_value=0.9)
    assert lm.values == {"b": 0.0}
    rising = [lm.update({"b": 0.0})["b"] for _ in range(5)]
    assert rising == pytest.approx([0.25, 0.5, 0.75, 0.9, 0.9])
    falling = [lm.update({"b": 1.0})["b"] for _ in range(5)]
    assert falling == pytest.approx([0.65, 0.4, 0.15, 0.0, 0.0])
    assert min(falling) == 0.0  # projected: exactly 0, not a small negative


def test_multiplier_at_the_threshold_stays_and_init_is_used():
    lm = LagrangeMultipliers({"x": 0.2, "y": -1.0}, lr=0.1, init=2.0, max_value=10.0)
    lm.update({"x": 0.2, "y": -1.0})  # both exactly met: no change
    assert lm.values == {"x": 2.0, "y": 2.0}
    lm.update({"x": -0.8, "y": 1.0})  # x violated by 1 -> +0.1; y slack 2 -> -0.2
    assert lm.values == pytest.approx({"x": 2.1, "y": 1.8})
    with pytest.raises(ValueError, match="no batch mean"):
        lm.update({"x": 0.0})
    with pytest.raises(ValueError, match="init"):
        LagrangeMultipliers({"x": 0.0}, lr=0.1, init=11.0, max_value=10.0)


def test_multiplier_state_round_trip_is_exact():
    a = LagrangeMultipliers({"b": 0.37}, lr=0.113, init=0.05, max_value=3.0)
    for mean in (0.1, 0.2, 0.9, 0.05):
        a.update({"b": mean})
    b = LagrangeMultipliers({"b": 0.0}, lr=0.113, init=0.0, max_value=3.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # a checkpoint's data state is JSON
    assert b.state_dict() == a.state_dict()
    for mean in (0.3, 0.01):
        assert a.update({"b": mean}) == b.update({"b": mean})  # bit-equal floats, not approx
    with pytest.raises(ValueError, match="saved constraints"):
        LagrangeMultipliers({"c": 0.0}, lr=0.1).load_state_dict(a.state_dict())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(">= reference", None), (">=reference", None), (">= 0.5", 0.5), (" >= -2 ", -2.0), (">= 1e-3", 1e-3)],
)
def test_parse_constraint(spec, expected):
    assert parse_constraint(spec) == expected


@pytest.mark.parametrize("spec", ["<= 0.5", "0.5", ">= lots", ">= nan", ">= inf", "> 0.5", ">= reference 2"])
def test_parse_constraint_rejects(spec):
    with pytest.raises(ValueError, match="expected '>= reference' or '>= <number>'"):
        parse_constraint(spec)
