"""Reward model: Bradley-Terry on preference pairs (or k-way rankings expanded to pairs), ensembles, calibration.

Reads top to bottom: setup (run, data, split) → for each ensemble member: model, optimizer, resume, loop
(one forward over ``[chosen; rejected]``, Bradley-Terry loss, NaN guard, metrics, graceful stop),
checkpoint, held-out scores → ensemble evaluation (accuracy, loss, mean margin, calibration) → one artifact
folder holding K HF checkpoints and ``ensemble.json``. Metric names: ``docs/metrics.md#rm``.

Backbones: a causal LM directory (``AutoModelForSequenceClassification`` pools the last non-pad token) or a
BERT-style encoder such as the packaged all-MiniLM-L6-v2 (``[CLS] prompt [SEP] response [SEP]``, CLS pooler
with a fresh linear head). ``model.backbone: auto`` picks the encoder layout when the tokenizer has CLS/SEP.

Use a trained model with :func:`load_reward_scorer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from alignflow.config import (
    CheckpointSection,
    DataSection,
    LoraSection,
    ModelSection,
    OptimSection,
    StageConfig,
    StrictModel,
    TrainSection,
    register_stage,
)
from alignflow.data import encode as B
from alignflow.data.encode import TruncationCounter
from alignflow.errors import ConfigError, DataFormatError
from alignflow.models import load_reward_model, load_tokenizer
from alignflow.models.export import export_hf
from alignflow.recipes.common import Run, check_finite, set_seed, start_run
from alignflow.store import Store
from alignflow.train import optim as T
from alignflow.train.logprobs import splittable, tree_hidden
from alignflow.train.losses import bradley_terry_loss

ENSEMBLE_FILE = "ensemble.json"


class RewardModelSection(ModelSection):
    backbone: Literal["auto", "causal", "encoder"] = Field(
        default="auto",
        description="causal LM or BERT-style encoder; auto = encoder if the tokenizer has CLS/SEP",
    )
    freeze_layers: int = Field(
        default=0,
        ge=0,
        description="Freeze the embeddings and the first N transformer layers (full fine-tuning only); "
        "backward then stops at layer N, which cuts the step cost on CPU.",
    )


class RewardDataSection(DataSection):
    format: Literal["pairs", "rankings"] = Field(
        default="pairs", description="pairs, or k-way rankings expanded to all (better, worse) pairs"
    )
    packing: bool = Field(
        default=True,
        description="Causal backbones: each pair as one packed prefix tree (the prompt once, then chosen and "
        "rejected, which never attend to each other) instead of two padded rows. Same results, fewer token "
        "slots; encoders and models whose head cannot be split off always use padded rows.",
    )


class RewardLossSection(StrictModel):
    soft_labels: bool = Field(
        default=False, description="Treat the pairs' weight column as P(chosen better)."
    )
    use_weights: bool = Field(default=True, description="Weight each pair's loss by its weight column.")
    margin: float | None = Field(default=None, description="Required reward gap (Llama-2 margin loss).")
    center_coef: float = Field(default=0.0, ge=0.0, description="Reward-centering coefficient (0 = off).")


class EnsembleSection(StrictModel):
    size: int = Field(default=1, ge=1, description="Number of reward models (seeds train.seed + k).")
    bootstrap: bool = Field(
        default=False, description="Train each member on a bootstrap resample of the pairs."
    )


@register_stage("rm")
class RewardConfig(StageConfig):
    """Reward-model training (``alignflow rm``)."""

    stage: Literal["rm"] = "rm"
    model: RewardModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: RewardDataSection
    loss: RewardLossSection = Field(default_factory=RewardLossSection)
    ensemble: EnsembleSection = Field(default_factory=EnsembleSection)
    calibration_bins: int = Field(default=10, ge=1, description="Bins of the reliability diagram / ECE.")
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)


# ---------------------------------------------------------------------------------------------------------------------
# metrics (pure functions)


def calibration(gaps: torch.Tensor, bins: int = 10) -> tuple[float, list[dict[str, float]]]:
    """Top-label expected calibration error of ``P(chosen better) = sigmoid(r_c - r_r)`` (Guo et al. 2017, eq. 3).

    The model's prediction for a pair is the side it prefers, with confidence ``c = sigmoid(|gap|)`` in
    [0.5, 1]; it is correct when ``gap > 0``. Confidences are binned uniformly on [0.5, 1] and
    ``ECE = sum_b (n_b / N) |acc_b - conf_b|``.

    Args:
        gaps: ``(N,)`` reward gaps ``r_chosen - r_rejected``.

    Returns:
        ``(ece, reliability)`` where reliability lists per bin ``lo, hi, count, confidence, accuracy``.
    """
    g = gaps.detach().double().cpu()
    conf = torch.sigmoid(g.abs())
    correct = (g > 0).double()
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    which = torch.clamp(torch.bucketize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        row = {
            "lo": float(edges[b]),
            "hi": float(edges[b + 1]),
            "count": n,
            "confidence": None,
            "accuracy": None,
        }
        if n:
            c, a = float(conf[sel].mean()), float(correct[sel].mean())
            row.update(confidence=c, accuracy=a)
            ece += n / len(g) * abs(a - c)
        table.append(row)
    return ece, table


def preference_metrics(chosen: torch.Tensor, rejected: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Held-out accuracy (ties count half), Bradley-Terry loss, mean margin and ECE of ``(N,)`` score vectors."""
    gap = chosen - rejected
    ece, table = calibration(gap, bins)
    return {
        "accuracy": float(((gap > 0).float() + 0.5 * (gap == 0).float()).mean()),
        "loss": float(bradley_terry_loss(chosen, rejected)),
        "margin": float(gap.mean()),
        "ece": ece,
        "reliability": table,
    }


