"""Per-head reward sources (rollout/rewards.py): a function returning {head: [...]}, reward-model ensembles."""

from __future__ import annotations

import sys

import pytest
import torch

from alignflow.errors import ConfigError
from alignflow.rollout import EnsembleHeadScorer, function_head_scorer

HERE = __name__  # reward functions below are imported by "module:function", as reward.fn names them


def two_heads(prompts: list[str], responses: list[str]) -> dict[str, list[float]]:
    return {"a": [0.5 if "1" in r else 0.0 for r in responses], "b": [float(len(r)) for r in responses]}


class FakeMember:
    """A stand-in RewardModelScorer: fixed (mean (B, H), std (B, H)) per call."""

    def __init__(
        self, heads: list[str], mean: list[list[float]], std: list[list[float]], path: str = "m"
    ) -> None:
        self.heads, self.path = heads, path
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)

    def score_heads(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.std


def test_function_head_scorer_list_is_overall_mapping_gives_heads():
    scores, heads = function_head_scorer("alignflow.rollout.toy:digit_fraction")(["p", "p"], ["12ab", ""])
    assert heads == ["overall"]
    torch.testing.assert_close(scores, torch.tensor([[0.5], [0.0]]))
    scores, heads = function_head_scorer(f"{HERE}:two_heads")(["p", "p"], ["ab12", "AB"])
    assert heads == ["a", "b"]  # the mapping's order
    torch.testing.assert_close(scores, torch.tensor([[0.5, 4.0], [0.0, 2.0]]))  # (B, H)


def test_function_head_scorer_checks_every_head_and_stable_keys(monkeypatch):
    calls = iter([{"a": [1.0, 2.0]}, {"a": [1.0, 2.0], "b": [0.0, 0.0]}])
    monkeypatch.setattr(sys.modules[HERE], "changing", lambda p, r: next(calls), raising=False)
    score = function_head_scorer(f"{HERE}:changing")
    score(["p", "p"], ["x", "y"])
    with pytest.raises(ValueError, match=r"returned heads \['a', 'b'\], but earlier calls returned \['a'\]"):
        score(["p", "p"], ["x", "y"])
    monkeypatch.setattr(sys.modules[HERE], "bad", lambda p, r: {"a": [1.0, float("nan")]}, raising=False)
    with pytest.raises(ValueError, match="head 'a' returned non-finite rewards at rows \\[1\\]"):
        function_head_scorer(f"{HERE}:bad")(["p", "p"], ["x", "y"])
    monkeypatch.setattr(sys.modules[HERE], "short", lambda p, r: {"a": [1.0]}, raising=False)
    with pytest.raises(ValueError, match="head 'a' returned \\(1,\\) values for 2 responses"):
        function_head_scorer(f"{HERE}:short")(["p", "p"], ["x", "y"])


def test_ensemble_head_scorer_conservative_per_head():
    heads = ["overall", "acc"]
    one = FakeMember(heads, [[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [0.0, 1.0]])
    scores, got = EnsembleHeadScorer([one], k=2.0)(["p", "q"], ["x", "y"])
    assert got == heads
    torch.testing.assert_close(scores, torch.tensor([[0.0, 2.0], [3.0, 2.0]]))  # its own spread, per head
    two = FakeMember(heads, [[3.0, 2.0], [3.0, 6.0]], [[9.0, 9.0], [9.0, 9.0]])
    scores, _ = EnsembleHeadScorer([one, two], k=1.0)(["p", "q"], ["x", "y"])
    # across members: means [[2, 2], [3, 5]], unbiased stds [[sqrt 2, 0], [0, sqrt 2]]; members' own std unused
    r2 = 2**0.5
    torch.testing.assert_close(scores, torch.tensor([[2.0 - r2, 2.0], [3.0, 5.0 - r2]]))
    with pytest.raises(ConfigError, match=r"has heads \['overall'\] but m has \['overall', 'acc'\]"):
        EnsembleHeadScorer([one, FakeMember(["overall"], [[0.0]], [[0.0]], path="other")])
