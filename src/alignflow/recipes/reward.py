"""Reward model: Bradley-Terry on preference pairs (or k-way rankings expanded to pairs), ensembles, calibration.

Reads top to bottom: setup (run, data, split) → for each ensemble member: model, optimizer, resume, loop
(one forward over ``[chosen; rejected]``, Bradley-Terry loss, NaN guard, metrics, graceful stop),
checkpoint, held-out scores → ensemble evaluation (accuracy, loss, mean margin, calibration) → one artifact
folder holding K HF checkpoints and ``ensemble.json``. Metric names: ``docs/metrics.md#rm``.

Backbones: a causal LM directory (``AutoModelForSequenceClassification`` pools the last non-pad token) or a
BERT-style encoder such as the packaged all-MiniLM-L6-v2 (``[CLS] prompt [SEP] response [SEP]``, a fresh
linear head on the mean of the token states by default, or on the CLS pooler). ``model.backbone: auto`` picks
the encoder layout when the tokenizer has CLS/SEP. Options whose best value differs by backbone default to
``auto`` and resolve in :func:`resolved_options` (measured on HH-harmless: ``benchmarks/RESULTS.md``).

Calibration: ``temperature.fraction`` of the training prompts is held out (by a salted prompt hash, so it is
prompt-disjoint from both train and eval); after training a temperature T is fitted on those pairs' ensemble
gaps (never on the eval split) and saved in ``ensemble.json``; ``eval/ece`` is the raw model's,
``eval/ece_calibrated`` the temperature-scaled one's.

Components live in the library: the encoder, pairs and prompt split in :mod:`alignflow.data.encode`; the packed
pair forward in :mod:`alignflow.train.logprobs`; freezing layers and the ensemble file in
:mod:`alignflow.models.reward`; accuracy and calibration in :mod:`alignflow.evaluate.reward`; the accumulation
normalisation in :mod:`alignflow.train.accum`. Use a trained model with
:func:`alignflow.models.reward.load_reward_scorer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from alignflow.config import (
    CheckpointSection,
    LoraSection,
    ModelSection,
    OptimSection,
    PreferenceDataSection,
    StageConfig,
    StrictModel,
    TrainSection,
    register_stage,
)
from alignflow.data.encode import (
    EncodedPair,
    Pair,
    SequenceEncoder,
    TruncationCounter,
    encode_pairs,
    endless,
    make_sampler,
    model_kwargs,
    pack_pairs,
    pad_batch,
    rows_to_pairs,
    split_by_prompt,
    steps_for,
)
from alignflow.errors import ConfigError, DataFormatError
from alignflow.evaluate.reward import preference_accuracy, preference_metrics
from alignflow.evaluate.rm_eval import fit_temperature, head_accuracy
from alignflow.models import load_reward_model, load_tokenizer
from alignflow.models.reward import (
    OVERALL,
    freeze_bottom,
    unwrap_pooling,
    with_pooling,
    write_ensemble,
)
from alignflow.recipes.common import Run, check_finite, console, set_seed, start_run
from alignflow.recipes.common import check_world as common_check_world
from alignflow.splits import prompt_bucket
from alignflow.store import Store
from alignflow.train.accum import example_mean_share, step_weight
from alignflow.train.checkpoint import CheckpointManager
from alignflow.train.distributed import DistContext, init_distributed, unwrap
from alignflow.train.distributed import export_hf as export_model
from alignflow.train.logprobs import splittable, tree_pair_scores
from alignflow.train.losses import bradley_terry_loss, multi_head_bradley_terry_sums
from alignflow.train.memory import resolve_token_budget
from alignflow.train.optim import (
    StepTimer,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    lora_spec,
    resolve_device,
    retention,
)


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
    pooling: Literal["auto", "last", "cls", "mean", "response_mean"] = Field(
        default="auto",
        description="Token states the linear head reads: last (causal), cls (the encoder's pooler), mean "
        "(every token), response_mean (the response segment; encoders). auto = mean for encoders, last "
        "for causal LMs.",
    )


class RewardDataSection(PreferenceDataSection):
    keep_response: bool | None = Field(
        default=None,
        description="Keep each response whole and cut only the prompt, from the left (a response longer than "
        "the budget is still cut). None = on for encoders, off for causal LMs (their prompt then keeps "
        "up to max_prompt_length or half the budget).",
    )


class RewardLossSection(StrictModel):
    head_weight: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of each dimension head's Bradley-Terry loss beside the overall head's (multi-head "
        "models; heads: [...]).",
    )
    soft_labels: bool = Field(
        default=False, description="Treat the pairs' weight column as P(chosen better)."
    )
    use_weights: bool = Field(default=True, description="Weight each pair's loss by its weight column.")
    margin: float | None = Field(default=None, description="Required reward gap (Llama-2 margin loss).")
    center_coef: float = Field(default=0.0, ge=0.0, description="Reward-centering coefficient (0 = off).")
    label_smoothing: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description="eps: the target P(chosen better) becomes 1 - eps (a soft label p becomes "
        "eps + (1 - 2 eps) p); keeps a noisy-label model from driving gaps to infinity.",
    )


class TemperatureSection(StrictModel):
    fraction: float | None = Field(
        default=None,
        ge=0.0,
        lt=1.0,
        description="Share of the training prompts held out to fit a temperature after training "
        "(0 = no temperature scaling). None = 0.1 for encoders, 0 for causal LMs.",
    )


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
    heads: list[str] | Literal["auto"] | None = Field(
        default=None,
        description="Reward heads on one trunk: 'overall' (the pair's preference) and one per rated dimension, "
        "trained on the pairs' labels (pairs format: labels {dimension: P(chosen better)}); a pair without a "
        "dimension's label is masked for that head. auto = overall plus every dimension the training pairs "
        "label. None = one overall head.",
    )
    lora: LoraSection = Field(default_factory=LoraSection)
    data: RewardDataSection
    loss: RewardLossSection = Field(default_factory=RewardLossSection)
    ensemble: EnsembleSection = Field(default_factory=EnsembleSection)
    calibration_bins: int = Field(default=10, ge=1, description="Bins of the reliability diagram / ECE.")
    temperature: TemperatureSection = Field(default_factory=TemperatureSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)


@dataclass(frozen=True)
class RewardOptions:
    """The backbone-dependent options of a run, ``auto`` / ``None`` resolved."""

    encoder: bool
    pooling: str
    keep_response: bool
    calibration_fraction: float


def resolved_options(cfg: RewardConfig, encoder: bool) -> RewardOptions:
    """Resolve ``model.pooling``, ``data.keep_response`` and ``temperature.fraction`` for the backbone.

    The encoder values are the best measured on HH-harmless (``benchmarks/bench_hh_reward.py``); the causal
    ones keep the recipe's earlier behaviour (last-token head, half-budget prompt, no temperature).
    """
    pooling = cfg.model.pooling if cfg.model.pooling != "auto" else ("mean" if encoder else "last")
    if pooling in ("cls", "mean", "response_mean") and not encoder:
        raise ConfigError(f"model.pooling={pooling!r} needs an encoder backbone; causal LMs pool 'last'")
    if pooling == "last" and encoder:
        raise ConfigError(
            "model.pooling='last' is the causal head; encoders pool 'cls', 'mean' or 'response_mean'"
        )
    keep = cfg.data.keep_response if cfg.data.keep_response is not None else encoder
    frac = cfg.temperature.fraction if cfg.temperature.fraction is not None else (0.1 if encoder else 0.0)
    return RewardOptions(encoder, pooling, keep, frac)


# ---------------------------------------------------------------------------------------------------------------------
# recipe


def check_world(cfg: RewardConfig, dist: DistContext) -> None:
    """The common rule (:func:`alignflow.recipes.common.check_world`) and no LoRA under FSDP; `--nproc N` checks
    it before torchrun starts, each process again at the start of :func:`run`."""
    common_check_world(cfg, dist)
    if dist.enabled and dist.strategy == "fsdp" and cfg.lora.enabled:  # fail now, not at the export
        raise ConfigError(
            "a LoRA reward model is merged into each member folder, which FSDP-sharded weights do not "
            "support: set train.distributed.strategy=ddp (the adapter is small; sharding buys nothing)"
        )


def run(cfg: RewardConfig, store: Store | None = None) -> dict[str, Any]:
    """Train ``ensemble.size`` reward models, evaluate them and register one artifact holding all of them.

    Under torchrun every member trains data-parallel (DDP or FSDP2) in all processes; held-out and
    calibration scoring runs, identically, on every rank; rank 0 writes the member folders and reports.
    """
    dist = init_distributed(cfg.train.distributed)
    check_world(cfg, dist)  # before any work, not at step 1
    r = start_run(cfg, store, dist)
    try:
        return _run(cfg, r)
    except BaseException as exc:
        r.fail(exc)
        raise
    finally:
        dist.close()


@dataclass
class _Data:
    """What every member trains and is evaluated on: encoded train and held-out pairs, and their tokenizer."""

    train: list[EncodedPair]
    held: list[EncodedPair]
    calib: list[EncodedPair]
    tok: Any
    opts: RewardOptions
    device: torch.device
    heads: list[str]

    @property
    def encoder(self) -> bool:
        return self.opts.encoder


@dataclass
class _Member:
    """One trained member: its last training metrics, held-out and calibration scores ``(N, H)`` chosen and
    rejected (one column per head, ``overall`` first)."""

    metrics: dict[str, float]
    held_scores: tuple[torch.Tensor, torch.Tensor] | None
    total_steps: int
    stopped_at: int | None = None
    calib_scores: tuple[torch.Tensor, torch.Tensor] | None = None
    batch_plan: dict[str, Any] | None = None  # alignflow.train.memory.BatchPlan.as_dict()


def _run(cfg: RewardConfig, r: Run) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup
    set_seed(cfg.train.seed)
    if cfg.model.freeze_layers and cfg.lora.enabled:
        raise ConfigError("model.freeze_layers applies to full fine-tuning; with LoRA set it to 0")
    device = r.dist.device(resolve_device(cfg.model))
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    opts = resolved_options(cfg, _is_encoder(cfg, tok))
    counter = TruncationCounter("responses")
    train, held, calib = _load_data(cfg, r, tok, opts, counter)
    heads = resolve_heads(cfg.heads, train, cfg.data.train)
    data = _Data(train, held, calib, tok, opts, device, heads)
    r.model_dir(cfg.model.path)
    K = cfg.ensemble.size
    out_root = r.run_dir / "final"

    # ---------------------------------------------------------------- one training loop per ensemble member
    members: list[_Member] = []
    with r.stopper() as stop:
        for k in range(K):
            member = _train_member(cfg, r, data, k, stop, out_root / f"member-{k}")
            if member.stopped_at is not None:
                return {
                    "run_id": r.run_id,
                    "stopped": True,
                    "step": member.stopped_at,
                    "member": k,
                    "run_dir": str(r.run_dir),
                    "signal": r.stop_signal,
                }
            members.append(member)

    # ---------------------------------------------------------------- temperature, then ensemble evaluation
    final: dict[str, Any] = {f"train/{key}": v for key, v in members[-1].metrics.items()} if K == 1 else {}
    temperature = 1.0
    if calib:
        cal_c, cal_r = _ensemble_mean([m.calib_scores for m in members if m.calib_scores])
        temperature = fit_temperature(cal_c[:, 0] - cal_r[:, 0])
        final["calibration/temperature"] = temperature
        final["calibration/pairs"] = len(calib)
    reliability: list[dict[str, float]] = []
    if held:
        held_scores = [m.held_scores for m in members if m.held_scores]
        evaluation = _evaluate_ensemble(
            [(c[:, 0], rj[:, 0]) for c, rj in held_scores], cfg.calibration_bins, temperature
        )
        if len(data.heads) > 1:
            evaluation.update(head_metrics(*_ensemble_mean(held_scores), held, data.heads))
        reliability = evaluation.pop("reliability")
        reliability_calibrated = evaluation.pop("reliability_calibrated", None)
        final.update(evaluation)
        r.log(members[-1].total_steps, {k: v for k, v in final.items() if isinstance(v, float | int)})
        rel: dict[str, Any] = {"bins": reliability, "ece": final["eval/ece"]}
        if reliability_calibrated is not None:
            rel.update(
                temperature=temperature,
                bins_calibrated=reliability_calibrated,
                ece_calibrated=final["eval/ece_calibrated"],
            )
        if r.dist.is_main:  # every rank scored the same pairs; one writes
            (r.run_dir / "reliability.json").write_text(json.dumps(rel, indent=1))

    # ---------------------------------------------------------------- register the ensemble
    manifest = {"eval": {}}  # rank 0 writes ensemble.json (and alone registers the folder)
    if r.dist.is_main:
        manifest = write_ensemble(
            out_root,
            [f"member-{k}" for k in range(K)],
            backbone="encoder" if opts.encoder else "causal",
            max_length=cfg.data.max_length,
            max_prompt_length=cfg.data.max_prompt_length,
            eval_metrics={k: v for k, v in final.items() if k.startswith("eval/")},
            pooling=opts.pooling,
            keep_completion=opts.keep_response,
            temperature=temperature,
            heads=data.heads,
        )
    ckpt_id = r.register_checkpoint(
        out_root,
        meta={"kind": "reward_model", "ensemble_size": K, "heads": data.heads, **manifest["eval"]},
    )
    summary = {
        "metrics": final,
        "reliability": reliability,
        "ensemble_size": K,
        "heads": data.heads,
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "calibration_pairs": len(calib),
        "truncated_responses": counter.count,
        "responses_cut": counter.completions_cut,
        "batch_plan": members[-1].batch_plan,
        "options": {
            "pooling": opts.pooling,
            "keep_response": opts.keep_response,
            "calibration_fraction": opts.calibration_fraction,
        },
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
# phases


def _is_encoder(cfg: RewardConfig, tok: Any) -> bool:
    if cfg.model.backbone != "auto":
        return cfg.model.backbone == "encoder"
    return tok.cls_token_id is not None and tok.sep_token_id is not None


def resolve_heads(spec: list[str] | str | None, train: list[EncodedPair], source: str) -> list[str]:
    """The model's heads, ``overall`` first: ``None`` one head, ``auto`` every dimension the pairs label.

    A named dimension that no training pair labels is an error naming it and the dimensions there are.
    """
    present = sorted({d for p in train for d in p.labels})
    if spec is None:
        return [OVERALL]
    if spec == "auto":
        if not present:
            raise DataFormatError(
                f"{source}: heads: auto, but no training pair has per-dimension labels (pairs field 'labels')"
            )
        return [OVERALL, *present]
    names = [h for h in spec if h != OVERALL]
    if len(set(names)) != len(names):
        raise ConfigError(f"heads: {spec!r} names a head twice")
    missing = [h for h in names if h not in present]
    if missing:
        have = ", ".join(present) or "none"
        raise ConfigError(
            f"heads: no training pair in {source} labels {', '.join(map(repr, missing))} (labelled: {have})"
        )
    return [OVERALL, *names]


def _head_targets(
    items: list[EncodedPair], heads: list[str], eps: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets (B, H-1), mask (B, H-1))`` of the dimension heads: P(chosen better), label-smoothed."""
    dims = heads[1:]
    mask = torch.tensor([[d in p.labels for d in dims] for p in items], dtype=torch.bool, device=device)
    p = torch.tensor([[p.labels.get(d, 0.5) for d in dims] for p in items], device=device)
    return eps + (1 - 2 * eps) * p, mask


