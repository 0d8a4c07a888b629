"""Reward sources for on-policy training: a Python function by import path, or reward model(s).

Both give a callable ``(prompts: list[str], responses: list[str]) -> Tensor (B,)``. :class:`RewardModelScorer`
(:func:`load_reward_scorer`) is the one text scorer of a reward-model checkpoint, an ``alignflow rm``
ensemble or a plain HF folder, used by PPO, the quickstart and the tests; it formats text here (the encoder
lives in :mod:`alignflow.data`) and leaves loading and the ensemble format to :mod:`alignflow.models.reward`.
:class:`EnsembleScorer` returns the conservative score ``mean - k * std`` over its members (Coste et al.
2024, "Reward Model Ensembles Help Mitigate Overoptimization", the "uncertainty-weighted optimisation"
objective), which with ``k = 0`` is the plain mean.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alignflow.data.encode import SequenceEncoder, TruncationCounter, model_kwargs, pad_batch
from alignflow.errors import ConfigError
from alignflow.models.reward import ensemble_scores, load_reward_models

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
    """Scores (prompt, response) texts with a reward-model checkpoint: the one load-and-score path.

    ``path`` is an ``alignflow rm`` folder (its members, and text formatted as the recipe did: the
    :class:`~alignflow.data.encode.SequenceEncoder` with the lengths saved in ``ensemble.json``) or one HF
    sequence-classification folder (``prompt + response`` as one string, cut at ``max_length`` tokens).
    Loading and the ensemble arithmetic are :mod:`alignflow.models.reward`'s.

    ``scorer(prompts, responses) -> (mean (N,), std (N,))``, float32: the members' mean reward and their
    population std (0 for a single model).
    """

    def __init__(
        self, path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int = 1024
    ) -> None:
        self.path = str(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        loaded = load_reward_models(path, device=device)
        self.tokenizer, self.members = loaded.tokenizer, loaded.members
        self.encoder: SequenceEncoder | None = None
        if loaded.spec is not None:
            self.encoder = SequenceEncoder(
                self.tokenizer,
                loaded.spec["max_length"],
                loaded.spec.get("max_prompt_length"),
                encoder=loaded.spec["backbone"] == "encoder",
                counter=TruncationCounter("scored responses"),
            )

    def _batches(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, Tensor]]:
        """Model inputs of consecutive chunks of ``batch_size`` texts, built once and shared by the members."""
        n, size = len(prompts), self.batch_size
        if self.encoder is not None:
            encoded = [self.encoder.encode(p, c) for p, c in zip(prompts, responses, strict=True)]
            pad = self.tokenizer.pad_token_id
            return [
                model_kwargs(pad_batch(encoded[i : i + size], pad, self.device)) for i in range(0, n, size)
            ]
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        return [
            dict(
                self.tokenizer(
                    texts[i : i + size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                ).to(self.device)
            )
            for i in range(0, n, size)
        ]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[Tensor, Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return ensemble_scores(self.members, self._batches(prompts, responses))


def load_reward_scorer(
    path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int = 1024
) -> RewardModelScorer:
    """Load the reward model(s) in ``path`` (the ``checkpoint_dir`` of ``alignflow rm``, or one HF folder).

    Returns a callable ``scorer(prompts, responses) -> (mean (N,), std (N,))``.
    """
    return RewardModelScorer(path, device=device, batch_size=batch_size, max_length=max_length)


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
