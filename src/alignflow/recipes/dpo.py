"""Direct preference optimisation and its family (cDPO, rDPO, IPO, SLiC hinge, SimPO, ORPO), LoRA or full.

Reads top to bottom: setup (run, pairs, policy) → reference (model, log-probs cached or on demand) →
optimizer and resume (with the initial evaluation) → loop (one forward over ``[chosen; rejected]``, the
configured loss from :func:`alignflow.train.losses.dpo_loss`, NaN guard, metrics, graceful stop) →
evaluate (implicit reward margin, chosen/rejected rewards and accuracy on held-out pairs, before and after)
→ register the HF checkpoint. Metrics: ``docs/metrics.md#dpo``.

Reference model: in LoRA mode the policy with its adapters disabled (:func:`alignflow.models.reference_mode`);
in full fine-tuning a frozen copy loaded from ``reference.path`` (default ``model.path``). With
``reference.precompute: true`` reference log-probs are computed once per (pairs dataset, reference model,
tokenisation) and stored as a ``ref_logps`` dataset artifact with lineage edges to both; a later run with
the same inputs reuses it (:class:`alignflow.train.reference.ReferenceLogps` holds the table). SimPO and
ORPO are reference-free and skip all of this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

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
    SequenceEncoder,
    TruncationCounter,
    encode_pairs,
    endless,
    make_sampler,
    pack_pairs,
    pad_batch,
    rows_to_pairs,
    split_by_prompt,
    steps_for,
)
from alignflow.errors import DataFormatError
from alignflow.models import load_policy, load_reference, load_tokenizer
from alignflow.recipes.common import Run, check_finite, check_world, console, set_seed, start_run
from alignflow.store import Store
from alignflow.train.accum import example_mean_share
from alignflow.train.distributed import DistContext, init_distributed
from alignflow.train.distributed import export_hf as export_model
from alignflow.train.logprobs import PairLogps, concatenated_forward, splittable, tree_pair_logps
from alignflow.train.losses import DPO_LOSS_TYPES, dpo_loss, dpo_soft_label_loss
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
from alignflow.train.reference import ReferenceLogps, cache_key, reference_forward

REFERENCE_FREE = ("simpo", "orpo")
REF_KIND = "ref_logps"


class DPOLossSection(StrictModel):
    type: Literal["sigmoid", "cdpo", "robust", "ipo", "hinge", "simpo", "orpo"] = Field(
        default="sigmoid", description=f"Preference loss: {', '.join(DPO_LOSS_TYPES)}."
    )
    beta: float = Field(default=0.1, gt=0.0, description="Inverse temperature (ORPO: lambda; SimPO: beta).")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5, description="cDPO/rDPO label-flip rate.")
    gamma: float = Field(default=0.5, description="SimPO target reward margin.")
    soft_labels: bool = Field(
        default=False,
        description="sigmoid only: treat each pair's weight column as P(chosen better) (the aggregated soft label "
        "of `annotate export --as pairs`): cDPO with each pair's own flip rate 1 - weight.",
    )

    @model_validator(mode="after")
    def _soft_labels_need_sigmoid(self) -> DPOLossSection:
        if self.soft_labels and (self.type != "sigmoid" or self.label_smoothing > 0):
            raise ValueError(
                "soft_labels applies to type 'sigmoid' without label_smoothing (a soft label is a per-pair "
                f"label smoothing); got type {self.type!r}, label_smoothing {self.label_smoothing}"
            )
        return self


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
    data: PreferenceDataSection
    loss: DPOLossSection = Field(default_factory=DPOLossSection)
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=5e-6))
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)


def run(cfg: DPOConfig, store: Store | None = None) -> dict[str, Any]:
    """Train, evaluate and register a DPO-family checkpoint (full weights or a LoRA adapter).

    Under torchrun the policy trains data-parallel (DDP or FSDP2); the frozen reference model stays
    unwrapped and replicated on every rank, and the held-out evaluation runs identically on every rank.
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
class _Pairs:
    """Encoded train and held-out pairs and the dataset artifacts they came from (the cache key needs them)."""

    train: list[EncodedPair]
    held: list[EncodedPair]
    train_aid: str
    eval_aid: str | None


