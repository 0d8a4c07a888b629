"""Supervised fine-tuning: next-token NLL on completion tokens only, optional packing, LoRA or full.

Reads top to bottom: setup (run, data, model, optimizer, resume) → loop (micro-batches, global-token
normalisation, NaN guard, metrics, graceful stop) → checkpoint → evaluate (held-out loss, perplexity) →
register the HF-format checkpoint with lineage. Metric names are documented in ``docs/metrics.md#sft``.

Gradient accumulation: the loss of an optimizer step is the mean NLL over ALL target tokens of its
``train.grad_accum`` micro-batches, so each micro-batch's summed NLL is divided by the step's global token
count (``num_items_in_batch``; see :mod:`alignflow.train.accum`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from alignflow.config import (
    CheckpointSection,
    DataSection,
    LoraSection,
    ModelSection,
    OptimSection,
    StageConfig,
    TrainSection,
    register_stage,
)
from alignflow.data.encode import (
    SequenceEncoder,
    TruncationCounter,
    endless,
    make_sampler,
    model_kwargs,
    pad_batch,
    sft_prompt_key,
    split_by_prompt,
    steps_for,
)
from alignflow.data.packing import pack_examples
from alignflow.errors import DataFormatError
from alignflow.models import load_policy, load_tokenizer
from alignflow.recipes.common import Run, check_finite, check_world, set_seed, start_run
from alignflow.store import Store
from alignflow.train.accum import count_target_tokens, global_token_mean_loss, sum_token_nll
from alignflow.train.distributed import export_hf as export_model
from alignflow.train.distributed import init_distributed
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


@register_stage("sft")
class SFTConfig(StageConfig):
    """Supervised fine-tuning (``alignflow sft``)."""

    stage: Literal["sft"] = "sft"
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)


def run(cfg: SFTConfig, store: Store | None = None) -> dict[str, Any]:
    """Train, evaluate and register an SFT checkpoint; returns run id, checkpoint id/dir and metrics.

    A SIGINT/SIGTERM checkpoints and returns ``{"stopped": True, ...}``; re-running with the same
    ``output_dir`` resumes exactly.
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


def _load_rows(r: Run, ref: str, role: str) -> list[dict[str, Any]]:
    aid = r.dataset(ref, "sft", role=role)
    return r.store.read_dataset(aid).to_pylist()


