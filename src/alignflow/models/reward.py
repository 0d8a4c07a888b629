"""Reward models: the ensemble file format, loading a checkpoint or an ensemble, and scoring with its members.

A reward-model checkpoint is either a folder written by ``alignflow rm`` (K member folders and
``ensemble.json``) or a single Hugging Face sequence-classification folder. :func:`load_reward_models` opens
both; :func:`ensemble_scores` turns the members' scalar rewards on tokenised batches into ``(mean, std)``.
:class:`RewardModelScorer` (``load_reward_scorer``) turns (prompt, response) text into those batches with
the sequence encoder of :mod:`alignflow.data.encode` and scores them: the one load-and-score path for PPO,
the quickstart, data curation and the tests. Because it encodes text, this module sits above ``data`` in
``docs/architecture.md``'s layers (the rest of ``models`` sits below it).

Ensemble file format (``ensemble.json``, written by :func:`write_ensemble`, read by :func:`read_ensemble`)::

    {"format_version": 1, "members": ["member-0", ...], "backbone": "causal" | "encoder",
     "max_length": int, "max_prompt_length": int | null, "eval": {metric: value},
     "pooling": "last" | "cls" | "mean" | "response_mean", "keep_completion": bool, "temperature": float,
     "heads": ["overall", "accuracy", ...]}

Each member folder is a standalone HF model (a LoRA member is merged before it is written); ``backbone``, the
two lengths and ``keep_completion`` say how the recipe formatted text, so a scorer formats it the same way.
``pooling`` says which token states feed the linear head (:class:`PooledRewardModel`); ``temperature`` T is
the post-hoc temperature scaling (Guo et al. 2017, section 4.2) fitted on a calibration split: the scorer
returns rewards divided by T, so ``sigmoid(r(a) - r(b))`` is a calibrated preference probability. The last
three fields are optional (older files mean last/CLS pooling, the default truncation and T = 1). ``heads``
names the model's outputs in order (a multi-head reward model: one Bradley-Terry head per rated dimension on
a shared trunk, ``overall`` first); a file without it has the one head ``overall``. The temperature is fitted
on the overall head and divides every head.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alignflow.data.encode import SequenceEncoder, TruncationCounter, model_kwargs, pad_batch
from alignflow.errors import ConfigError, DataFormatError
from alignflow.models.loading import load_reward_model, load_tokenizer

ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1
POOLINGS = ("last", "cls", "mean", "response_mean")
OVERALL = "overall"

# ---------------------------------------------------------------------------------------------------------------------
# the ensemble file


def write_ensemble(
    root: Path,
    members: Sequence[str],
    backbone: str,
    max_length: int,
    max_prompt_length: int | None,
    eval_metrics: Mapping[str, Any],
    pooling: str | None = None,
    keep_completion: bool = False,
    temperature: float = 1.0,
    heads: Sequence[str] = (OVERALL,),
) -> dict[str, Any]:
    """Write ``root/ensemble.json`` beside the member folders it names; returns the manifest written.

    ``pooling`` defaults to the backbone's own head (``last`` token for causal, ``cls`` for encoders).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not heads or heads[0] != OVERALL or len(set(heads)) != len(heads):
        raise ValueError(f"heads must start with {OVERALL!r} and not repeat, got {list(heads)!r}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "members": list(members),
        "backbone": backbone,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "eval": dict(eval_metrics),
        "pooling": pooling or default_pooling(backbone == "encoder"),
        "keep_completion": keep_completion,
        "temperature": float(temperature),
        "heads": list(heads),
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
    heads = spec.setdefault("heads", [OVERALL])
    if not isinstance(heads, list) or not heads or heads[0] != OVERALL:
        raise DataFormatError(
            f"{spec_file}: field 'heads' must be a list starting with {OVERALL!r}, got {heads!r}"
        )
    return spec


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def default_pooling(encoder: bool) -> str:
    """The pooling of a backbone's own sequence-classification head: CLS for encoders, last token otherwise."""
    return "cls" if encoder else "last"


# ---------------------------------------------------------------------------------------------------------------------
# pooling


class PooledRewardModel(nn.Module):
    """A BERT-style sequence classifier whose linear head reads the mean of token states, not the CLS pooler.

    ``mean`` averages every attended token (sentence-transformers' pooling, which the packaged MiniLM was
    trained with); ``response_mean`` averages the response segment only (``token_type_ids == 1``: the
    response and its closing ``[SEP]``), where chosen and rejected differ. The wrapped model keeps its own
    parameters (``classifier`` and ``dropout`` are reused), so the member folder is the plain HF model and
    ``ensemble.json``'s ``pooling`` tells a loader to wrap it again.

    ``forward(input_ids (B, T), attention_mask (B, T), token_type_ids (B, T)) -> .logits (B, 1)``.
    """

    def __init__(self, model: nn.Module, pooling: str) -> None:
        super().__init__()
        if pooling not in ("mean", "response_mean"):
            raise ConfigError(f"PooledRewardModel pools 'mean' or 'response_mean', not {pooling!r}")
        if not isinstance(getattr(model, "classifier", None), nn.Linear):
            raise ConfigError(
                f"model.pooling={pooling!r} needs a BERT-style classifier head (a Linear 'classifier'); "
                f"{type(model).__name__} has none"
            )
        self.model = model
        self.pooling = pooling

    @property
    def base_model(self) -> nn.Module:
        return self.model.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
    ) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # (B, T, H)
        mask = attention_mask
        if self.pooling == "response_mean":
            if token_type_ids is None:
                raise ValueError("response_mean pooling needs token_type_ids (1 on the response)")
            mask = attention_mask * token_type_ids
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)
        return SequenceClassifierOutput(logits=self.model.classifier(self.model.dropout(pooled)))


