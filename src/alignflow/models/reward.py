"""Reward models: score preference pairs while training, save and load an ensemble, score texts with it.

One load-and-score path for every user (the RM recipe's held-out scores, PPO's reward, the quickstart's
evaluation): :func:`load_reward_scorer` opens either a folder written by ``alignflow rm`` (K member folders
and ``ensemble.json``) or a single Hugging Face sequence-classification folder, and returns a
:class:`RewardScorer` whose ``scorer(prompts, responses)`` gives ``(mean (N,), std (N,))``.

Ensemble file format (``ensemble.json``, written by :func:`write_ensemble`, read by :func:`read_ensemble`)::

    {"format_version": 1, "members": ["member-0", ...], "backbone": "causal" | "encoder",
     "max_length": int, "max_prompt_length": int | null, "eval": {metric: value}}

Each member folder is a standalone HF model (a LoRA member is merged before it is written), and the scorer
formats text exactly as the recipe did (:class:`~alignflow.data.encode.SequenceEncoder` with the saved
lengths). A plain HF folder is scored on ``prompt + response`` as one string, truncated to ``max_length``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from alignflow.data.encode import (
    EncodedPair,
    SequenceEncoder,
    TruncationCounter,
    model_kwargs,
    pack_pairs,
    pad_batch,
)
from alignflow.errors import DataFormatError
from alignflow.models.loading import load_reward_model, load_tokenizer
from alignflow.train.logprobs import splittable, tree_hidden

ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------------------------------
# training-time helpers


def freeze_bottom(model: Any, n_layers: int) -> None:
    """Freeze the input embeddings and the first ``n_layers`` transformer blocks of a HF encoder or decoder."""
    if n_layers <= 0:
        return
    base = model.base_model
    layers = getattr(getattr(base, "encoder", None), "layer", None) or getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"model.freeze_layers: cannot find the transformer layers of {type(model).__name__}")
    if n_layers > len(layers):
        raise ValueError(f"model.freeze_layers={n_layers} but the model has {len(layers)} layers")
    getattr(base, "embeddings", base.get_input_embeddings()).requires_grad_(False)
    for layer in layers[:n_layers]:
        layer.requires_grad_(False)


def can_pack(model: Any, encoder: bool) -> bool:
    """Whether pairs can go through ``model`` as prefix trees: a causal trunk with a separable ``score`` head."""
    return not encoder and splittable(model, "score")


def pair_scores(
    model: Any, items: Sequence[EncodedPair], pad_id: int, device: torch.device, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of chosen and rejected responses, ``(B,)`` each, in one forward.

    Packed: each pair is a prefix tree (prompt once, then chosen and rejected, which never see each other)
    and the score head runs on each response's last token, as the padded path's last-non-pad pooling does.
    """
    if packed:
        tb = pack_pairs(items, pad_id, device)
        hidden, head = tree_hidden(model, tb, head="score")
        scores = head(hidden[tb.end_rows, tb.end_cols]).squeeze(-1)  # (2B,) chosen, rejected, chosen, ...
        return scores[0::2], scores[1::2]
    batch = pad_batch([p.chosen for p in items] + [p.rejected for p in items], pad_id, device)
    scores = model(**model_kwargs(batch)).logits.squeeze(-1)  # (2B,)
    return scores[: len(items)], scores[len(items) :]


def score_pairs(
    model: Any,
    items: Sequence[EncodedPair],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected responses, float32 ``(N,)`` each on the CPU, in eval mode without gradients."""
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            c, r = pair_scores(model, items[i : i + batch_size], pad_id, device, packed)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    model.train()
    return torch.cat(chosen), torch.cat(rejected)


# ---------------------------------------------------------------------------------------------------------------------
# the ensemble file


def write_ensemble(
    root: Path,
    members: Sequence[str],
    backbone: str,
    max_length: int,
    max_prompt_length: int | None,
    eval_metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """Write ``root/ensemble.json`` beside the member folders it names; returns the manifest written."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "members": list(members),
        "backbone": backbone,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "eval": dict(eval_metrics),
    }
    (root / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_ensemble(root: Path) -> dict[str, Any]:
    """The manifest of an ``alignflow rm`` folder; the error names the file when it is not one."""
    spec_file = root / ENSEMBLE_FILE
    if not spec_file.is_file():
        raise DataFormatError(
            f"{spec_file} is missing: {root} is not a reward-model checkpoint from `alignflow rm`"
        )
    spec = json.loads(spec_file.read_text())
    for key in ("members", "backbone", "max_length"):
        if key not in spec:
            raise DataFormatError(f"{spec_file}: missing field {key!r}")
    return spec


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------------------
# scoring texts


class RewardScorer:
    """Scores (prompt, response) texts with every member of a reward model or ensemble.

    ``scorer(prompts, responses)`` returns ``(mean, std)``, each a float32 tensor ``(N,)``: the mean of the
    K members' scalar rewards and their population standard deviation (0 for a single model).

    ``path`` is an ``alignflow rm`` folder (members, text formatting and lengths from ``ensemble.json``) or
    one HF sequence-classification folder (``prompt + response`` as one string, cut at ``max_length``).
    """

    def __init__(
        self, path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int = 1024
    ) -> None:
        root = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.encoder: SequenceEncoder | None = None
        if is_ensemble(root):
            spec = read_ensemble(root)
            self.tokenizer = load_tokenizer(root / spec["members"][0])
            self.members = [
                load_reward_model(
                    root / m, dtype="float32", device=device, pad_token_id=self.tokenizer.pad_token_id
                )
                for m in spec["members"]
            ]
            self.encoder = SequenceEncoder(
                self.tokenizer,
                spec["max_length"],
                spec.get("max_prompt_length"),
                encoder=spec["backbone"] == "encoder",
                counter=TruncationCounter("scored responses"),
            )
        else:
            self.tokenizer = load_tokenizer(root, padding_side="right")
            self.members = [load_reward_model(root, device=device, pad_token_id=self.tokenizer.pad_token_id)]
        for model in self.members:
            model.eval().requires_grad_(False)

    def _batches(self, prompts: Sequence[str], responses: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        """Model inputs of consecutive chunks of ``batch_size`` texts, built once and shared by the members."""
        if self.encoder is not None:
            encoded = [self.encoder.encode(p, c) for p, c in zip(prompts, responses, strict=True)]
            return [
                model_kwargs(
                    pad_batch(encoded[i : i + self.batch_size], self.tokenizer.pad_token_id, self.device)
                )
                for i in range(0, len(encoded), self.batch_size)
            ]
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        return [
            dict(
                self.tokenizer(
                    texts[i : i + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                ).to(self.device)
            )
            for i in range(0, len(texts), self.batch_size)
        ]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        batches = self._batches(prompts, responses)
        per_member = [
            torch.cat([model(**b).logits[:, 0].float().cpu() for b in batches]) if batches else torch.zeros(0)
            for model in self.members
        ]
        stack = torch.stack(per_member)  # (K, N)
        std = stack.std(0, unbiased=False) if len(self.members) > 1 else torch.zeros_like(stack[0])
        return stack.mean(0), std


def load_reward_scorer(
    path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int = 1024
) -> RewardScorer:
    """Load the reward model(s) in ``path`` (an ``alignflow rm`` ``checkpoint_dir``, or one HF folder).

    Returns a callable ``scorer(prompts, responses) -> (mean (N,), std (N,))``.
    """
    return RewardScorer(path, device=device, batch_size=batch_size, max_length=max_length)