# ---------------------------------------------------------------------------------------------------------------------
# recipe


def run(cfg: RewardConfig, store: Store | None = None) -> dict[str, Any]:
    """Train ``ensemble.size`` reward models, evaluate them and register one artifact holding all of them."""
    r = start_run(cfg, store)
    try:
        return _run(cfg, r)
    except BaseException as exc:
        r.fail(exc)
        raise


def _is_encoder(cfg: RewardConfig, tok: Any) -> bool:
    if cfg.model.backbone != "auto":
        return cfg.model.backbone == "encoder"
    return tok.cls_token_id is not None and tok.sep_token_id is not None


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


def _load_pairs(r: Run, ref: str, fmt: str, role: str) -> list[B.Pair]:
    aid = r.dataset(ref, fmt, role=role)
    return B.rows_to_pairs(r.store.read_dataset(aid).to_pylist(), fmt)


def can_pack(model: Any, encoder: bool) -> bool:
    """Whether pairs can go through ``model`` as prefix trees: a causal trunk with a separable ``score`` head."""
    return not encoder and splittable(model, "score")


def pair_scores(
    model: Any, items: Sequence[B.EncodedPair], pad_id: int, device: torch.device, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar rewards of chosen and rejected responses, ``(B,)`` each, in one forward.

    Packed: each pair is a prefix tree (prompt once, then chosen and rejected, which never see each other)
    and the score head runs on each response's last token, as the padded path's last-non-pad pooling does.
    """
    if packed:
        tb = B.pack_pairs(items, pad_id, device)
        hidden, head = tree_hidden(model, tb, head="score")
        scores = head(hidden[tb.end_rows, tb.end_cols]).squeeze(-1)  # (2B,) chosen, rejected, chosen, ...
        return scores[0::2], scores[1::2]
    batch = B.pad_batch([p.chosen for p in items] + [p.rejected for p in items], pad_id, device)
    scores = model(**B.model_kwargs(batch)).logits.squeeze(-1)  # (2B,)
    return scores[: len(items)], scores[len(items) :]


def score_pairs(
    model: Any,
    items: Sequence[B.EncodedPair],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    packed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected responses, ``(N,)`` each, in eval mode without gradients."""
    model.eval()
    rc, rr = [], []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            c, r = pair_scores(model, items[i : i + batch_size], pad_id, device, packed)
            rc.append(c.float().cpu())
            rr.append(r.float().cpu())
    model.train()
    return torch.cat(rc), torch.cat(rr)


def _run(cfg: RewardConfig, r: Run) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup
    set_seed(cfg.train.seed)
    device = T.resolve_device(cfg.model)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    encoder = _is_encoder(cfg, tok)
    pairs = _load_pairs(r, cfg.data.train, cfg.data.format, "dataset")
    if cfg.data.eval:
        train_pairs, eval_pairs = pairs, _load_pairs(r, cfg.data.eval, cfg.data.format, "eval_dataset")
    else:
        train_pairs, eval_pairs = B.split_by_prompt([p.__dict__ for p in pairs], cfg.data.eval_fraction)
        train_pairs = [B.Pair(**p) for p in train_pairs]
        eval_pairs = [B.Pair(**p) for p in eval_pairs]
    if not train_pairs:
        raise DataFormatError(
            f"{cfg.data.train}: no training pairs left after the eval split ({len(pairs)} pairs)"
        )
    if cfg.loss.soft_labels and any(not 0.0 <= p.weight <= 1.0 for p in train_pairs):
        bad = next(p for p in train_pairs if not 0.0 <= p.weight <= 1.0)
        raise DataFormatError(
            f"{cfg.data.train}: pair {bad.id!r} field 'weight' = {bad.weight} is not a probability; "
            "loss.soft_labels=true needs weights in [0, 1]"
        )
    counter = TruncationCounter("responses")
    enc = B.SequenceEncoder(
        tok, cfg.data.max_length, cfg.data.max_prompt_length, encoder=encoder, counter=counter
    )
    train = B.encode_pairs(train_pairs, enc)
    held = B.encode_pairs(eval_pairs, enc)
    counter.report()
    r.model_dir(cfg.model.path)
    pad_id = tok.pad_token_id
    K = cfg.ensemble.size
    out_root = r.run_dir / "final"

    # ---------------------------------------------------------------- one loop per ensemble member
    member_scores: list[tuple[torch.Tensor, torch.Tensor]] = []
    member_metrics: list[dict[str, float]] = []
    total = 0
    with r.stopper() as stop:
        for k in range(K):
            seed = cfg.train.seed + k
            set_seed(seed)
            if cfg.ensemble.bootstrap:
                idx = np.random.default_rng([seed, 7919]).integers(0, len(train), len(train)).tolist()
            else:
                idx = list(range(len(train)))
            model = load_reward_model(
                cfg.model.path,
                dtype=cfg.model.dtype,
                device=str(device),
                attn_implementation=cfg.model.attn_implementation,
                gradient_checkpointing=cfg.model.gradient_checkpointing,
                lora=T.lora_spec(cfg.lora),
                pad_token_id=pad_id,
            )
            if cfg.model.freeze_layers and cfg.lora.enabled:
                raise ConfigError("model.freeze_layers applies to full fine-tuning; with LoRA set it to 0")
            freeze_bottom(model, cfg.model.freeze_layers)
            packed = cfg.data.packing and can_pack(model, encoder)
            sampler = B.make_sampler(
                [2 * train[i].length for i in idx], cfg.train.batch_size, 2 * cfg.data.max_length, seed
            )
            total = B.steps_for(sampler, cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps)
            optimizer = T.build_optimizer(model, cfg.optim)
            scheduler = T.build_scheduler(optimizer, cfg.optim, total)
            if K == 1:
                ckpt = r.checkpoints(retention=T.retention(cfg.checkpoint))
            else:
                from alignflow.train.checkpoint import CheckpointManager

                ckpt = CheckpointManager(
                    r.run_dir / "checkpoints" / f"member-{k}", retention=T.retention(cfg.checkpoint)
                )
            start = 0
            resumed = ckpt.load_latest()
            if resumed is not None:
                sampler.load_state_dict(resumed.restore(model, optimizer, scheduler)["sampler"])
                start = resumed.step
            batches = B.endless(sampler)
            prefix = f"member{k}/" if K > 1 else ""
            metrics: dict[str, float] = {}
            timer = T.StepTimer()
            with ckpt, r.progress(total, ("loss", "accuracy", "pairs_per_sec"), completed=start) as bar:
                for step in range(start + 1, total + 1):
                    micro = [[train[idx[j]] for j in next(batches)] for _ in range(cfg.train.grad_accum)]
                    n_pairs = sum(len(m) for m in micro)
                    weighted = cfg.loss.use_weights and not cfg.loss.soft_labels
                    # Global normaliser of the step: the loss is a (weighted) mean over ALL its pairs.
                    denom = sum(p.weight for m in micro for p in m) if weighted else n_pairs
                    loss_sum = torch.zeros((), device=device)
                    correct = margin_sum = 0.0
                    for items in micro:
                        rc, rr = pair_scores(model, items, pad_id, device, packed)
                        w = torch.tensor([p.weight for p in items], dtype=rc.dtype, device=device)
                        loss = bradley_terry_loss(
                            rc,
                            rr,
                            margin=cfg.loss.margin,
                            center_coef=cfg.loss.center_coef,
                            weights=w if weighted else None,
                            soft_labels=w if cfg.loss.soft_labels else None,
                        )
                        share = (float(w.sum()) if weighted else len(items)) / denom
                        loss = loss * share
                        check_finite(loss, step, [p.id for p in items], ckpt)
                        loss.backward()
                        loss_sum += loss.detach()
                        gap = (rc - rr).detach().float()
                        correct += float((gap > 0).sum())
                        margin_sum += float(gap.sum())
                    grad_norm = T.clip_and_step(model, optimizer, cfg.optim.max_grad_norm)
                    scheduler.step()
                    metrics = {
                        "loss": float(loss_sum),
                        "accuracy": correct / n_pairs,
                        "margin": margin_sum / n_pairs,
                        "grad_norm": grad_norm,
                        "lr": scheduler.get_last_lr()[0],
                        "num_pairs": n_pairs,
                        "pairs_per_sec": n_pairs / timer.lap(),
                    }
                    if step % cfg.train.log_every == 0 or step == total:
                        r.log(step, {prefix + key: v for key, v in metrics.items()})
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total and held:
                        ev = preference_metrics(
                            *score_pairs(model, held, pad_id, device, cfg.train.batch_size, packed)
                        )
                        r.log(
                            step, {f"{prefix}eval/{key}": v for key, v in ev.items() if key != "reliability"}
                        )
                    bar.update(step, metrics)
                    state = {"sampler": sampler.state_dict()}
                    if r.end_step(
                        ckpt,
                        stop,
                        step,
                        total,
                        model,
                        optimizer,
                        scheduler,
                        state,
                        metrics,
                        cfg.train.save_every,
                        cfg.checkpoint.async_save,
                    ):
                        return {
                            "run_id": r.run_id,
                            "stopped": True,
                            "step": step,
                            "member": k,
                            "run_dir": str(r.run_dir),
                        }
            # ------------------------------------------------------------ member checkpoint and held-out scores
            if held:
                member_scores.append(score_pairs(model, held, pad_id, device, cfg.train.batch_size, packed))
            member_metrics.append(metrics)
            # A LoRA reward model is merged so each member is a standalone scorer (no base model needed).
            export_hf(model, tok, out_root / f"member-{k}", merge_lora=True)
            del model, optimizer

    # ---------------------------------------------------------------- ensemble evaluation
    final: dict[str, Any] = {f"train/{key}": v for key, v in member_metrics[-1].items()} if K == 1 else {}
    reliability: list[dict[str, float]] = []
    if member_scores:
        stack_c = torch.stack([c for c, _ in member_scores])  # (K, N)
        stack_r = torch.stack([rj for _, rj in member_scores])  # (K, N)
        ev = preference_metrics(stack_c.mean(0), stack_r.mean(0), cfg.calibration_bins)
        reliability = ev.pop("reliability")
        final.update({f"eval/{key}": v for key, v in ev.items()})
        if K > 1:
            accs = [preference_metrics(c, rj)["accuracy"] for c, rj in member_scores]
            final["eval/member_accuracy_mean"] = float(np.mean(accs))
            final["eval/member_accuracy_std"] = float(np.std(accs))
            final["eval/score_std_mean"] = float(torch.cat([stack_c.std(0), stack_r.std(0)]).mean())
        r.log(total, {k: v for k, v in final.items() if isinstance(v, float | int)})
        (r.run_dir / "reliability.json").write_text(
            json.dumps({"bins": reliability, "ece": final["eval/ece"]}, indent=1)
        )
    manifest = {
        "format_version": 1,
        "members": [f"member-{k}" for k in range(K)],
        "backbone": "encoder" if encoder else "causal",
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "eval": {k: v for k, v in final.items() if k.startswith("eval/")},
    }
    (out_root / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=1))
    ckpt_id = r.register_checkpoint(
        out_root, meta={"kind": "reward_model", "ensemble_size": K, **manifest["eval"]}
    )
    summary = {
        "metrics": final,
        "reliability": reliability,
        "ensemble_size": K,
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "truncated_responses": counter.count,
    }
    r.finish(summary, outputs={"checkpoint": ckpt_id})
    return {
        "run_id": r.run_id,
        "checkpoint": ckpt_id,
        "checkpoint_dir": str(out_root),
        "metrics": final,
        "reliability": reliability,
        "run_dir": str(r.run_dir),
        "truncated_examples": counter.count,
    }