def with_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """``model`` with the head reading ``pooling``'s states; ``last`` / ``cls`` is the model's own head."""
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return model if pooling in ("last", "cls") else PooledRewardModel(model, pooling)


def unwrap_pooling(model: nn.Module) -> nn.Module:
    """The HF model inside a :class:`PooledRewardModel` (what is saved as a member folder)."""
    return model.model if isinstance(model, PooledRewardModel) else model


# ---------------------------------------------------------------------------------------------------------------------
# loading and scoring


@dataclass
class RewardModels:
    """The members of a loaded reward-model checkpoint (one for a plain HF folder), frozen and in eval mode.

    ``spec`` is the ``ensemble.json`` manifest of an ``alignflow rm`` folder, ``None`` for a plain HF folder.
    """

    tokenizer: Any
    members: list[nn.Module]
    spec: dict[str, Any] | None

    @property
    def temperature(self) -> float:
        return float((self.spec or {}).get("temperature", 1.0))

    @property
    def heads(self) -> list[str]:
        return list((self.spec or {}).get("heads", [OVERALL]))


def load_reward_models(path: str | Path, device: str = "cpu") -> RewardModels:
    """Load an ``alignflow rm`` folder (every member, float32) or one HF sequence-classification folder."""
    root = Path(path)
    if is_ensemble(root):
        spec = read_ensemble(root)
        tokenizer = load_tokenizer(root / spec["members"][0])
        pooling = spec.get("pooling") or default_pooling(spec["backbone"] == "encoder")
        members = [
            with_pooling(
                load_reward_model(
                    root / m,
                    dtype="float32",
                    device=device,
                    pad_token_id=tokenizer.pad_token_id,
                    num_labels=len(spec["heads"]),
                ),
                pooling,
            )
            for m in spec["members"]
        ]
    else:
        spec = None
        tokenizer = load_tokenizer(root, padding_side="right")
        members = [load_reward_model(root, device=device, pad_token_id=tokenizer.pad_token_id)]
    for model in members:
        model.eval().requires_grad_(False)
    return RewardModels(tokenizer, members, spec)