def _run(cfg: SFTConfig, r: Run) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup
    set_seed(cfg.train.seed)
    dist = r.dist
    device = dist.device(resolve_device(cfg.model))
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)

    rows = _load_rows(r, cfg.data.train, "dataset")
    if cfg.data.eval:
        train_rows, eval_rows = rows, _load_rows(r, cfg.data.eval, "eval_dataset")
    else:
        train_rows, eval_rows = split_by_prompt(rows, cfg.data.eval_fraction, sft_prompt_key)
    if not train_rows:
        raise DataFormatError(
            f"{cfg.data.train}: no training examples left after the eval split "
            f"(data.eval_fraction={cfg.data.eval_fraction}, {len(rows)} rows)"
        )
    counter = TruncationCounter("sft examples")
    enc = SequenceEncoder(tok, cfg.data.max_length, cfg.data.max_prompt_length, counter=counter)
    train = [enc.encode_sft_row(x) for x in train_rows]
    held = [enc.encode_sft_row(x) for x in eval_rows]
    counter.report()
    train_ids = [str(x["id"]) for x in train_rows]

    r.model_dir(cfg.model.path)
    model = load_policy(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=str(device),
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora=lora_spec(cfg.lora),
    )
    model = dist.wrap(model, device)  # DDP or FSDP2 under torchrun; the model itself in one process
    plan = resolve_token_budget(cfg.train, model, cfg.model, cfg.data.max_length, state_dir=r.run_dir)
    sampler = make_sampler(
        [len(e.input_ids) for e in train],
        cfg.train.batch_size,
        cfg.data.max_length,
        cfg.train.seed,
        packed=cfg.data.packing,
        token_budget=plan.tokens_per_batch,
    )
    grad_accum = plan.grad_accum  # train.grad_accum, or what train.tokens_per_batch=auto raised it to
    total = steps_for(sampler, grad_accum, cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)

    ckpt = r.checkpoints(retention=retention(cfg.checkpoint))
    start = 0
    resumed = ckpt.load_latest()
    if resumed is not None:
        sampler.load_state_dict(resumed.restore(model, optimizer, scheduler)["sampler"])
        start = resumed.step
    batches = endless(sampler)

    def collate(idx: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs and labels ``(B, T)`` of one micro-batch, packed into rows or right-padded."""
        items = [train[i] for i in idx]
        if cfg.data.packing:
            pb = pack_examples(
                [{"input_ids": e.input_ids, "labels": e.labels} for e in items],
                cfg.data.max_length,
                tok.pad_token_id,
            )
            inputs = pb.model_inputs()
            if cfg.model.attn_implementation == "eager":  # eager adds the mask instead of selecting with it
                inputs["attention_mask"] = pb.additive_mask(next(model.parameters()).dtype)
            return {k: v.to(device) for k, v in inputs.items()}, pb.labels.to(device)
        batch = pad_batch(items, tok.pad_token_id, device)
        return model_kwargs(batch), batch["labels"]

    def evaluate() -> dict[str, float]:
        """Held-out mean token NLL over every eval target token, and its perplexity."""
        if not held:
            return {}
        model.eval()
        nll, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(held), cfg.train.batch_size):
                batch = pad_batch(held[i : i + cfg.train.batch_size], tok.pad_token_id, device)
                logits = model(**model_kwargs(batch), use_cache=False).logits
                nll += float(sum_token_nll(logits, batch["labels"]))
                n += count_target_tokens(batch["labels"])
        model.train()
        loss = nll / max(n, 1)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 700.0)), "eval/num_tokens": n}

    # ---------------------------------------------------------------- loop
    metrics: dict[str, float] = {}
    timer = StepTimer()
    with ckpt, r.stopper() as stop, r.progress(total, ("loss", "tokens_per_sec"), completed=start) as bar:
        for step in range(start + 1, total + 1):
            micro = [next(batches) for _ in range(grad_accum)]
            collated = [collate(idx) for idx in micro]
            n_target = count_target_tokens([labels for _, labels in collated])
            if n_target == 0:
                raise DataFormatError(
                    f"step {step}: no completion tokens in the batch (ids {[train_ids[i] for m in micro for i in m]})"
                )
            loss_sum = torch.zeros((), device=device)
            n_tokens = 0
            mine = dist.shard(list(zip(micro, collated, strict=True)))  # this rank's micro-batches
            for j, (idx, (inputs, labels)) in enumerate(mine):
                with dist.grad_sync(model, sync=j == len(mine) - 1), dist.autocast(device):
                    logits = model(**inputs, use_cache=False).logits  # (B, T, V)
                    loss = global_token_mean_loss(logits, labels, n_target)
                    check_finite(loss, step, [train_ids[i] for i in idx], ckpt)
                    dist.backward(loss)
                loss_sum += loss.detach()
                n_tokens += sum(len(train[i].input_ids) for i in idx)
            loss_sum = torch.tensor(dist.sum(loss_sum))
            n_tokens = int(dist.sum(n_tokens))
            grad_norm = clip_and_step(model, optimizer, cfg.optim.max_grad_norm)
            scheduler.step()  # once per optimizer step
            dt = timer.lap()
            metrics = {
                "loss": float(loss_sum),
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                "num_tokens": n_tokens,
                "num_target_tokens": n_target,
                "tokens_per_sec": n_tokens / dt,
                "epoch": sampler.epoch + sampler.position / max(len(sampler), 1),
            }
            if step % cfg.train.log_every == 0 or step == total:
                r.log(step, metrics)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                evaluated = evaluate()
                r.log(step, evaluated)
                metrics = {**metrics, **evaluated}  # so checkpoint.best_metric may name an eval metric
            bar.update(step, metrics)
            state = {"sampler": sampler.state_dict()}
            # a best checkpoint when checkpoint.best_metric improved (eval steps rarely fall on save_every)
            ckpt.save_if_best(
                step,
                model,
                optimizer,
                scheduler,
                state,
                r.config,
                metrics,
                blocking=not cfg.checkpoint.async_save,
            )
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
                    "run_dir": str(r.run_dir),
                    "signal": r.stop_signal,
                }

    # ---------------------------------------------------------------- evaluate and register
    final_eval = evaluate()
    if final_eval:
        r.log(total, final_eval)
    out_dir = export_model(dist, model, tok, r.run_dir / "final")
    ckpt_id = r.register_checkpoint(
        out_dir, meta={"adapter_only": cfg.lora.enabled, "base_model": cfg.model.path, "steps": total}
    )
    summary = {
        "metrics": {**metrics, **final_eval},
        "steps": total,
        "train_examples": len(train),
        "eval_examples": len(held),
        "truncated_examples": counter.count,
        "batch_plan": plan.as_dict(),
    }
    r.finish(summary, outputs={"checkpoint": ckpt_id})
    return {
        "run_id": r.run_id,
        "checkpoint": ckpt_id,
        "checkpoint_dir": str(out_dir),
        "metrics": summary["metrics"],
        "run_dir": str(r.run_dir),
        "truncated_examples": counter.count,
    }