# ---------------------------------------------------------------------------------------------------------------------
# scoring with a trained model


class RewardScorer:
    """Scores (prompt, response) texts with every member of a reward-model ensemble.

    ``scorer(prompts, responses)`` returns ``(mean, std)``, each a float32 tensor ``(N,)``: the mean of the
    K members' scalar rewards and their standard deviation (0 for a single model).
    """

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", batch_size: int = 16) -> None:
        root = Path(checkpoint_dir)
        spec_file = root / ENSEMBLE_FILE
        if not spec_file.is_file():
            raise DataFormatError(
                f"{spec_file} is missing: {root} is not a reward-model checkpoint from `alignflow rm`"
            )
        spec = json.loads(spec_file.read_text())
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(root / spec["members"][0])
        self.members = [
            load_reward_model(
                root / m, dtype="float32", device=device, pad_token_id=self.tokenizer.pad_token_id
            ).eval()
            for m in spec["members"]
        ]
        self.encoder = B.SequenceEncoder(
            self.tokenizer,
            spec["max_length"],
            spec.get("max_prompt_length"),
            encoder=spec["backbone"] == "encoder",
            counter=TruncationCounter("scored responses"),
        )

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        encoded = [self.encoder.encode(p, c) for p, c in zip(prompts, responses, strict=True)]
        all_scores = []
        with torch.no_grad():
            for model in self.members:
                out = []
                for i in range(0, len(encoded), self.batch_size):
                    batch = B.pad_batch(
                        encoded[i : i + self.batch_size], self.tokenizer.pad_token_id, self.device
                    )
                    out.append(model(**B.model_kwargs(batch)).logits.squeeze(-1).float().cpu())
                all_scores.append(torch.cat(out) if out else torch.zeros(0))
        stack = torch.stack(all_scores)  # (K, N)
        std = stack.std(0, unbiased=False) if len(self.members) > 1 else torch.zeros_like(stack[0])
        return stack.mean(0), std


def load_reward_scorer(checkpoint_dir: str | Path, device: str = "cpu", batch_size: int = 16) -> RewardScorer:
    """Load the reward model(s) in ``checkpoint_dir`` (the ``checkpoint_dir`` returned by :func:`run`).

    Returns a callable ``scorer(prompts, responses) -> (mean (N,), std (N,))``.
    """
    return RewardScorer(checkpoint_dir, device=device, batch_size=batch_size)
