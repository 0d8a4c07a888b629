"""Direct preference optimisation and its family (cDPO, rDPO, IPO, SLiC hinge, SimPO, ORPO), LoRA or full.

Reads top to bottom: setup (run, pairs, policy, reference, cached reference log-probs, optimizer, resume) →
loop (one forward over ``[chosen; rejected]``, the configured loss from :func:`alignflow.train.losses.dpo_loss`,
NaN guard, metrics, graceful stop) → checkpoint → evaluate (implicit reward margin, chosen/rejected rewards
and accuracy on held-out pairs, before and after) → register the HF checkpoint. Metrics: ``docs/metrics.md#dpo``.

Reference model: in LoRA mode the policy with its adapters disabled (:func:`alignflow.models.reference_mode`);
in full fine-tuning a frozen copy loaded from ``reference.path`` (default ``model.path``). With
``reference.precompute: true`` reference log-probs are computed once per (pairs dataset, reference model,
tokenisation) and stored as a ``ref_logps`` dataset artifact with lineage edges to both; a later run with
the same inputs reuses it. SimPO and ORPO are reference-free and skip all of this.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any, Literal

import torch
from pydantic import Field

from alignflow.config import (
    CheckpointSection,
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
from alignflow.errors import DataFormatError
from alignflow.models import load_policy, load_reference, load_tokenizer, reference_mode
from alignflow.models.export import export_hf
from alignflow.recipes.common import Run, check_finite, set_seed, start_run
from alignflow.recipes.reward import RewardDataSection
from alignflow.store import Store
from alignflow.train import optim as T
from alignflow.train.logprobs import PairLogps, concatenated_forward, splittable, tree_pair_logps
from alignflow.train.losses import DPO_LOSS_TYPES, dpo_loss

REFERENCE_FREE = ("simpo", "orpo")
REF_KIND = "ref_logps"


class DPOLossSection(StrictModel):
    type: Literal["sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"] = Field(
        default="sigmoid", description=f"Preference loss: {', '.join(DPO_LOSS_TYPES)}."
    )
    beta: float = Field(default=0.1, gt=0.0, description="Inverse temperature (ORPO: lambda; SimPO: beta).")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="cDPO/rDPO label-flip rate.")
    gamma: float = Field(default=0.5, description="SimPO target reward margin.")


class ReferenceSection(StrictModel):
    path: str | None = Field(
        default=None, description="Reference model directory (full fine-tuning); default model.path."
    )
    precompute: bool = Field(default=True, description="Compute reference log-probs once and cache them.")


@register_stage("dpo")
class DPOConfig(StageConfig):
    """Preference optimisation of a policy (``alignflow dpo``)."""

    stage: Literal["dpo"] = "dpo"
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: RewardDataSection
    loss: DPOLossSection = Field(default_factory=DPOLossSection)
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=5e-6))
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)


def run(cfg: DPOConfig, store: Store | None = None) -> dict[str, Any]:
    """Train, evaluate and register a DPO-family checkpoint (full weights or a LoRA adapter)."""
    r = start_run(cfg, store)
    try:
        return _run(cfg, r)
    except BaseException as exc:
        r.fail(exc)
        raise


def _forward(
    model: Any, items: Sequence[B.EncodedPair], pad_id: int, device: torch.device, packed: bool
) -> PairLogps:
    if packed:  # the prompt once per pair, the LM head only where a completion token is predicted
        return tree_pair_logps(model, B.pack_pairs(items, pad_id, device))
    c = B.pad_batch([p.chosen for p in items], pad_id, device)
    rj = B.pad_batch([p.rejected for p in items], pad_id, device)
    return concatenated_forward(
        model,
        c["input_ids"],
        c["attention_mask"],
        c["labels"],
        rj["input_ids"],
        rj["attention_mask"],
        rj["labels"],
        pad_token_id=pad_id,
    )


def _loss(cfg: DPOConfig, out: PairLogps, ref_c: torch.Tensor | None, ref_r: torch.Tensor | None):
    """The configured loss on one batch: ``(loss, chosen_rewards (B,), rejected_rewards (B,))``."""
    kind = cfg.loss.type
    mean = kind in REFERENCE_FREE  # SimPO/ORPO take per-token mean log-probs
    return dpo_loss(
        kind,
        out.chosen_logps_mean if mean else out.chosen_logps,
        out.rejected_logps_mean if mean else out.rejected_logps,
        ref_c,
        ref_r,
        beta=cfg.loss.beta,
        label_smoothing=cfg.loss.label_smoothing,
        gamma=cfg.loss.gamma,
        chosen_lengths=out.chosen_num_tokens if kind == "ipo" else None,
        rejected_lengths=out.rejected_num_tokens if kind == "ipo" else None,
        chosen_nll=out.chosen_nll if kind == "orpo" else None,
    )


def _run(cfg: DPOConfig, r: Run) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup
    set_seed(cfg.train.seed)
    device = T.resolve_device(cfg.model)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    pad_id = tok.pad_token_id
    train_aid = r.dataset(cfg.data.train, cfg.data.format)
    pairs = B.rows_to_pairs(r.store.read_dataset(train_aid).to_pylist(), cfg.data.format)
    eval_aid = None
    if cfg.data.eval:
        eval_aid = r.dataset(cfg.data.eval, cfg.data.format, role="eval_dataset")
        train_pairs = pairs
        eval_pairs = B.rows_to_pairs(r.store.read_dataset(eval_aid).to_pylist(), cfg.data.format)
    else:
        tr, ev = B.split_by_prompt([p.__dict__ for p in pairs], cfg.data.eval_fraction)
        train_pairs, eval_pairs = [B.Pair(**p) for p in tr], [B.Pair(**p) for p in ev]
    if not train_pairs:
        raise DataFormatError(
            f"{cfg.data.train}: no training pairs left after the eval split ({len(pairs)} pairs)"
        )
    counter = TruncationCounter("responses")
    enc = B.SequenceEncoder(tok, cfg.data.max_length, cfg.data.max_prompt_length, counter=counter)
    train = B.encode_pairs(train_pairs, enc)
    held = B.encode_pairs(eval_pairs, enc)
    counter.report()

    base_aid = r.model_dir(cfg.model.path)
    lora = T.lora_spec(cfg.lora)
    policy = load_policy(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=str(device),
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora=lora,
    )

    packed = cfg.data.packing and splittable(policy)

    # ---------------------------------------------------------------- reference
    needs_ref = cfg.loss.type not in REFERENCE_FREE
    ref_model, ref_aid = None, None
    if needs_ref:
        if lora is not None:
            ref_aid = base_aid  # the adapter-disabled policy is the base model
        else:
            ref_path = cfg.reference.path or cfg.model.path
            ref_aid = r.model_dir(ref_path, role="reference_model")
            ref_model = load_reference(
                ref_path,
                dtype=cfg.model.dtype,
                device=str(device),
                attn_implementation=cfg.model.attn_implementation,
            )

    # A separately loaded reference may be another architecture: its own check, made once.
    ref_packed = packed if ref_model is None else cfg.data.packing and splittable(ref_model)

    def reference_logps(items: Sequence[B.EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs ``(B,)`` of chosen and rejected completions, without gradients."""
        model = ref_model if ref_model is not None else policy
        ctx = reference_mode(policy) if ref_model is None else nullcontext()
        was_training = model.training
        model.eval()
        with torch.no_grad(), ctx:
            out = _forward(model, items, pad_id, device, ref_packed)
        model.train(was_training)
        return out.chosen_logps.detach(), out.rejected_logps.detach()

    cached: dict[str, tuple[float, float]] = {}
    ref_artifact = None
    if needs_ref and cfg.reference.precompute:
        key = {
            "pairs": train_aid,
            "eval": eval_aid,
            "eval_fraction": None if eval_aid else cfg.data.eval_fraction,
            "reference_model": ref_aid,
            "tokenizer": str(cfg.model.tokenizer or cfg.model.path),
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
            "dtype": cfg.model.dtype,
        }
        cache_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        hits = [a for a in r.store.find(kind=REF_KIND) if a.meta.get("cache_key") == cache_key]
        if hits:
            ref_artifact = hits[0].id
            for row in r.store.read_dataset(ref_artifact).to_pylist():
                cached[row["id"]] = (row["chosen_logps"], row["rejected_logps"])
        else:
            rows = []
            everything = train + held
            for i in range(0, len(everything), cfg.train.batch_size):
                chunk = everything[i : i + cfg.train.batch_size]
                rc, rr = reference_logps(chunk)
                for p, a, b in zip(chunk, rc.tolist(), rr.tolist(), strict=True):
                    cached[p.id] = (a, b)
                    rows.append({"id": p.id, "chosen_logps": a, "rejected_logps": b})
            parents = [(train_aid, "pairs"), (ref_aid, "reference_model")]
            if eval_aid:
                parents.append((eval_aid, "eval_pairs"))
            ref_artifact = r.store.put_dataset(
                rows,
                kind=REF_KIND,
                name=f"ref-logps-{train_aid[:12]}",
                meta={"cache_key": cache_key, **key},
                parents=parents,
                run_id=r.run_id,
            )
        r.add_input(ref_artifact, "reference_logps")

    def reference_for(items: Sequence[B.EncodedPair]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not needs_ref:
            return None, None
        if cached:
            vals = torch.tensor([cached[p.id] for p in items], dtype=torch.float32, device=device)  # (B, 2)
            return vals[:, 0], vals[:, 1]
        return reference_logps(items)

    def evaluate() -> dict[str, float]:
        """Held-out loss, implicit rewards, margin and chosen-over-rejected accuracy."""
        if not held:
            return {}
        policy.eval()
        cr_all, rr_all, loss_sum = [], [], 0.0
        with torch.no_grad():
            for i in range(0, len(held), cfg.train.batch_size):
                chunk = held[i : i + cfg.train.batch_size]
                loss, cr, rr = _loss(
                    cfg, _forward(policy, chunk, pad_id, device, packed), *reference_for(chunk)
                )
                loss_sum += float(loss) * len(chunk)
                cr_all.append(cr.float().cpu())
                rr_all.append(rr.float().cpu())
        policy.train()
        cr, rr = torch.cat(cr_all), torch.cat(rr_all)
        return {
            "eval/loss": loss_sum / len(held),
            "eval/rewards/chosen": float(cr.mean()),
            "eval/rewards/rejected": float(rr.mean()),
            "eval/rewards/margin": float((cr - rr).mean()),
            "eval/rewards/accuracy": float((cr > rr).float().mean()),
        }

    sampler = B.make_sampler(
        [2 * p.length for p in train], cfg.train.batch_size, 2 * cfg.data.max_length, cfg.train.seed
    )
    total = B.steps_for(sampler, cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps)
    optimizer = T.build_optimizer(policy, cfg.optim)
    scheduler = T.build_scheduler(optimizer, cfg.optim, total)
    ckpt = r.checkpoints(retention=T.retention(cfg.checkpoint))
    start, initial = 0, {}
    resumed = ckpt.load_latest()
    if resumed is not None:
        data_state = resumed.restore(policy, optimizer, scheduler)
        sampler.load_state_dict(data_state["sampler"])
        initial = data_state.get("initial_eval", {})
        start = resumed.step
    else:
        with torch.random.fork_rng(devices=[]):  # evaluating must not shift the training RNG stream
            initial = evaluate()
        if initial:
            r.log(0, initial)
    batches = B.endless(sampler)

    # ---------------------------------------------------------------- loop
    metrics: dict[str, float] = {}
    timer = T.StepTimer()
    keys = ("loss", "rewards/margin", "rewards/accuracy", "pairs_per_sec")
    with ckpt, r.stopper() as stop, r.progress(total, keys, completed=start) as bar:
        for step in range(start + 1, total + 1):
            micro = [[train[i] for i in next(batches)] for _ in range(cfg.train.grad_accum)]
            n_pairs = sum(len(m) for m in micro)
            loss_sum = torch.zeros((), device=device)
            cr_all, rr_all, lc, lr_ = [], [], 0.0, 0.0
            for items in micro:
                out = _forward(policy, items, pad_id, device, packed)
                loss, cr, rr = _loss(cfg, out, *reference_for(items))
                # Each loss is a mean over its micro-batch; weight by its share of the step's pairs.
                loss = loss * (len(items) / n_pairs)
                check_finite(loss, step, [p.id for p in items], ckpt)
                loss.backward()
                loss_sum += loss.detach()
                cr_all.append(cr.float())
                rr_all.append(rr.float())
                lc += float(out.chosen_logps.detach().sum())
                lr_ += float(out.rejected_logps.detach().sum())
            grad_norm = T.clip_and_step(policy, optimizer, cfg.optim.max_grad_norm)
            scheduler.step()
            cr, rr = torch.cat(cr_all), torch.cat(rr_all)
            metrics = {
                "loss": float(loss_sum),
                "rewards/chosen": float(cr.mean()),
                "rewards/rejected": float(rr.mean()),
                "rewards/margin": float((cr - rr).mean()),
                "rewards/accuracy": float((cr > rr).float().mean()),
                "logps/chosen": lc / n_pairs,
                "logps/rejected": lr_ / n_pairs,
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                "num_pairs": n_pairs,
                "pairs_per_sec": n_pairs / timer.lap(),
            }
            if step % cfg.train.log_every == 0 or step == total:
                r.log(step, metrics)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                with torch.random.fork_rng(devices=[]):
                    r.log(step, evaluate())
            bar.update(step, metrics)
            state = {"sampler": sampler.state_dict(), "initial_eval": initial}
            if r.end_step(
                ckpt,
                stop,
                step,
                total,
                policy,
                optimizer,
                scheduler,
                state,
                metrics,
                cfg.train.save_every,
                cfg.checkpoint.async_save,
            ):
                return {"run_id": r.run_id, "stopped": True, "step": step, "run_dir": str(r.run_dir)}

    # ---------------------------------------------------------------- evaluate and register
    final_eval = evaluate()
    if final_eval:
        r.log(total, final_eval)
    out_dir = export_hf(policy, tok, r.run_dir / "final")
    ckpt_id = r.register_checkpoint(
        out_dir, meta={"adapter_only": cfg.lora.enabled, "base_model": cfg.model.path, "loss": cfg.loss.type}
    )
    summary = {
        "metrics": {
            **metrics,
            **final_eval,
            **{k.replace("eval/", "eval_initial/"): v for k, v in initial.items()},
        },
        "steps": total,
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "truncated_responses": counter.count,
        "reference_logps": ref_artifact,
    }
    r.finish(summary, outputs={"checkpoint": ckpt_id})
    return {
        "run_id": r.run_id,
        "checkpoint": ckpt_id,
        "checkpoint_dir": str(out_dir),
        "metrics": summary["metrics"],
        "reference_logps": ref_artifact,
        "run_dir": str(r.run_dir),
        "truncated_examples": counter.count,
    }
