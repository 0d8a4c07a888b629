"""Reward sources for on-policy training: a Python function by import path, or reward model(s).

Both give a callable ``(prompts: list[str], responses: list[str]) -> Tensor (B,)``. A reward-model checkpoint
(an ``alignflow rm`` ensemble or a plain HF folder) is scored by the one text scorer,
:class:`~alignflow.models.reward.RewardModelScorer`, re-exported here because PPO configures it as a
reward source. :class:`EnsembleScorer` returns the conservative score ``mean - k * std`` over its members
(Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization", the "uncertainty-weighted
optimisation" objective), which with ``k = 0`` is the plain mean.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from alignflow.errors import ConfigError
from alignflow.models.reward import RewardModelScorer, load_reward_scorer

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
__all__ = ["EnsembleScorer", "RewardModelScorer", "function_scorer", "import_callable", "load_reward_scorer"]


def import_callable(spec: str, field: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``; errors name the config field and what is wrong."""
    if ":" not in spec:
        raise ConfigError(f"{field}: expected 'package.module:function', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ConfigError(f"{field}: cannot import module {mod_name!r}: {exc}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{field}: module {mod_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{field}: {spec!r} is not callable")
    return fn  # type: ignore[return-value]


def function_scorer(spec: str, field: str = "reward.fn") -> Callable[[list[str], list[str]], Tensor]:
    """Wrap a rule-based reward ``fn(prompts, responses) -> list[float]`` and check what it returns."""
    fn = import_callable(spec, field)

    def score(prompts: list[str], responses: list[str]) -> Tensor:
        values = fn(list(prompts), list(responses))
        out = torch.as_tensor(list(values), dtype=torch.float32)
        if out.shape != (len(responses),):
            raise ValueError(
                f"{field} {spec!r} returned {tuple(out.shape)} values for {len(responses)} responses"
            )
        if not torch.isfinite(out).all():
            bad = (~torch.isfinite(out)).nonzero().flatten().tolist()[:5]
            raise ValueError(f"{field} {spec!r} returned non-finite rewards at rows {bad}")
        return out

    return score


class EnsembleScorer:
    """Conservative reward ``mean - k * std`` (Coste et al. 2024) from one or several :class:`RewardModelScorer`.

    One member: its own mean and std (an ``alignflow rm`` ensemble's spread, 0 for a single model). Several
    members: the mean and the unbiased std across the members' mean scores.
    """

    def __init__(
        self, members: Sequence[Callable[[list[str], list[str]], tuple[Tensor, Tensor]]], k: float = 0.0
    ) -> None:
        if not members:
            raise ValueError("EnsembleScorer needs at least one member")
        self.members = list(members)
        self.k = k

    def __call__(self, prompts: list[str], responses: list[str]) -> Tensor:
        if len(self.members) == 1:
            mean, std = self.members[0](prompts, responses)
        else:
            stacked = torch.stack([m(prompts, responses)[0] for m in self.members])  # (M, B)
            mean, std = stacked.mean(dim=0), stacked.std(dim=0)
        return mean - self.k * std
