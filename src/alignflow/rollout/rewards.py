"""Reward sources for on-policy training: a Python function by import path, or reward model(s).

Both give a callable ``(prompts: list[str], responses: list[str]) -> Tensor (B,)``. A reward-model
ensemble returns the conservative score ``mean - k * std`` over its members (Coste et al. 2024, "Reward Model
Ensembles Help Mitigate Overoptimization", the "uncertainty-weighted optimisation" objective), which with
``k = 0`` is the plain mean.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignflow.errors import ConfigError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


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


class RewardModelScorer:
    """Scores ``prompt + response`` with the reward model(s) in one checkpoint directory.

    A folder written by ``alignflow rm`` (it holds ``ensemble.json``) is loaded with
    ``alignflow.recipes.reward.load_reward_scorer`` (its prompt formatting; an ensemble of K members gives
    their mean and std). Any other directory is taken as one Hugging Face sequence-classification model
    (:func:`alignflow.models.load_reward_model`) scored on the concatenated text, std 0.

    ``scorer(prompts, responses) -> (mean (B,), std (B,))``.
    """

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32, max_length: int = 1024) -> None:
        self.path = path
        self._external: Callable[[list[str], list[str]], Any] | None = None
        if (Path(path) / "ensemble.json").is_file():
            from alignflow.recipes.reward import load_reward_scorer

            self._external = load_reward_scorer(path, device=device)
            return
        from alignflow.models import load_reward_model, load_tokenizer

        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.model = load_reward_model(path, device=device, pad_token_id=self.tokenizer.pad_token_id).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> tuple[Tensor, Tensor]:
        if self._external is not None:
            mean, std = self._external(prompts, responses)
            return mean.float().flatten(), std.float().flatten()
        scores = []
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            ).to(self.device)
            scores.append(self.model(**enc).logits[:, 0].float().cpu())
        mean = torch.cat(scores)
        return mean, torch.zeros_like(mean)


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
