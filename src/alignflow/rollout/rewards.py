"""Reward sources for on-policy training: a Python function by import path, or reward model(s).

Both give a callable ``(prompts: list[str], responses: list[str]) -> Tensor (B,)``, and per head
``(prompts, responses) -> (scores (B, H), heads)`` (:data:`HeadScorer`): a function may return one list of
floats (the one head ``overall``) or ``{head: list[float]}``; a reward model has the heads its checkpoint
records (:attr:`RewardModelScorer.heads`); PPO combines them with
:func:`~alignflow.train.constraints.combine_heads`. A reward-model checkpoint
(an ``alignflow rm`` ensemble or a plain HF folder) is scored by the one text scorer,
:class:`~alignflow.models.reward.RewardModelScorer`, re-exported here because PPO configures it as a
reward source. :class:`EnsembleScorer` returns the conservative score ``mean - k * std`` over its members
(Coste et al. 2024, "Reward Model Ensembles Help Mitigate Overoptimization", the "uncertainty-weighted
optimisation" objective), which with ``k = 0`` is the plain mean. :class:`AggregateHeadScorer` pools every
member of every reward model and aggregates them per ``reward.aggregate``: ``mean``, ``min`` (worst-case
optimisation) or ``mean_minus_std`` (uncertainty-weighted, population std over the pooled members), per head.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from alignflow.errors import ConfigError
from alignflow.models.reward import OVERALL, RewardModelScorer, load_reward_scorer

RewardFn = Callable[[list[str], list[str]], Sequence[float] | Mapping[str, Sequence[float]]]
HeadScores = tuple[Tensor, list[str]]  # (scores (B, H) float32, the H head names in column order)
HeadScorer = Callable[[list[str], list[str]], HeadScores]
__all__ = [
    "AGGREGATES",
    "OVERALL",
    "AggregateHeadScorer",
    "EnsembleHeadScorer",
    "EnsembleScorer",
    "HeadScorer",
    "HeadScores",
    "RewardModelScorer",
    "function_head_scorer",
    "function_scorer",
    "aggregate_members",
    "import_callable",
    "load_reward_scorer",
]
AGGREGATES = ("mean", "min", "mean_minus_std")


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


def _checked_rewards(values: Any, n: int, what: str) -> Tensor:
    """``values`` as a float32 ``(n,)`` tensor; errors name ``what`` and the bad shape or rows."""
    out = torch.as_tensor(list(values), dtype=torch.float32)
    if out.shape != (n,):
        raise ValueError(f"{what} returned {tuple(out.shape)} values for {n} responses")
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).nonzero().flatten().tolist()[:5]
        raise ValueError(f"{what} returned non-finite rewards at rows {bad}")
    return out


def function_scorer(spec: str, field: str = "reward.fn") -> Callable[[list[str], list[str]], Tensor]:
    """Wrap a rule-based reward ``fn(prompts, responses) -> list[float]`` and check what it returns."""
    fn = import_callable(spec, field)

    def score(prompts: list[str], responses: list[str]) -> Tensor:
        return _checked_rewards(fn(list(prompts), list(responses)), len(responses), f"{field} {spec!r}")

    return score


def function_head_scorer(spec: str, field: str = "reward.fn") -> HeadScorer:
    """Wrap ``fn(prompts, responses) -> list[float] | {head: list[float]}`` as a per-head scorer.

    A list is the one head ``overall``; a mapping gives one head per key, in the mapping's order. Every call
    must return the same heads. Returns ``(scores (B, H), heads)``.
    """
    fn = import_callable(spec, field)
    what = f"{field} {spec!r}"
    first: list[str] = []

    def score(prompts: list[str], responses: list[str]) -> HeadScores:
        values = fn(list(prompts), list(responses))
        n = len(responses)
        if isinstance(values, Mapping):
            heads = [str(h) for h in values]
            if not heads:
                raise ValueError(f"{what} returned an empty mapping; expected {{head: list[float]}}")
            out = torch.stack([_checked_rewards(values[h], n, f"{what} head {h!r}") for h in values], 1)
        else:
            heads, out = [OVERALL], _checked_rewards(values, n, what).unsqueeze(1)
        if not first:
            first.extend(heads)
        elif heads != first:
            raise ValueError(f"{what} returned heads {heads}, but earlier calls returned {first}")
        return out, heads  # (B, H)

    return score


def conservative(scored: Sequence[tuple[Tensor, Tensor]], k: float) -> Tensor:
    """``mean - k * std`` from the members' ``(mean, std)`` (any equal shapes): one member's own mean and std
    (an ``alignflow rm`` ensemble's spread), or for several the mean and unbiased std of their means."""
    if len(scored) == 1:
        mean, std = scored[0]
    else:
        stacked = torch.stack([m for m, _ in scored])  # (M, ...)
        mean, std = stacked.mean(dim=0), stacked.std(dim=0)
    return mean - k * std


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
        return conservative([m(prompts, responses) for m in self.members], self.k)


class EnsembleHeadScorer:
    """Per-head conservative reward ``mean - k * std`` (as :class:`EnsembleScorer`, one head at a time).

    Members are :class:`RewardModelScorer` s (``heads``, ``score_heads``); all must have the same heads. One
    member: its own per-head mean and std; several: the mean and unbiased std across the members' means.
    ``scorer(prompts, responses) -> (scores (B, H), heads)``.
    """

    def __init__(self, members: Sequence[Any], k: float = 0.0) -> None:
        if not members:
            raise ValueError("EnsembleHeadScorer needs at least one member")
        self.members = list(members)
        self.k = k
        self.heads = list(self.members[0].heads)
        for m in self.members[1:]:
            if list(m.heads) != self.heads:
                raise ConfigError(
                    f"reward.models: {getattr(m, 'path', m)} has heads {list(m.heads)} but "
                    f"{getattr(self.members[0], 'path', self.members[0])} has {self.heads}; an ensemble's "
                    "members must share their heads"
                )

    def __call__(self, prompts: list[str], responses: list[str]) -> HeadScores:
        scored = [m.score_heads(prompts, responses) for m in self.members]  # (B, H) mean and std each
        if len(scored) == 1:
            spread = scored[0][1]
        else:
            spread = torch.stack([mean for mean, _ in scored]).std(dim=0)
        # the members' disagreement on the first head, for PPO's reward/ensemble_std (an alert reads it)
        self.last_std = float(spread[:, 0].mean()) if spread.numel() else None
        return conservative(scored, self.k), list(self.heads)


def aggregate_members(stack: Tensor, how: str, k: float = 0.0) -> Tensor:
    """Members' scores ``(M, ...)`` to one ``(...)``: ``mean``; ``min`` (worst case); ``mean_minus_std`` with the
    population std over the members (0 for one member), as Coste et al. 2024 define their objectives."""
    if how == "mean":
        return stack.mean(dim=0)
    if how == "min":
        return stack.min(dim=0).values
    if how == "mean_minus_std":
        std = stack.std(dim=0, unbiased=False) if stack.shape[0] > 1 else torch.zeros_like(stack[0])
        return stack.mean(dim=0) - k * std
    raise ValueError(f"unknown aggregate {how!r}; expected one of {AGGREGATES}")


class AggregateHeadScorer:
    """Per-head ``reward.aggregate`` over every member of the given :class:`RewardModelScorer` s, pooled.

    An ``alignflow rm`` folder of K members contributes K members (each divided by its folder's temperature);
    all must share their heads. ``scorer(prompts, responses) -> (scores (B, H), heads)``;
    ``scorer.members_scores(prompts, responses) -> (M, B, H)`` gives the pooled members' scores themselves.
    """

    def __init__(self, scorers: Sequence[Any], how: str, k: float = 0.0) -> None:
        if not scorers:
            raise ValueError("AggregateHeadScorer needs at least one reward model")
        if how not in AGGREGATES:
            raise ValueError(f"unknown aggregate {how!r}; expected one of {AGGREGATES}")
        self.scorers, self.how, self.k = list(scorers), how, k
        self.heads = list(self.scorers[0].heads)
        for s in self.scorers[1:]:
            if list(s.heads) != self.heads:
                raise ConfigError(
                    f"reward.models: {s.path} has heads {list(s.heads)} but {self.scorers[0].path} has "
                    f"{self.heads}; an ensemble's members must share their heads"
                )

    @torch.no_grad()
    def members_scores(self, prompts: list[str], responses: list[str]) -> Tensor:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        n_heads, parts = len(self.heads), []
        for s in self.scorers:
            # The scorer's own inputs (its text format and lengths), built once and shared by its members.
            batches = s._batches(prompts, responses)
            for model in s.members:
                logits = [model(**b).logits[:, :n_heads].float().cpu() for b in batches]
                parts.append((torch.cat(logits) if logits else torch.zeros(0, n_heads)) / s.temperature)
        return torch.stack(parts)  # (M, B, H)

    def __call__(self, prompts: list[str], responses: list[str]) -> HeadScores:
        stack = self.members_scores(prompts, responses)  # (M, B, H)
        # the members' disagreement on the first head (population std), for PPO's reward/ensemble_std
        self.last_std = (
            float(stack[:, :, 0].std(dim=0, unbiased=False).mean())
            if stack.shape[0] > 1 and stack.numel()
            else 0.0
        )
        return aggregate_members(stack, self.how, self.k), list(self.heads)