def head_metrics(
    chosen: torch.Tensor, rejected: torch.Tensor, items: list[EncodedPair], heads: list[str]
) -> dict[str, float]:
    """Held-out agreement with each dimension's labels, of its own head and of the overall head
    (:func:`alignflow.evaluate.rm_eval.head_accuracy`, as ``alignflow rm-eval`` reports it).

    ``eval/head/<d>/overall_accuracy`` is the overall head on the same pairs: the comparison that says whether
    the dimension head sees what the overall model misses.
    """
    rows = head_accuracy(chosen.numpy(), rejected.numpy(), heads, [p.labels for p in items])
    out: dict[str, float] = {}
    for row in rows:
        d = row["dimension"]
        out[f"eval/head/{d}/accuracy"] = float(row["accuracy"])
        out[f"eval/head/{d}/overall_accuracy"] = float(row["overall_accuracy"])
        out[f"eval/head/{d}/pairs"] = float(row["n"])
    return out


def _read_pairs(r: Run, ref: str, fmt: str, role: str) -> list[Pair]:
    aid = r.dataset(ref, fmt, role=role)
    return rows_to_pairs(r.store.read_dataset(aid).to_pylist(), fmt)


def calibration_split(pairs: list[Pair], fraction: float) -> tuple[list[Pair], list[Pair]]:
    """(train, calibration) by a SALTED prompt hash: independent of the eval split's bucket, prompt-disjoint."""
    train, calib = [], []
    for p in pairs:
        (calib if prompt_bucket("calibration\x00" + p.prompt) < fraction else train).append(p)
    return train, calib