@torch.no_grad()
def ensemble_head_scores(
    members: Sequence[nn.Module], batches: Iterable[Mapping[str, torch.Tensor]], n_heads: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over the members of every head's reward, float32 ``(N, H)`` each on the CPU.

    ``batches`` are model inputs (``input_ids``, ``attention_mask``, ...) of consecutive chunks of the N
    sequences; every member scores every batch. One member gives std 0.
    """
    batches = list(batches)
    per_member = [
        torch.cat([model(**b).logits[:, :n_heads].float().cpu() for b in batches])
        if batches
        else torch.zeros(0, n_heads)
        for model in members
    ]
    stack = torch.stack(per_member)  # (K, N, H)
    std = stack.std(0, unbiased=False) if len(members) > 1 else torch.zeros_like(stack[0])
    return stack.mean(0), std


def ensemble_scores(
    members: Sequence[nn.Module], batches: Iterable[Mapping[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ensemble_head_scores` of the first head (``overall``): ``(N,)`` mean and std."""
    mean, std = ensemble_head_scores(members, batches, 1)
    return mean[:, 0], std[:, 0]


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


# ---------------------------------------------------------------------------------------------------------------------
# scoring text


class RewardModelScorer:
    """Scores (prompt, response) texts with a reward-model checkpoint: the one load-and-score path.

    ``path`` is an ``alignflow rm`` folder (its members, and text formatted as the recipe did: the
    :class:`~alignflow.data.encode.SequenceEncoder` with the lengths saved in ``ensemble.json``) or one HF
    sequence-classification folder (``prompt + response`` as one string, cut at ``max_length`` tokens, 1024
    when unset). ``max_length`` given for an ``alignflow rm`` folder replaces the length it was trained with.
    Loading and the ensemble arithmetic are :mod:`alignflow.models.reward`'s.

    ``scorer(prompts, responses) -> (mean (N,), std (N,))``, float32: the members' mean reward and their
    population std (0 for a single model), both divided by the checkpoint's fitted ``temperature`` (1 when
    none was fitted), so a reward gap is a calibrated log-odds. That is the ``overall`` head; a multi-head
    checkpoint's every head is ``scorer.score_heads(prompts, responses) -> (mean (N, H), std (N, H))`` in the
    order of ``scorer.heads``.
    """

    def __init__(
        self, path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int | None = None
    ) -> None:
        self.path = str(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length or 1024
        loaded = load_reward_models(path, device=device)
        self.tokenizer, self.members = loaded.tokenizer, loaded.members
        self.spec, self.temperature = loaded.spec, loaded.temperature
        self.heads = loaded.heads
        self.counter = TruncationCounter("scored responses")
        self.encoder: SequenceEncoder | None = None
        if loaded.spec is not None:
            self.encoder = SequenceEncoder(
                self.tokenizer,
                max_length or loaded.spec["max_length"],
                loaded.spec.get("max_prompt_length"),
                encoder=loaded.spec["backbone"] == "encoder",
                counter=self.counter,
                keep_completion=bool(loaded.spec.get("keep_completion", False)),
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

    def score_heads(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Every head's ``(mean (N, H), std (N, H))``, divided by the temperature; columns as ``self.heads``."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        batches = self._batches(prompts, responses)
        mean, std = ensemble_head_scores(self.members, batches, len(self.heads))
        return mean / self.temperature, std / self.temperature

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[Tensor, Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        mean, std = ensemble_scores(self.members, self._batches(prompts, responses))
        return mean / self.temperature, std / self.temperature


def load_reward_scorer(
    path: str | Path, device: str = "cpu", batch_size: int = 16, max_length: int | None = None
) -> RewardModelScorer:
    """Load the reward model(s) in ``path`` (the ``checkpoint_dir`` of ``alignflow rm``, or one HF folder).

    Returns a callable ``scorer(prompts, responses) -> (mean (N,), std (N,))``.
    """
    return RewardModelScorer(path, device=device, batch_size=batch_size, max_length=max_length)