def _run(cfg: DPOConfig, r: Run) -> dict[str, Any]:
    # ---------------------------------------------------------------- setup
    set_seed(cfg.train.seed)
    dist = r.dist
    device = dist.device(resolve_device(cfg.model))
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    pad_id = tok.pad_token_id
    counter = TruncationCounter("responses")
    pairs = _load_pairs(cfg, r, tok, counter)
    train, held = pairs.train, pairs.held

    base_aid = r.model_dir(cfg.model.path)
    lora = lora_spec(cfg.lora)
    policy = load_policy(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=str(device),
        attn_implementation=cfg.model.attn_implementation,
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        lora=lora,
    )
    packed = cfg.data.packing and splittable(policy)
    if packed and dist.enabled:
        # The packed forward calls the trunk and the LM head separately, past DDP's/FSDP's forward (no
        # gradient sync, sharded parameters); the padded forward gives the same log-probs up to float order.
        packed = False
        if dist.is_main:
            console.print("data.packing is off under torchrun (the packed pair forward bypasses DDP/FSDP)")

    def forward(model: Any, items: Sequence[EncodedPair], packed: bool = packed) -> PairLogps:
        """Pair log-probs of ``model``: packed when the policy allows it, unless the caller says otherwise."""
        return _pair_logps(model, items, pad_id, device, packed)

    # ---------------------------------------------------------------- reference
    reference: ReferenceLogps | None = None
    ref_artifact = None
    if cfg.loss.type not in REFERENCE_FREE:
        reference, ref_aid = _reference(
            cfg, r, policy, base_aid if lora is not None else None, forward, device
        )
        if cfg.reference.precompute:
            ref_artifact = _precomputed_reference(cfg, r, reference, pairs, ref_aid)

    def evaluate() -> dict[str, float]:
        return _evaluate(cfg, policy, held, forward, reference)

    # Wrapped after the reference is ready: a LoRA reference is the (unwrapped) policy with its adapters off,
    # and precomputing runs before any collective forward. ``evaluate`` sees the wrapped policy.
    policy = dist.wrap(policy, device)  # DDP or FSDP2 under torchrun; the policy itself in one process
    # ---------------------------------------------------------------- optimizer and resume
    plan = resolve_token_budget(
        cfg.train,
        policy,
        cfg.model,
        2 * cfg.data.max_length,
        reference=None if reference is None else ("cached" if reference.precomputed else "live"),
        state_dir=r.run_dir,
    )
    sampler = make_sampler(
        [2 * p.length for p in train],
        cfg.train.batch_size,
        2 * cfg.data.max_length,
        cfg.train.seed,
        token_budget=plan.tokens_per_batch,
    )
    grad_accum = plan.grad_accum  # train.grad_accum, or what train.tokens_per_batch=auto raised it to
    total = steps_for(sampler, grad_accum, cfg.train.epochs, cfg.train.max_steps)
    optimizer = build_optimizer(policy, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    ckpt = r.checkpoints(retention=retention(cfg.checkpoint))
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
    batches = endless(sampler)

    # ---------------------------------------------------------------- loop
    metrics: dict[str, float] = {}
    timer = StepTimer()
    keys = ("loss", "rewards/margin", "rewards/accuracy", "pairs_per_sec")
    with ckpt, r.stopper() as stop, r.progress(total, keys, completed=start) as bar:
        for step in range(start + 1, total + 1):
            micro = [[train[i] for i in next(batches)] for _ in range(grad_accum)]
            stats = _accumulate_gradients(cfg, policy, micro, forward, reference, step, ckpt, dist)
            grad_norm = clip_and_step(policy, optimizer, cfg.optim.max_grad_norm)
            scheduler.step()  # once per optimizer step
            n_pairs = sum(len(m) for m in micro)
            metrics = {
                **stats,
                "grad_norm": grad_norm,
                "lr": scheduler.get_last_lr()[0],
                "num_pairs": n_pairs,
                "pairs_per_sec": n_pairs / timer.lap(),
            }
            if step % cfg.train.log_every == 0 or step == total:
                r.log(step, metrics)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total:
                with torch.random.fork_rng(devices=[]):
                    evaluated = evaluate()
                r.log(step, evaluated)
                metrics = {**metrics, **evaluated}  # so checkpoint.best_metric may name an eval metric
            bar.update(step, metrics)
            state = {"sampler": sampler.state_dict(), "initial_eval": initial}
            # a best checkpoint when checkpoint.best_metric improved (eval steps rarely fall on save_every)
            ckpt.save_if_best(
                step,
                policy,
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
                policy,
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
    out_dir = export_model(dist, policy, tok, r.run_dir / "final")
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
        "batch_plan": plan.as_dict(),
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


# ---------------------------------------------------------------------------------------------------------------------
# phases


def _load_pairs(cfg: DPOConfig, r: Run, tok: Any, counter: TruncationCounter) -> _Pairs:
    """Train and held-out pairs (``data.eval``, or split off by prompt), encoded for the policy."""
    train_aid = r.dataset(cfg.data.train, cfg.data.format)
    pairs = rows_to_pairs(r.store.read_dataset(train_aid).to_pylist(), cfg.data.format)
    eval_aid = None
    if cfg.data.eval:
        eval_aid = r.dataset(cfg.data.eval, cfg.data.format, role="eval_dataset")
        train_pairs = pairs
        eval_pairs = rows_to_pairs(r.store.read_dataset(eval_aid).to_pylist(), cfg.data.format)
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.data.eval_fraction, lambda p: p.prompt)
    if not train_pairs:
        raise DataFormatError(
            f"{cfg.data.train}: no training pairs left after the eval split ({len(pairs)} pairs)"
        )
    if cfg.loss.soft_labels:
        bad = next((p for p in train_pairs if not 0.0 <= p.weight <= 1.0), None)
        if bad is not None:
            raise DataFormatError(
                f"{cfg.data.train}: pair {bad.id!r} field 'weight' = {bad.weight} is not a probability; "
                "loss.soft_labels=true needs weights in [0, 1]"
            )
    enc = SequenceEncoder(tok, cfg.data.max_length, cfg.data.max_prompt_length, counter=counter)
    train, held = encode_pairs(train_pairs, enc), encode_pairs(eval_pairs, enc)
    counter.report()
    return _Pairs(train, held, train_aid, eval_aid)


def _pair_logps(
    model: Any, items: Sequence[EncodedPair], pad_id: int, device: torch.device, packed: bool
) -> PairLogps:
    """Summed and mean completion log-probs of chosen and rejected, ``(B,)`` each, in one forward."""
    if packed:  # the prompt once per pair, the LM head only where a completion token is predicted
        return tree_pair_logps(model, pack_pairs(items, pad_id, device))
    c = pad_batch([p.chosen for p in items], pad_id, device)
    rj = pad_batch([p.rejected for p in items], pad_id, device)
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


def _loss(
    cfg: DPOConfig,
    out: PairLogps,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    items: Sequence[EncodedPair] | None = None,
):
    """The configured loss on one batch: ``(loss, chosen_rewards (B,), rejected_rewards (B,))``."""
    kind = cfg.loss.type
    if cfg.loss.soft_labels and items is not None and ref_chosen is not None and ref_rejected is not None:
        p = torch.tensor(
            [it.weight for it in items], dtype=out.chosen_logps.dtype, device=out.chosen_logps.device
        )
        return dpo_soft_label_loss(
            out.chosen_logps, out.rejected_logps, ref_chosen, ref_rejected, p, beta=cfg.loss.beta
        )
    mean = kind in REFERENCE_FREE  # SimPO/ORPO take per-token mean log-probs
    return dpo_loss(
        kind,
        out.chosen_logps_mean if mean else out.chosen_logps,
        out.rejected_logps_mean if mean else out.rejected_logps,
        ref_chosen,
        ref_rejected,
        beta=cfg.loss.beta,
        label_smoothing=cfg.loss.label_smoothing,
        gamma=cfg.loss.gamma,
        chosen_lengths=out.chosen_num_tokens if kind == "ipo" else None,
        rejected_lengths=out.rejected_num_tokens if kind == "ipo" else None,
        chosen_nll=out.chosen_nll if kind == "orpo" else None,
    )


def _reference(
    cfg: DPOConfig, r: Run, policy: Any, base_aid: str | None, forward: Any, device: torch.device
) -> tuple[ReferenceLogps, str]:
    """The reference log-probs source and the reference model's artifact id.

    LoRA (``base_aid`` given): the adapter-disabled policy, whose weights are the base model. Full
    fine-tuning: a frozen model from ``reference.path``; it may be another architecture, so whether pairs
    can be packed for it is checked on it, once.
    """
    if base_aid is not None:
        return ReferenceLogps(reference_forward(policy, None, forward), device), base_aid
    ref_path = cfg.reference.path or cfg.model.path
    ref_aid = r.model_dir(ref_path, role="reference_model")
    ref_model = load_reference(
        ref_path, dtype=cfg.model.dtype, device=str(device), attn_implementation=cfg.model.attn_implementation
    )
    ref_packed = cfg.data.packing and splittable(ref_model)

    def ref_forward(model: Any, items: Sequence[EncodedPair]) -> PairLogps:
        return forward(model, items, packed=ref_packed)

    return ReferenceLogps(reference_forward(policy, ref_model, ref_forward), device), ref_aid


def _precomputed_reference(
    cfg: DPOConfig, r: Run, reference: ReferenceLogps, pairs: _Pairs, ref_aid: str
) -> str:
    """Fill ``reference`` from the stored ``ref_logps`` artifact of the same inputs, or compute and store it.

    Returns the artifact id, recorded as this run's ``reference_logps`` input.
    """
    spec = {
        "pairs": pairs.train_aid,
        "eval": pairs.eval_aid,
        "eval_fraction": None if pairs.eval_aid else cfg.data.eval_fraction,
        "reference_model": ref_aid,
        "tokenizer": str(cfg.model.tokenizer or cfg.model.path),
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "dtype": cfg.model.dtype,
    }
    key = cache_key(spec)
    # Under torchrun rank 0 decides whether the cache hits and alone stores a new table; every rank then
    # loads or computes the same table (the computation is replicated: no collective, whatever the strategy).
    hit = None
    if r.dist.is_main:
        hits = [a for a in r.store.find(kind=REF_KIND) if a.meta.get("cache_key") == key]
        hit = hits[0].id if hits else None
    hit = r.dist.broadcast(hit)
    if hit is not None:
        artifact = hit
        reference.load(r.store.read_dataset(artifact).to_pylist())
    else:
        rows = reference.precompute(pairs.train + pairs.held, cfg.train.batch_size)
        parents = [(pairs.train_aid, "pairs"), (ref_aid, "reference_model")]
        if pairs.eval_aid:
            parents.append((pairs.eval_aid, "eval_pairs"))
        artifact = None
        if r.dist.is_main:
            artifact = r.store.put_dataset(
                rows,
                kind=REF_KIND,
                name=f"ref-logps-{pairs.train_aid[:12]}",
                meta={"cache_key": key, **spec},
                parents=parents,
                run_id=r.run_id,
            )
        artifact = r.dist.broadcast(artifact)
    r.add_input(artifact, "reference_logps")
    return artifact


def _reference_for(
    reference: ReferenceLogps | None, items: Sequence[EncodedPair]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if reference is None else reference(items)


def _accumulate_gradients(
    cfg: DPOConfig,
    policy: Any,
    micro: list[list[EncodedPair]],
    forward: Any,
    reference: ReferenceLogps | None,
    step: int,
    ckpt: Any,
    dist: DistContext | None = None,
) -> dict[str, float]:
    """Forward and backward over the step's micro-batches; the step's loss, rewards and log-prob metrics.

    The step's loss is the mean over ALL its pairs (:func:`alignflow.train.accum.example_mean_share`). Under
    torchrun every rank gets ALL the step's micro-batches (the same seeded sampler), so ``n_pairs`` is the
    global count; each rank runs only its share (``dist.shard``) and the metrics are sums over all ranks.
    """
    dist = dist or DistContext()
    n_pairs = sum(len(m) for m in micro)
    device = next(policy.parameters()).device
    loss_sum = torch.zeros((), device=device)
    chosen_rewards, rejected_rewards = [], []
    chosen_logps_sum = rejected_logps_sum = 0.0
    mine = dist.shard(micro)  # this rank's micro-batches
    for j, items in enumerate(mine):
        with dist.grad_sync(policy, sync=j == len(mine) - 1), dist.autocast(device):
            out = forward(policy, items)
            loss, chosen_reward, rejected_reward = _loss(cfg, out, *_reference_for(reference, items), items)
            loss = example_mean_share(loss, len(items), n_pairs)
            check_finite(loss, step, [p.id for p in items], ckpt)
            dist.backward(loss)
        loss_sum += loss.detach()
        chosen_rewards.append(chosen_reward.detach().float())
        rejected_rewards.append(rejected_reward.detach().float())
        chosen_logps_sum += float(out.chosen_logps.detach().sum())
        rejected_logps_sum += float(out.rejected_logps.detach().sum())
    chosen_reward, rejected_reward = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
    # Sums over this rank's pairs, then over all ranks (one collective): means over the step's n_pairs.
    sums = torch.tensor(
        [
            float(loss_sum),
            float(chosen_reward.sum()),
            float(rejected_reward.sum()),
            float((chosen_reward > rejected_reward).sum()),
            chosen_logps_sum,
            rejected_logps_sum,
        ],
        dtype=torch.float64,
    )
    loss, chosen, rejected, wins, c_logps, r_logps = dist.sum_tensor(sums).tolist()
    return {
        "loss": loss,
        "rewards/chosen": chosen / n_pairs,
        "rewards/rejected": rejected / n_pairs,
        "rewards/margin": (chosen - rejected) / n_pairs,
        "rewards/accuracy": wins / n_pairs,
        "logps/chosen": c_logps / n_pairs,
        "logps/rejected": r_logps / n_pairs,
    }


def _evaluate(
    cfg: DPOConfig, policy: Any, held: list[EncodedPair], forward: Any, reference: ReferenceLogps | None
) -> dict[str, float]:
    """Held-out loss, implicit rewards, margin and chosen-over-rejected accuracy."""
    if not held:
        return {}
    policy.eval()
    chosen_rewards, rejected_rewards, loss_sum = [], [], 0.0
    with torch.no_grad():
        for i in range(0, len(held), cfg.train.batch_size):
            chunk = held[i : i + cfg.train.batch_size]
            loss, chosen_reward, rejected_reward = _loss(
                cfg, forward(policy, chunk), *_reference_for(reference, chunk)
            )
            loss_sum += float(loss) * len(chunk)
            chosen_rewards.append(chosen_reward.float().cpu())
            rejected_rewards.append(rejected_reward.float().cpu())
    policy.train()
    chosen_reward, rejected_reward = torch.cat(chosen_rewards), torch.cat(rejected_rewards)
    return {
        "eval/loss": loss_sum / len(held),
        "eval/rewards/chosen": float(chosen_reward.mean()),
        "eval/rewards/rejected": float(rejected_reward.mean()),
        "eval/rewards/margin": float((chosen_reward - rejected_reward).mean()),
        "eval/rewards/accuracy": float((chosen_reward > rejected_reward).float().mean()),
    }
