"""Scoring (prompt, response) texts with a reward-model checkpoint: the one load-and-score path.

Used by PPO's reward models (re-exported as :class:`alignflow.rollout.RewardModelScorer`), the RM recipe's
tests, the quickstart's evaluation and data curation's reward-model filters. Loading, the ensemble file and
the arithmetic over members are :mod:`alignflow.models.reward`'s; this module adds the text formatting, which
needs the sequence encoder of :mod:`alignflow.data.encode` (a higher layer than ``models``, so it lives here).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from alignflow.data.encode import SequenceEncoder, TruncationCounter, model_kwargs, pad_batch
from alignflow.models.reward import ensemble_scores, load_reward_models


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