def _load_data(
    cfg: RewardConfig, r: Run, tok: Any, opts: RewardOptions, counter: TruncationCounter
) -> tuple[list[EncodedPair], list[EncodedPair], list[EncodedPair]]:
    """Train, held-out (``data.eval``, or split off by prompt) and calibration pairs, checked and encoded."""
    pairs = _read_pairs(r, cfg.data.train, cfg.data.format, "dataset")
    if cfg.data.eval:
        train_pairs, eval_pairs = pairs, _read_pairs(r, cfg.data.eval, cfg.data.format, "eval_dataset")
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.data.eval_fraction, lambda p: p.prompt)
    calib_pairs: list[Pair] = []
    if opts.calibration_fraction > 0:
        train_pairs, calib_pairs = calibration_split(train_pairs, opts.calibration_fraction)
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
    enc = SequenceEncoder(
        tok,
        cfg.data.max_length,
        cfg.data.max_prompt_length,
        encoder=opts.encoder,
        counter=counter,
        keep_completion=opts.keep_response,
    )
    encoded = [encode_pairs(ps, enc) for ps in (train_pairs, eval_pairs, calib_pairs)]
    counter.report()
    return encoded[0], encoded[1], encoded[2]


def _train_member(cfg: RewardConfig, r: Run, data: _Data, k: int, stop: Any, out_dir: Path) -> _Member:
    """Train member ``k`` (seed ``train.seed + k``, optionally on a bootstrap resample), export it to ``out_dir``.

    Resumes from the member's latest checkpoint; a graceful stop returns with ``stopped_at`` set.
    """
    seed = cfg.train.seed + k
    set_seed(seed)
    n = len(data.train)
    if cfg.ensemble.bootstrap:
        idx = np.random.default_rng([seed, 7919]).integers(0, n, n).tolist()
    else:
        idx = list(range(n))
    pad_id = data.tok.pad_token_id
    model = load_reward_model(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=str(data.device),
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora=lora_spec(cfg.lora),
        pad_token_id=pad_id,
        num_labels=len(data.heads),
    )
    freeze_bottom(model, cfg.model.freeze_layers)
    model = with_pooling(model, data.opts.pooling)
    # Packed: a causal trunk whose ``score`` head splits off; encoders attend both ways and always pad.
    packed = cfg.data.packing and not data.encoder and splittable(model, "score")
    if packed and r.dist.enabled:
        # The packed forward calls the trunk and the head separately, past DDP's/FSDP's forward (no gradient
        # sync, sharded parameters); the padded forward gives the same scores up to float summation order.
        packed = False
        if r.dist.is_main and k == 0:
            console.print("data.packing is off under torchrun (the packed pair forward bypasses DDP/FSDP)")
    model = r.dist.wrap(model, data.device)  # DDP or FSDP2 under torchrun; the model itself in one process
    plan = resolve_token_budget(cfg.train, model, cfg.model, 2 * cfg.data.max_length, state_dir=r.run_dir)
    sampler = make_sampler(
        [2 * data.train[i].length for i in idx],
        cfg.train.batch_size,
        2 * cfg.data.max_length,
        seed,
        token_budget=plan.tokens_per_batch,
    )
    grad_accum = plan.grad_accum  # train.grad_accum, or what train.tokens_per_batch=auto raised it to
    total = steps_for(sampler, grad_accum, cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    if cfg.ensemble.size == 1:
        ckpt = r.checkpoints(retention=retention(cfg.checkpoint))
    else:
        ckpt = CheckpointManager(
            r.run_dir / "checkpoints" / f"member-{k}", retention=retention(cfg.checkpoint), dist=r.dist
        )
    start = 0
    resumed = ckpt.load_latest()
    if resumed is not None:
        sampler.load_state_dict(resumed.restore(model, optimizer, scheduler)["sampler"])
        start = resumed.step
    batches = endless(sampler)
    prefix = f"member{k}/" if cfg.ensemble.size > 1 else ""

    # ---------------------------------------------------------------- loop
    metrics: dict[str, float] = {}
    timer = StepTimer()
    with ckpt, r.progress(total, ("loss", "accuracy", "pairs_per_sec"), completed=start) as bar:
        for step in range(start + 1, total + 1):
            micro = [[data.train[idx[j]] for j in next(batches)] for _ in range(grad_accum)]
            loss, correct, margin_sum = _accumulate_gradients(
                cfg, model, micro, pad_id, data.device, packed, step, ckpt, data.heads, r.dist
            )
            grad_norm = clip_and_step(model, optimizer, cfg.optim.max_grad_norm)
            scheduler.step()  # once per optimizer step
            n_pairs = sum(len(m) for m in micro)
            metrics = {
                "loss": loss,
                "accuracy": correct / n_pairs,
                "margin": margin_sum / n_pairs,
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                "num_pairs": n_pairs,
                "pairs_per_sec": n_pairs / timer.lap(),
            }
            if step % cfg.train.log_every == 0 or step == total:
                r.log(step, {prefix + key: v for key, v in metrics.items()})
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total and data.held:
                hc, hr = _score_pairs(model, data.held, pad_id, data.device, cfg.train.batch_size, packed)
                ev = preference_metrics(hc[:, 0], hr[:, 0])
                r.log(step, {f"{prefix}eval/{key}": v for key, v in ev.items() if key != "reliability"})
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
                return _Member(metrics, None, total, stopped_at=step)

    # ---------------------------------------------------------------- held-out and calibration scores, export
    held_scores = calib_scores = None
    if data.held:
        held_scores = _score_pairs(model, data.held, pad_id, data.device, cfg.train.batch_size, packed)
    if data.calib:
        calib_scores = _score_pairs(model, data.calib, pad_id, data.device, cfg.train.batch_size, packed)
    # A LoRA reward model is merged so each member is a standalone scorer (no base model needed); a pooled
    # one is saved as its HF model (ensemble.json's pooling re-wraps it). Under torchrun rank 0 writes it
    # (FSDP2 shards gathered first: a collective).
    export_model(r.dist, unwrap_pooling(unwrap(model)), data.tok, out_dir, merge_lora=True)
    return _Member(metrics, held_scores, total, calib_scores=calib_scores, batch_plan=plan.as_dict())


def _accumulate_gradients(
    cfg: RewardConfig,
    model: Any,
    micro: list[list[EncodedPair]],
    pad_id: int,
    device: torch.device,
    packed: bool,
    step: int,
    ckpt: Any,
    heads: list[str],
    dist: DistContext | None = None,
) -> tuple[float, float, float]:
    """Forward and backward over the step's micro-batches; returns ``(loss, n_correct, summed reward gap)``.

    The step's loss is the (weighted) mean Bradley-Terry loss over ALL its pairs
    (:func:`alignflow.train.accum.example_mean_share`), whatever the micro-batch split. A multi-head model adds,
    per dimension head, ``loss.head_weight`` times the mean soft Bradley-Terry loss over the step's pairs that
    label that dimension (:func:`~alignflow.train.losses.multi_head_bradley_terry_sums`); correct and gap are
    the overall head's.

    Under torchrun every rank gets ALL the step's micro-batches (the same seeded sampler), takes the
    normalisers (summed weights, labelled pairs per head) over all of them, then runs only its share
    (``dist.shard``); the returned sums are over all ranks.
    """
    dist = dist or DistContext()
    weighted = cfg.loss.use_weights and not cfg.loss.soft_labels
    eps = cfg.loss.label_smoothing
    pair_weights = [[p.weight if weighted else 1.0 for p in items] for items in micro]
    total_weight = step_weight(pair_weights)
    # Per dimension head: its labelled pairs over the whole step, so the mean does not depend on the split.
    head_counts = torch.tensor(
        [sum(d in p.labels for items in micro for p in items) for d in heads[1:]], device=device
    ).clamp(min=1)
    loss_sum = torch.zeros((), device=device)
    correct = margin_sum = 0.0
    mine = dist.shard(list(zip(micro, pair_weights, strict=True)))  # this rank's micro-batches
    for j, (items, weights) in enumerate(mine):
        with dist.grad_sync(model, sync=j == len(mine) - 1), dist.autocast(device):
            scores_c, scores_r = _pair_scores(model, items, pad_id, device, packed)  # (B, H) each
            chosen, rejected = scores_c[:, 0], scores_r[:, 0]
            w = torch.tensor([p.weight for p in items], dtype=chosen.dtype, device=device)
            target = w if cfg.loss.soft_labels else None
            if eps > 0:
                target = eps + (1 - 2 * eps) * (w if cfg.loss.soft_labels else torch.ones_like(w))
            loss = bradley_terry_loss(
                chosen,
                rejected,
                margin=cfg.loss.margin,
                center_coef=cfg.loss.center_coef,
                weights=w if weighted else None,
                soft_labels=target,
            )
            loss = example_mean_share(loss, sum(weights), total_weight)
            if len(heads) > 1 and cfg.loss.head_weight > 0:
                targets, mask = _head_targets(items, heads, eps, device)
                sums = multi_head_bradley_terry_sums(scores_c[:, 1:], scores_r[:, 1:], targets, mask)
                loss = loss + cfg.loss.head_weight * (sums / head_counts).sum()
            check_finite(loss, step, [p.id for p in items], ckpt)
            dist.backward(loss)
        loss_sum += loss.detach()
        gap = (chosen - rejected).detach().float()
        correct += float((gap > 0).sum())
        margin_sum += float(gap.sum())
    if dist.enabled:  # one collective: the step's loss, correct pairs and summed gaps over all ranks
        sums = torch.tensor([float(loss_sum), correct, margin_sum], dtype=torch.float64)
        total_loss, correct, margin_sum = dist.sum_tensor(sums).tolist()
        return total_loss, correct, margin_sum
    return float(loss_sum), correct, margin_sum


def _ensemble_mean(
    member_scores: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' mean chosen and rejected scores, ``(N, ...)`` each, from K pairs of that shape."""
    return (
        torch.stack([c for c, _ in member_scores]).mean(0),
        torch.stack([rj for _, rj in member_scores]).mean(0),
    )


def _evaluate_ensemble(
    member_scores: list[tuple[torch.Tensor, torch.Tensor]], bins: int, temperature: float = 1.0
) -> dict[str, Any]:
    """Held-out metrics of the members' mean score (and, for K > 1, the members' spread), ``eval/``-prefixed.

    With a fitted ``temperature`` T != 1 the loss, ECE and bins of the scores divided by T are added as
    ``eval/loss_calibrated``, ``eval/ece_calibrated`` and ``reliability_calibrated`` (accuracy is unchanged:
    T > 0 keeps every gap's sign). ``reliability`` (the calibration bins) is returned unprefixed.
    """
    stack_c = torch.stack([c for c, _ in member_scores])  # (K, N)
    stack_r = torch.stack([rj for _, rj in member_scores])  # (K, N)
    mean_c, mean_r = stack_c.mean(0), stack_r.mean(0)
    ev = preference_metrics(mean_c, mean_r, bins)
    out: dict[str, Any] = {"reliability": ev.pop("reliability")}
    out.update({f"eval/{key}": v for key, v in ev.items()})
    if temperature != 1.0:
        scaled = preference_metrics(mean_c / temperature, mean_r / temperature, bins)
        out["reliability_calibrated"] = scaled["reliability"]
        out["eval/loss_calibrated"] = scaled["loss"]
        out["eval/ece_calibrated"] = scaled["ece"]
    if len(member_scores) > 1:
        accs = [preference_accuracy(c, rj) for c, rj in member_scores]
        out["eval/member_accuracy_mean"] = float(np.mean(accs))
        out["eval/member_accuracy_std"] = float(np.std(accs))
        out["eval/score_std_mean"] = float(torch.cat([stack_c.std(0), stack_r.std(0)]).mean())
    return out


def _pair_scores(
    model: Any, items: list[EncodedPair], pad_id: int, device: torch.device, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected responses, ``(B, H)`` each (one column per head), in one forward.

    Packed: each pair a prefix tree (prompt once, then chosen and rejected, which never see each other), the
    score head on each response's last token; padded: ``[chosen; rejected]`` rows, last-non-pad pooling.
    """
    n = len(items)
    if packed:
        chosen, rejected = tree_pair_scores(model, pack_pairs(items, pad_id, device))
        return chosen.reshape(n, -1), rejected.reshape(n, -1)
    batch = pad_batch([p.chosen for p in items] + [p.rejected for p in items], pad_id, device)
    scores = model(**model_kwargs(batch)).logits.reshape(2 * n, -1)  # (2B, H)
    return scores[:n], scores[n:]


def _score_pairs(
    model: Any, items: list[EncodedPair], pad_id: int, device: torch.device, batch_size: int, packed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out scores of chosen and rejected responses, float32 ``(N, H)`` each on the CPU, without gradients."""
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            c, r = _pair_scores(model, items[i : i + batch_size], pad_id, device, packed)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    model.train()
    return torch.cat(chosen), torch.cat(rejected)
