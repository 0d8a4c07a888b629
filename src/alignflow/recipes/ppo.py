"""On-policy RLHF: PPO with a critic (GAE), or critic-free RLOO / GRPO, over prompts from a dataset artifact.

Reads top to bottom: setup (run, prompts, policy, reference, critic, reward source, optimizer, resume) → loop,
one step in named phases (``sample → score → make_experience → ppo_update → log → end_step``) → evaluate
(monitor on held-out prompts) → register the final policy with lineage. Metric names are documented in
``docs/metrics.md#ppo``. The components are library code: prompts and their stream in
:mod:`alignflow.data.prompts`, the forwards (packed or padded) in :mod:`alignflow.rollout.forward`, the
experience in :mod:`alignflow.rollout.experience`, the arithmetic in :mod:`alignflow.train`.

One step (Ouyang et al. 2022, "Training language models to follow instructions with human feedback", sec. 3.5;
Ziegler et al. 2019):

1. Sample ``rollout.batch_size`` prompts, each ``rollout.num_generations`` times (rows grouped per prompt).
2. Generate with the KV-cache sampler (:func:`alignflow.rollout.sample`); its log-probs are the "old" log-probs
   ``log pi_old`` (temperature-scaled, see :mod:`alignflow.rollout.generation`) unless
   ``rollout.recompute_logprobs`` asks for a fresh forward in the training layout.
3. Score the decoded responses (a reward function or reward model ensemble), one score per head; combine the
   heads (``reward.combine``: weights, and constraints with Lagrange multipliers, Moskovitz et al. 2023, see
   :mod:`alignflow.train.constraints`) or take the one head; shape the scores (missing-EOS / length
   penalties, running normalisation, clipping). The multipliers then take a step on this batch's head means.
4. Reference log-probs (the frozen SFT model, or the LoRA policy with adapters off) give the per-token KL.
5. Advantages: ``gae`` — per-token reward ``-beta * KL_t`` plus the score at the last token, GAE over the
   critic's values, whitened; ``rloo`` — sequence reward ``score - beta * sum_t KL_t`` with the leave-one-out
   baseline (Ahmadian et al. 2024); ``grpo`` — group-normalised scores, with ``beta * KL`` (k3) as a loss
   term instead of a reward term (Shao et al. 2024, eq. 3).
6. ``ppo.epochs`` passes over shuffled minibatches with the clipped surrogate (and the clipped value loss for
   ``gae``); an epoch stops early when the approximate KL to ``pi_old`` exceeds ``ppo.target_kl``. The
   learning-rate schedule steps once per step (rollout round), not once per minibatch.

Randomness per step, not per process: a step's sampling draws come from a generator seeded by (train.seed,
step), one uniform per GLOBAL row and decode step, and each epoch's minibatch order from one seeded by (seed,
step, epoch). Results therefore depend neither on the world size nor on the RNG state a resume restores.

Under torchrun (``alignflow ppo CONFIG --nproc N``, ``train.distributed.strategy: ddp``) every process holds
the policy, reference, critic and reward source (replicated) and sees the same step prompts; process ``r``
samples the prompt groups ``r, r + N, ...`` (whole groups: GRPO/RLOO baselines stay local), scores its rows
and runs the no-grad reference/value forwards on them. The rows are then gathered (``all_gather_object``),
so the reward shaping and its running moments, the multipliers, advantages and their whitening, the KL
controller and every logged metric are computed over the global batch, identically in every process. Each
global minibatch is split across the processes (rows ``r::N``), its losses normalised by the minibatch's
global token (or sequence) count; DDP sums the gradients (``dist.backward``) and the statistics are summed, so
early stopping on ``ppo.target_kl`` is global too. ``rollout.batch_size`` and ``ppo.minibatch_size`` must be
multiples of N. Checkpoints are DCP (every process saves), the final export is rank 0's. With
``strategy: fsdp`` the policy and critic are sharded (parameters, gradients, optimizer state) for the update;
generation and the no-grad forwards gather their weights first (each process then holds them whole for that
phase, as under DDP), so the processes need no collective per decode step. FSDP with LoRA is refused (the
export merges the adapter, which sharded weights do not support).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, Field, model_validator
from torch import Tensor, nn

from alignflow.config import (
    CheckpointSection,
    DistributedSection,
    LoraSection,
    ModelSection,
    MonitorBaseSection,
    OptimSection,
    StageConfig,
    StrictModel,
    register_stage,
)
from alignflow.data.encode import Pair, rows_to_pairs, split_by_prompt
from alignflow.data.prompts import Prompt, PromptStream, encode_prompt, left_pad, prompts_from_rows
from alignflow.errors import ConfigError, DataFormatError
from alignflow.evaluate.reward import preference_metrics
from alignflow.models import (
    CausalLMWithValueHead,
    load_policy,
    load_reference,
    load_tokenizer,
    load_value_model,
    reference_mode,
)
from alignflow.recipes.common import Run, check_finite, console, set_seed, start_run
from alignflow.rollout import (
    OVERALL,
    AdvantageSpec,
    EnsembleHeadScorer,
    Experience,
    Forwarder,
    ForwardOut,
    HeadScorer,
    RewardModelScorer,
    Rollout,
    RolloutRows,
    RunningMoments,
    ShapingConfig,
    experience_from,
    explained_variance,
    function_head_scorer,
    function_scorer,
    sample,
    scoring_forwards,
    shape_scores,
)
from alignflow.rollout.rewards import AggregateHeadScorer
from alignflow.store import Store
from alignflow.train import optim as T
from alignflow.train.advantages import AdaptiveKLController, FixedKLController, kl_penalty, masked_mean
from alignflow.train.constraints import LagrangeMultipliers, combine_heads, parse_constraint
from alignflow.train.distributed import DistContext, init_distributed
from alignflow.train.distributed import export_hf as export_model
from alignflow.train.losses import ppo_policy_loss, value_loss

# --------------------------------------------------------------------------------------------------------------------
# config


class PromptDataSection(StrictModel):
    train: str = Field(
        description="Prompt dataset: artifact id/name or a JSONL/Parquet file (imported on the fly)."
    )
    kind: Literal["sft", "pairs", "prompts"] = Field(
        default="sft",
        description="prompts (TRL's prompt-only rows) and sft: the `prompt` column, or `messages` (minus a last "
        "assistant turn) through the chat template; pairs: `prompt`.",
    )
    eval: str | None = Field(
        default=None, description="Held-out prompts for the monitor; default: split off train."
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share of train prompts held out when `eval` is unset and monitoring is on (split by "
        "prompt as SFT, RM and DPO split, so a prompt they held out is held out here too).",
    )
    max_prompt_length: int = Field(default=256, gt=0, description="Prompt tokens kept (from the end).")


class RolloutSection(StrictModel):
    batch_size: int = Field(default=8, gt=0, description="Prompts per PPO step.")
    num_generations: int = Field(default=1, gt=0, description="Samples per prompt (k); >= 2 for rloo/grpo.")
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(
        default=1.0, gt=0.0, description="Sampling temperature (also applied in training)."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    recompute_logprobs: bool = Field(
        default=False,
        description="Recompute old log-probs with a forward in the training layout instead of the sampler's.",
    )
    scoring_batch_size: int = Field(default=32, gt=0, description="Rows per no-grad scoring forward.")


def _constraint(spec: str) -> str:
    try:
        parse_constraint(spec)
    except ValueError:
        raise ValueError("expected '>= reference' or '>= <number>'") from None
    return spec


class CombineSection(StrictModel):
    """The training reward from several reward heads: weights, and constraints held by Lagrange multipliers."""

    weights: dict[str, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=lambda: {OVERALL: 1.0},
        description="{head: weight >= 0}, at least one positive: the objective's weighted heads.",
    )
    constraints: dict[str, Annotated[str, AfterValidator(_constraint)]] = Field(
        default_factory=dict,
        description="{head: '>= reference' | '>= <number>'}: keep the head's mean raw score at least this "
        "(reference: the reference policy's mean on `reference_prompts` training prompts, measured once).",
    )
    multiplier_lr: float = Field(
        default=0.05, gt=0.0, description="Dual step: a multiplier moves by lr x (threshold - batch mean)."
    )
    multiplier_init: float = Field(default=0.0, ge=0.0, description="Every multiplier's initial value.")
    multiplier_max: float = Field(default=10.0, gt=0.0, description="Multipliers are clipped to [0, max].")
    reference_prompts: int = Field(
        default=64, gt=0, description="Training prompts sampled once with the reference for '>= reference'."
    )

    @model_validator(mode="after")
    def _check(self) -> CombineSection:
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"weights needs at least one positive weight, got {self.weights}")
        if self.multiplier_init > self.multiplier_max:
            raise ValueError(
                f"multiplier_init={self.multiplier_init} is above multiplier_max={self.multiplier_max}"
            )
        return self


class RewardSection(StrictModel):
    fn: str | None = Field(
        default=None,
        description="'package.module:function' (prompts, responses) -> list[float], or {head: list[float]}.",
    )
    models: list[str] = Field(
        default_factory=list, description="Reward model checkpoint dirs (an ensemble if several)."
    )
    aggregate: Literal["mean", "min", "mean_minus_std"] | None = Field(
        default=None,
        description="Reward-model ensemble objective over every member of reward.models, pooled (Coste et al. "
        "2024): mean; min (worst case); mean_minus_std (uncertainty-weighted, mean - k * std). Unset: "
        "reward.ensemble_k's mean - ensemble_k * std.",
    )
    k: float = Field(default=1.0, ge=0.0, description="The k of aggregate: mean_minus_std.")
    ensemble_k: float = Field(
        default=0.0,
        ge=0.0,
        description="Deprecated (kept for existing configs, same scores as before): mean - k * std; use "
        "aggregate: mean_minus_std with k.",
    )
    missing_eos_penalty: float | None = Field(
        default=None, description="Subtracted when a response has no EOS."
    )
    length_penalty: float = Field(default=0.0, ge=0.0, description="Subtracted per response token.")
    clip: float | None = Field(default=None, gt=0.0, description="Clip shaped scores to [-clip, clip].")
    normalize: bool = Field(default=False, description="Normalise scores by running mean/std over all steps.")
    combine: CombineSection | None = Field(
        default=None,
        description="Combine reward heads (weights, constraints); unset: the one head, or 'overall'.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSection:
        if (self.fn is None) == (not self.models):
            raise ValueError("set exactly one of reward.fn (a function) or reward.models (checkpoint dirs)")
        if self.aggregate is not None and self.fn is not None:
            raise ValueError(
                "reward.aggregate combines reward models' members; it needs reward.models, not fn"
            )
        if self.aggregate is not None and self.ensemble_k > 0:
            raise ValueError(
                "reward.ensemble_k is the deprecated spelling of aggregate: mean_minus_std; set "
                f"reward.k={self.ensemble_k} instead of ensemble_k when reward.aggregate is set"
            )
        return self


class KLSection(StrictModel):
    coef: float = Field(default=0.05, ge=0.0, description="Initial KL penalty coefficient beta.")
    adaptive: bool = Field(
        default=False, description="Adaptive controller (Ziegler et al. 2019) toward `target`."
    )
    target: float = Field(
        default=6.0, gt=0.0, description="Target KL (nats per sequence) for the adaptive controller."
    )
    horizon: float = Field(default=10000.0, gt=0.0, description="Adaptive controller horizon (episodes).")
    estimator: Literal["k1", "k2", "k3"] = Field(default="k1", description="Per-token KL estimator.")


class AdvantageSection(StrictModel):
    estimator: Literal["gae", "rloo", "grpo"] = Field(default="gae", description="gae needs a value model.")
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    whiten: bool = Field(default=True, description="Whiten advantages over the batch (rloo: normalize).")
    grpo_scale: Literal["group", "batch", "none"] = Field(default="group", description="GRPO std scaling.")


class ValueSection(StrictModel):
    shared_trunk: bool = Field(
        default=False, description="Value head on the policy trunk instead of a separate model."
    )
    path: str | None = Field(
        default=None, description="Value model init dir (separate model); default model.path."
    )
    lr: float | None = Field(default=None, gt=0.0, description="Value learning rate; default optim.lr.")
    coef: float = Field(default=0.1, ge=0.0, description="Weight of the value loss.")
    clip_range: float | None = Field(default=0.2, gt=0.0, description="Value clipping; null disables.")


class PPOSection(StrictModel):
    epochs: int = Field(default=4, gt=0, description="Passes over each rollout batch.")
    minibatch_size: int = Field(default=8, gt=0, description="Rows per optimizer step.")
    clip_range: float = Field(default=0.2, gt=0.0)
    entropy_coef: float = Field(default=0.0, ge=0.0, description="Entropy bonus weight.")
    target_kl: float | None = Field(
        default=None, gt=0.0, description="Stop a step's updates above this approx KL."
    )
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    packing: bool = Field(
        default=True,
        description="Reference, value and update forwards on packed prompt trees: no left padding, a "
        "group's shared prompt computed once, heads only on response tokens. Same results as padded rows; "
        "models whose head cannot be split off use padded rows.",
    )


class PPOTrainSection(StrictModel):
    distributed: DistributedSection = Field(default_factory=DistributedSection)
    seed: int = 0
    steps: int = Field(default=100, gt=0, description="PPO steps (rollout + update rounds).")
    save_every: int = Field(
        default=0, ge=0, description="Checkpoint every N steps; 0 = only at the end/stop."
    )


class PPOReferenceSection(StrictModel):
    path: str | None = Field(
        default=None,
        description="KL reference model directory; default model.path. Iterative rounds start the policy "
        "from the previous round's and keep the original SFT model here.",
    )


class MonitorSection(MonitorBaseSection):
    every: int = Field(default=0, ge=0, description="Evaluate on held-out prompts every N steps; 0 = off.")
    score_fn: str | None = Field(
        default=None,
        description="Gold / reference scorer 'module:function', logged as monitor/score and heldout/gold.",
    )
    num_prompts: int = Field(default=16, gt=0, description="Held-out prompts used.")
    heldout_pairs: str | None = Field(
        default=None,
        description="Held-out human preference pairs (artifact id/name or file): the training reward model's "
        "accuracy and ECE on them, logged as heldout/rm_accuracy and heldout/rm_ece.",
    )
    num_pairs: int = Field(default=256, gt=0, description="Held-out pairs used (the first N).")
    judge_models: list[str] = Field(
        default_factory=list,
        description="Reward model dirs not used for training (an ensemble if several): their mean overall "
        "score of the held-out responses, logged as heldout/judge_reward.",
    )

    @model_validator(mode="after")
    def _heldout_needs_every(self) -> MonitorSection:
        if self.every == 0 and (self.heldout_pairs or self.judge_models):
            raise ValueError(
                "monitor.heldout_pairs and monitor.judge_models are evaluated every monitor.every "
                "steps: set monitor.every > 0"
            )
        return self


@register_stage("ppo")
class PPOConfig(StageConfig):
    """On-policy RLHF (``alignflow ppo``): PPO with GAE, RLOO or GRPO."""

    stage: Literal["ppo"] = "ppo"
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: PromptDataSection
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    reward: RewardSection
    reference: PPOReferenceSection = Field(default_factory=PPOReferenceSection)
    kl: KLSection = Field(default_factory=KLSection)
    advantage: AdvantageSection = Field(default_factory=AdvantageSection)
    value: ValueSection = Field(default_factory=ValueSection)
    ppo: PPOSection = Field(default_factory=PPOSection)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1e-5, scheduler="constant"))
    train: PPOTrainSection = Field(default_factory=PPOTrainSection)
    monitor: MonitorSection = Field(default_factory=MonitorSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.advantage.estimator in ("rloo", "grpo") and self.rollout.num_generations < 2:
            raise ValueError(
                f"advantage.estimator={self.advantage.estimator} needs rollout.num_generations >= 2 "
                f"(got {self.rollout.num_generations})"
            )
        if self.lora.enabled and self.reference.path is not None:
            raise ValueError(
                "reference.path needs full fine-tuning (a LoRA policy's reference is adapters off)"
            )
        return self


# --------------------------------------------------------------------------------------------------------------------
# recipe

PROGRESS_KEYS = (
    "reward/raw_mean",
    "kl/seq_sum_mean",
    "response/len_mean",
)  # also the final summary's metrics


def run(cfg: PPOConfig, store: Store | None = None) -> dict[str, Any]:
    """Train a policy with PPO/RLOO/GRPO, evaluate on held-out prompts and register the final checkpoint.

    Returns ``{"run_id", "checkpoint", "checkpoint_dir", "metrics"}``; after a SIGINT/SIGTERM it checkpoints and
    returns ``{"stopped": True, "step", "run_id", ...}`` instead, and re-running with the same ``output_dir``
    resumes exactly (policy, value model, optimizer, KL controller, reward statistics, RNG, data position).
    """
    dist = init_distributed(cfg.train.distributed)
    try:
        check_world(cfg, dist)
        r = start_run(cfg, store, dist)
        try:
            return _run(cfg, r)
        except BaseException as exc:
            r.fail(exc)
            raise
    finally:
        dist.close()


def check_world(cfg: PPOConfig, dist: DistContext) -> None:
    """Under torchrun: a step's prompts and every minibatch split evenly across the processes; no LoRA under
    FSDP. `--nproc N` checks it before torchrun starts, each process again at the start of :func:`run`."""
    n = dist.world_size
    if n <= 1:
        return
    if dist.strategy == "fsdp" and cfg.lora.enabled:
        raise ConfigError(
            "train.distributed.strategy=fsdp with lora.enabled: the final export merges the adapter, which "
            "FSDP-sharded weights do not support (and an adapter is small: sharding buys nothing); set "
            "train.distributed.strategy=ddp"
        )
    if cfg.rollout.batch_size % n:
        raise ConfigError(
            f"rollout.batch_size = {cfg.rollout.batch_size} is not a multiple of the world size {n}: each "
            f"process samples whole prompt groups (prompts r, r + {n}, ...); set rollout.batch_size to a "
            f"multiple of {n}"
        )
    if cfg.ppo.minibatch_size % n:
        raise ConfigError(
            f"ppo.minibatch_size = {cfg.ppo.minibatch_size} is not a multiple of the world size {n}: each "
            f"minibatch's rows are split evenly across the processes; set ppo.minibatch_size to a multiple "
            f"of {n}"
        )


def _step_seed(seed: int, step: int, purpose: int) -> int:
    """A seed for one step's sampling (purpose 0) or one epoch's minibatch order (1 + epoch): the same in every
    process and independent of the RNG state, so results depend neither on the world size nor on a resume."""
    return int(np.random.SeedSequence([seed, step, purpose]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _run(cfg: PPOConfig, r: Run) -> dict[str, Any]:
    # ================================================================ setup (this order: models draw from the RNG)
    set_seed(cfg.train.seed)
    dist = r.dist
    device = dist.device(T.resolve_device(cfg.model))
    k = cfg.rollout.num_generations
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, padding_side="left")
    train_prompts, held = _load_prompts(cfg, r, tok)
    train_ids = [encode_prompt(tok, p.text, cfg.data.max_prompt_length, p.templated) for p in train_prompts]
    stream = PromptStream(len(train_prompts), cfg.train.seed)
    forwarder = _load_models(cfg, r, tok, device)
    scorer = _reward_source(cfg, r, device)  # (prompts, responses) -> ((B, H), heads)
    heldout = _heldout_signals(cfg, r, device)  # gold function, judge, held-out pairs (monitor.*)
    shaping = ShapingConfig(
        missing_eos_penalty=cfg.reward.missing_eos_penalty,
        length_penalty=cfg.reward.length_penalty,
        clip=cfg.reward.clip,
        normalize=cfg.reward.normalize,
    )
    moments = RunningMoments()
    kl_ctl: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon)
        if cfg.kl.adaptive
        else FixedKLController(cfg.kl.coef)
    )
    spec = AdvantageSpec(
        estimator=cfg.advantage.estimator,
        group_size=k,
        kl_estimator=cfg.kl.estimator,
        gamma=cfg.advantage.gamma,
        lam=cfg.advantage.lam,
        whiten=cfg.advantage.whiten,
        grpo_scale=cfg.advantage.grpo_scale,
        recompute_logprobs=cfg.rollout.recompute_logprobs,
    )
    # Under torchrun the update forwards run through DDP or FSDP2 (their gradient reductions); generation
    # and the no-grad scoring forwards use the modules themselves (under FSDP2 with their weights gathered,
    # _whole_weights). Wrapped before the optimizer is built: FSDP2 replaces the parameters.
    trainee = dist.wrap(_TrainForward(forwarder), device) if dist.enabled else None
    optimizer, params = _optimizer(cfg, forwarder)
    scheduler = T.build_scheduler(optimizer, cfg.optim, cfg.train.steps)

    # what a checkpoint holds: a LoRA policy alone saves only its adapter
    ckpt_module = _checkpoint_module(forwarder)
    ckpt = r.checkpoints(T.retention(cfg.checkpoint))
    start = 0
    loaded = ckpt.load_latest()
    if loaded is not None:
        state = loaded.restore(ckpt_module, optimizer, scheduler)
        start = int(state["step"])
        stream.load_state_dict(state["stream"])
        moments.load_state_dict(state["moments"])
        kl_ctl.value = float(state["kl_coef"])
        if dist.is_main:
            console.print(f"resumed from {loaded.path} (step {start})")
    multipliers: LagrangeMultipliers | None = None
    if cfg.reward.combine is not None:  # after the resume: restored thresholds are never measured again
        saved = state.get("constraints") if loaded is not None else None
        with _whole_weights(trainee, dist):
            multipliers = _multipliers(cfg, saved, forwarder, tok, train_prompts, train_ids, scorer, device)

    # the monitor's proxy reward is the training reward: the heads combined with the current multipliers
    def proxy_reward(prompts: list[str], responses: list[str]) -> Tensor:
        return _training_reward(*scorer(prompts, responses), cfg.reward, multipliers)

    # ================================================================ loop
    metrics: dict[str, float] = {}
    with ckpt, r.stopper() as stop, r.progress(cfg.train.steps, PROGRESS_KEYS, completed=start) as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            t_step = time.perf_counter()
            # ---- sample: batch_size prompts, each k times (rows grouped per prompt); under torchrun process r
            # samples the prompt groups r, r + N, ... Each row's draws come from the step's own generator at
            # the row's global index, so the tokens do not depend on the world size.
            batch = [i for i in stream.take(cfg.rollout.batch_size) for _ in range(k)]
            mine = _my_rows(len(batch), k, dist)
            with _whole_weights(trainee, dist):
                forwarder.eval()
                generator = torch.Generator().manual_seed(_step_seed(cfg.train.seed, step, 0))
                local = _sample(
                    forwarder.policy,
                    [train_ids[batch[i]] for i in mine],
                    tok,
                    cfg.rollout,
                    device,
                    generator,
                    row_index=mine,
                    num_rows=len(batch),
                )
                # ---- score this process's rows: reward heads, then the no-grad forwards (old/reference
                # log-probs, values); then the whole step's rows on every process
                t_scoring = time.perf_counter()
                local_responses = _decode(tok, local)
                local_heads, heads = scorer([train_prompts[batch[i]].text for i in mine], local_responses)
                spread = getattr(scorer, "last_std", None)  # set by this scoring, before the monitor's
                t_training = time.perf_counter()
                forwards = scoring_forwards(forwarder, RolloutRows(local, group_size=k), spec)
            step_rows = _all_rows(
                dist,
                mine,
                local,
                local_responses,
                local_heads,
                spread,
                forwards,
                batch,
                train_ids,
                tok,
                device,
            )
            rollout, responses, head_scores = step_rows.rollout, step_rows.responses, step_rows.head_scores
            prompts = [train_prompts[i].text for i in batch]
            # ---- the global batch, identical in every process: heads combined, a multiplier step, shaping
            raw_scores = _training_reward(head_scores, heads, cfg.reward, multipliers).to(device)
            head_metrics = _head_metrics(head_scores, heads, cfg.reward, multipliers)
            if multipliers is not None:
                multipliers.update({h: float(head_scores[:, j].mean()) for j, h in enumerate(heads)})
            scores = shape_scores(raw_scores, rollout.finished, rollout.lengths, shaping, moments)
            # ---- make_experience: KL, advantages (whitened over the whole batch), returns
            rows = RolloutRows(rollout, group_size=k)
            old, ref, values = step_rows.forwards
            experience = experience_from(
                rows, prompts, raw_scores, scores, old, ref, values, kl_ctl.value, spec
            )
            # ---- ppo_update: ppo.epochs passes over shuffled minibatches
            updates = _ppo_update(experience, forwarder, trainee, dist, optimizer, params, cfg, step, ckpt)
            # The schedule steps once per rollout round: the round's minibatch updates share a learning rate.
            scheduler.step()
            kl_ctl.update(float(experience.kl_seq.mean()), len(experience))
            # ---- log
            times = {
                "time/generation": rollout.seconds,
                "time/scoring": t_training - t_scoring,
                "time/training": time.perf_counter() - t_training,
            }
            metrics = _step_metrics(experience, updates, scheduler, times, time.perf_counter() - t_step)
            metrics.update(head_metrics)
            if step_rows.spread is not None:
                metrics["reward/ensemble_std"] = step_rows.spread
            if cfg.monitor.every and step % cfg.monitor.every == 0:
                with _whole_weights(trainee, dist):
                    metrics.update(
                        _monitor(forwarder.policy, tok, held, proxy_reward, heldout, cfg, device, scorer)
                    )
            # texts: this step's responses, for the alert rules that read them (repetition)
            r.log(step, metrics, texts=responses)
            if cfg.tracking.samples_every and step % cfg.tracking.samples_every == 0:
                r.log_samples(step, _sample_rows(prompts, responses, experience))
            bar.update(step, metrics)
            # every process decides on a best checkpoint (a collective save) from the same metrics: rank 0's
            metrics = dist.broadcast(metrics)
            # ---- end_step: a best checkpoint (checkpoint.best_metric improved), then the periodic,
            # stop-requested (a signal or a `stop` alert) and final checkpoints
            state = _data_state(step, stream, moments, kl_ctl, multipliers)
            ckpt.save_if_best(
                step,
                ckpt_module,
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
                cfg.train.steps,
                ckpt_module,
                optimizer,
                scheduler,
                state,
                metrics,
                cfg.train.save_every,
                cfg.checkpoint.async_save,
            ):
                best = ckpt.best_checkpoint()
                return {
                    "stopped": True,
                    "step": step,
                    "run_id": r.run_id,
                    "run_dir": str(r.run_dir),
                    "best_checkpoint": str(best) if best else None,
                    "signal": r.stop_signal,
                }

    # ================================================================ evaluate and register
    final_step = cfg.train.steps
    final_metrics = {key: metrics[key] for key in PROGRESS_KEYS if key in metrics}
    if held:
        with _whole_weights(trainee, dist):
            final_metrics.update(
                _monitor(forwarder.policy, tok, held, proxy_reward, heldout, cfg, device, scorer)
            )
    if loaded is not None and start >= final_step and dist.is_main:
        console.print(f"run already complete at step {start}; re-exporting the final policy")
    out_dir = r.run_dir / "final"
    export_model(dist, forwarder.policy, tok, out_dir, merge_lora=True)
    meta = {"estimator": cfg.advantage.estimator, "steps": final_step, **final_metrics}
    art = r.register_checkpoint(out_dir, meta=meta)
    summary: dict[str, Any] = {
        "steps": final_step,
        "forward_layout": forwarder.layout,
        "metrics": final_metrics,
    }
    best = ckpt.best_checkpoint()
    if best is not None:
        summary["best_checkpoint"] = str(best)
    r.finish(summary, outputs={"checkpoint": art})
    return {"run_id": r.run_id, "checkpoint": art, "checkpoint_dir": str(out_dir), "metrics": final_metrics}


# --------------------------------------------------------------------------------------------------------------------
# setup


def _load_prompts(cfg: PPOConfig, r: Run, tok: Any) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts for the monitor); held-out ones only when the monitor is on."""
    aid = r.dataset(cfg.data.train, cfg.data.kind, role="prompts")
    train = prompts_from_rows(r.store.read_dataset(aid).to_pylist(), cfg.data.kind, tok, cfg.data.train)
    held: list[Prompt] = []
    if cfg.monitor.every > 0:
        if cfg.data.eval:
            eid = r.dataset(cfg.data.eval, cfg.data.kind, role="eval_prompts")
            held = prompts_from_rows(r.store.read_dataset(eid).to_pylist(), cfg.data.kind, tok, cfg.data.eval)
        else:  # the split every stage uses, by the prompt's key (SFT's for the same row)
            train, held = split_by_prompt(train, cfg.data.eval_fraction, attrgetter("key"))
        held = held[: cfg.monitor.num_prompts]
        if not held:
            raise ConfigError(
                "monitor.every > 0 but there are no held-out prompts; set data.eval or data.eval_fraction"
            )
    if not train:
        raise DataFormatError(f"{cfg.data.train}: no training prompts")
    return train, held


def _load_models(cfg: PPOConfig, r: Run, tok: Any, device: torch.device) -> Forwarder:
    """Policy, reference (none for LoRA: adapters off) and critic, behind the forwarder that runs them."""
    r.model_dir(cfg.model.path, role="base_model")
    lora = T.lora_spec(cfg.lora)
    common = {
        "dtype": cfg.model.dtype,
        "device": str(device),
        "attn_implementation": cfg.model.attn_implementation,
    }
    policy = load_policy(
        cfg.model.path, gradient_checkpointing=cfg.model.gradient_checkpointing, lora=lora, **common
    )
    if cfg.reference.path is not None:
        r.model_dir(cfg.reference.path, role="reference_model")
    reference = None if lora is not None else load_reference(cfg.reference.path or cfg.model.path, **common)
    critic: nn.Module | None = None
    policy_with_value: CausalLMWithValueHead | None = None
    if cfg.advantage.estimator == "gae" and cfg.value.shared_trunk:
        policy_with_value = CausalLMWithValueHead(policy).to(device)
    elif cfg.advantage.estimator == "gae":
        critic = load_value_model(
            cfg.value.path or cfg.model.path, pad_token_id=tok.pad_token_id, shared_trunk=False, **common
        )
    return Forwarder(
        policy,
        reference,
        critic,
        policy_with_value,
        temperature=cfg.rollout.temperature,
        packing=cfg.ppo.packing,
        chunk_size=cfg.rollout.scoring_batch_size,
    )


def _reward_source(cfg: PPOConfig, r: Run, device: torch.device) -> HeadScorer:
    """``(prompts, responses) -> (scores (B, H), heads)``: a function by import path, or a reward-model
    ensemble (per head ``mean - k * std``). A checkpoint's heads are checked against ``reward.combine`` here,
    a function's when it first returns."""
    if cfg.reward.fn:
        return function_head_scorer(cfg.reward.fn, "reward.fn")
    for path in cfg.reward.models:
        r.model_dir(path, role="reward_model")
    members = [RewardModelScorer(p, device=str(device)) for p in cfg.reward.models]
    scorer: EnsembleHeadScorer | AggregateHeadScorer
    if cfg.reward.aggregate is None:
        # reward.ensemble_k (deprecated) keeps its own arithmetic, so existing configs score exactly as before.
        scorer = EnsembleHeadScorer(members, cfg.reward.ensemble_k)
    else:
        scorer = AggregateHeadScorer(members, cfg.reward.aggregate, cfg.reward.k)
    _check_heads(scorer.heads, cfg.reward)
    return scorer


@dataclass
class _Heldout:
    """The held-out signals besides the proxy reward (``monitor.*``): a gold function, an independent judge,
    held-out human preference pairs (their metrics cached: a frozen reward model scores them the same)."""

    gold: Callable[[list[str], list[str]], Tensor] | None = None
    judge: AggregateHeadScorer | None = None
    pairs: list[Pair] = field(default_factory=list)
    pair_metrics: dict[str, float] | None = None


def _heldout_signals(cfg: PPOConfig, r: Run, device: torch.device) -> _Heldout:
    out = _Heldout()
    if cfg.monitor.score_fn:
        out.gold = function_scorer(cfg.monitor.score_fn, "monitor.score_fn")
    if cfg.monitor.judge_models:
        shared = sorted(set(cfg.monitor.judge_models) & set(cfg.reward.models))
        if shared:
            raise ConfigError(
                f"monitor.judge_models: {shared} also in reward.models; the judge must be a reward model "
                "not used for training"
            )
        for path in cfg.monitor.judge_models:
            r.model_dir(path, role="judge_model")
        judges = [RewardModelScorer(p, device=str(device)) for p in cfg.monitor.judge_models]
        out.judge = AggregateHeadScorer(judges, "mean")
    if cfg.monitor.heldout_pairs:
        aid = r.dataset(cfg.monitor.heldout_pairs, "pairs", role="heldout_pairs")
        out.pairs = rows_to_pairs(r.store.read_dataset(aid).to_pylist(), "pairs")[: cfg.monitor.num_pairs]
        if not out.pairs:
            raise DataFormatError(f"monitor.heldout_pairs {cfg.monitor.heldout_pairs!r}: no pairs")
    return out


def _pair_metrics(
    heldout: _Heldout, proxy: Callable[[list[str], list[str]], Tensor], head_scorer: HeadScorer | None
) -> dict[str, float]:
    """The training reward model's accuracy and ECE (:func:`preference_metrics`) on the held-out pairs: its
    ``overall`` head (the human preference one, calibrated by the RM recipe) when it has one, else the
    training reward. The ``overall`` head of a frozen model never changes, so its metrics are cached."""
    if heldout.pair_metrics is not None:
        return heldout.pair_metrics
    prompts = [p.prompt for p in heldout.pairs]
    n = len(prompts)
    both = [p.chosen for p in heldout.pairs] + [p.rejected for p in heldout.pairs]
    cached = False
    if head_scorer is not None:
        scores, heads = head_scorer(prompts + prompts, both)
        if OVERALL in heads:
            values, cached = scores[:, heads.index(OVERALL)], True
        else:
            values = proxy(prompts + prompts, both)
    else:
        values = proxy(prompts + prompts, both)
    values = values.double().cpu().numpy()
    ev = preference_metrics(values[:n], values[n:])
    out = {"heldout/rm_accuracy": float(ev["accuracy"]), "heldout/rm_ece": float(ev["ece"])}
    if cached:
        heldout.pair_metrics = out
    return out


def _check_heads(heads: list[str], section: RewardSection) -> None:
    """ConfigError unless every head ``reward.combine`` names exists (and, without it, there is one to use)."""
    source = f"reward.fn {section.fn!r}" if section.fn else f"the reward model ({', '.join(section.models)})"
    if section.combine is None:
        if section.fn and OVERALL not in heads:
            raise ConfigError(
                f"{source} returns heads {heads} but reward.combine is unset: set reward.combine.weights "
                f"to say how to combine them (or return a list, or an {OVERALL!r} key)"
            )
        return
    for kind, names in (("weights", section.combine.weights), ("constraints", section.combine.constraints)):
        for head in names:
            if head not in heads:
                raise ConfigError(
                    f"reward.combine.{kind}.{head}: unknown head {head!r}; {source} has heads {heads}"
                )


def _training_reward(
    head_scores: Tensor, heads: list[str], section: RewardSection, multipliers: LagrangeMultipliers | None
) -> Tensor:
    """The raw training reward ``(B,)`` from the head scores ``(B, H)``: ``reward.combine``'s Lagrangian reward
    with the current multipliers, or without it the one head: ``overall``, else a checkpoint's first head
    (what :class:`RewardModelScorer` returns when called)."""
    _check_heads(heads, section)
    if section.combine is None:
        return head_scores[:, heads.index(OVERALL) if OVERALL in heads else 0]
    values = multipliers.values if multipliers is not None else {}
    return combine_heads(head_scores, heads, section.combine.weights, values)


def _head_metrics(
    head_scores: Tensor, heads: list[str], section: RewardSection, multipliers: LagrangeMultipliers | None
) -> dict[str, float]:
    """``reward/head/<h>`` (raw batch mean, with ``reward.combine`` or several heads), and per constraint the
    multiplier used this step (before its update) and the threshold."""
    out: dict[str, float] = {}
    if section.combine is not None or len(heads) > 1:
        out.update({f"reward/head/{h}": float(head_scores[:, j].mean()) for j, h in enumerate(heads)})
    if multipliers is not None:
        for head, value in multipliers.values.items():
            out[f"reward/multiplier/{head}"] = value
            out[f"reward/threshold/{head}"] = multipliers.thresholds[head]
    return out


def _multipliers(
    cfg: PPOConfig,
    saved: Mapping[str, Any] | None,
    forwarder: Forwarder,
    tok: Any,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    scorer: HeadScorer,
    device: torch.device,
) -> LagrangeMultipliers:
    """One Lagrange multiplier per ``reward.combine.constraints`` head: restored exactly from a checkpoint's
    data state (``saved``), else new, with the thresholds the config gives and those it leaves to the
    reference policy (``>= reference``) measured now."""
    combine = cfg.reward.combine
    assert combine is not None
    given = {head: parse_constraint(spec) for head, spec in combine.constraints.items()}
    thresholds = {head: value for head, value in given.items() if value is not None}
    if saved is None and len(thresholds) < len(given):
        means = _reference_head_means(cfg, forwarder, tok, prompts, prompt_ids, scorer, device)
        _check_heads(list(means), cfg.reward)
        thresholds = {head: means[head] if value is None else value for head, value in given.items()}
        shown = ", ".join(f"{h} >= {thresholds[h]:.4g}" for h, v in given.items() if v is None)
        console.print(f"reward.combine: thresholds from the reference policy: {shown}")
    multipliers = LagrangeMultipliers(
        {head: thresholds.get(head, 0.0) for head in given},
        combine.multiplier_lr,
        combine.multiplier_init,
        combine.multiplier_max,
    )
    if saved is not None:
        try:
            multipliers.load_state_dict(saved)
        except ValueError as exc:
            raise ConfigError(f"reward.combine.constraints: cannot resume: {exc}") from None
    return multipliers


def _reference_head_means(
    cfg: PPOConfig,
    forwarder: Forwarder,
    tok: Any,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    scorer: HeadScorer,
    device: torch.device,
) -> dict[str, float]:
    """Each head's mean raw score of the reference policy, one sample on each of the first
    ``reward.combine.reference_prompts`` prompts of the stream order (a fresh stream: the training stream is
    not consumed) with its own generator (the training RNG is not disturbed)."""
    assert cfg.reward.combine is not None
    n = min(cfg.reward.combine.reference_prompts, len(prompts))
    order = PromptStream(len(prompts), cfg.train.seed).take(n)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + 2_000_003)
    chunk = cfg.rollout.batch_size * cfg.rollout.num_generations
    parts: list[Tensor] = []
    heads: list[str] = []
    forwarder.eval()
    with _reference_policy(forwarder) as model:
        for first in range(0, n, chunk):
            idx = order[first : first + chunk]
            rollout = _sample(model, [prompt_ids[i] for i in idx], tok, cfg.rollout, device, generator)
            scores, heads = scorer([prompts[i].text for i in idx], _decode(tok, rollout))
            parts.append(scores)
    means = torch.cat(parts).mean(dim=0)  # (H,)
    return {head: float(means[j]) for j, head in enumerate(heads)}


@contextmanager
def _reference_policy(forwarder: Forwarder) -> Iterator[nn.Module]:
    """The KL reference as a sampling policy: the frozen model, or the LoRA policy with its adapters off."""
    if forwarder.reference is not None:
        yield forwarder.reference
    else:
        with reference_mode(forwarder.policy) as model:
            yield model


def _optimizer(cfg: PPOConfig, forwarder: Forwarder) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    """One AdamW, the critic's parameters in their own group (own learning rate); returns it and all params."""
    policy_params = [p for p in forwarder.policy.parameters() if p.requires_grad]
    value_params: list[nn.Parameter] = []
    if forwarder.critic is not None:
        value_params = [p for p in forwarder.critic.parameters() if p.requires_grad]
    elif forwarder.policy_with_value is not None:
        value_params = list(forwarder.policy_with_value.value_head.parameters())
    groups = [{"params": policy_params, "lr": cfg.optim.lr}]
    if value_params:
        groups.append({"params": value_params, "lr": cfg.value.lr or cfg.optim.lr})
    optimizer = T.adamw(
        groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    return optimizer, policy_params + value_params


def _checkpoint_module(forwarder: Forwarder) -> nn.Module:
    """The trained modules as one: the policy (with its value head if shared), plus a separate critic."""
    if forwarder.critic is not None:
        return nn.ModuleDict({"policy": forwarder.policy, "value": forwarder.critic})
    return forwarder.trained


def _data_state(
    step: int,
    stream: PromptStream,
    moments: RunningMoments,
    kl_ctl: FixedKLController | AdaptiveKLController,
    multipliers: LagrangeMultipliers | None,
) -> dict[str, Any]:
    """Everything besides weights, optimizer and RNG that an exact resume needs (with ``reward.combine``: the
    constraints' thresholds and multipliers)."""
    state: dict[str, Any] = {
        "step": step,
        "stream": stream.state_dict(),
        "moments": moments.state_dict(),
        "kl_coef": kl_ctl.value,
    }
    if multipliers is not None:
        state["constraints"] = multipliers.state_dict()
    return state


# --------------------------------------------------------------------------------------------------------------------
# the phases of a step


def _sample(
    policy: nn.Module,
    prompt_ids: list[list[int]],
    tok: Any,
    settings: RolloutSection,
    device: torch.device,
    generator: torch.Generator | None = None,
    row_index: list[int] | None = None,
    num_rows: int | None = None,
) -> Rollout:
    """Left-pad the prompts and sample a response for each with the KV-cache sampler (``row_index``,
    ``num_rows``: the rows' places in the step's global batch, see :func:`alignflow.rollout.sample`)."""
    ids, mask = left_pad(prompt_ids, tok.pad_token_id, device)
    return sample(
        policy,
        ids,
        mask,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=settings.temperature,
        top_p=settings.top_p,
        generator=generator,
        row_index=row_index,
        num_rows=num_rows,
    )


def _my_rows(n_rows: int, k: int, dist: DistContext) -> list[int]:
    """This process's rows of a step's ``n_rows`` (grouped ``k`` per prompt): whole groups ``r, r + N, ...``,
    so a GRPO/RLOO group's samples stay in one process."""
    groups = range(n_rows // k)[dist.rank :: dist.world_size]
    return [g * k + j for g in groups for j in range(k)]


@dataclass
class _StepRows:
    """The step's whole batch (every process's rows, in the global order), the same in every process."""

    rollout: Rollout
    responses: list[str]
    head_scores: Tensor  # (B, H)
    forwards: tuple[Tensor, Tensor, Tensor | None]  # old log-probs, reference log-probs, values: (B, R)
    spread: float | None  # reward/ensemble_std over the whole batch


def _all_rows(
    dist: DistContext,
    mine: list[int],
    local: Rollout,
    responses: list[str],
    head_scores: Tensor,
    spread: float | None,
    forwards: tuple[Tensor, Tensor, Tensor | None],
    batch: list[int],
    train_ids: list[list[int]],
    tok: Any,
    device: torch.device,
) -> _StepRows:
    """Gather every process's sampled and scored rows (CPU tensors, ``all_gather_object``) into the step's
    global batch: responses padded to the longest process's width, prompts left-padded as one process would.
    In one process: the rows as they are."""
    if not dist.enabled:
        return _StepRows(local, responses, head_scores, forwards, spread)
    old, ref, values = forwards
    payload = {
        "rows": mine,
        "ids": local.response_ids.cpu(),
        "mask": local.response_mask.cpu(),
        "logprobs": local.logprobs.cpu(),
        "finished": local.finished.cpu(),
        "old": old.detach().cpu(),
        "ref": ref.detach().cpu(),
        "values": None if values is None else values.detach().cpu(),
        "heads": head_scores.detach().cpu(),
        "responses": responses,
        "spread": spread,
        "seconds": local.seconds,
    }
    parts = dist.gather(payload)
    n, width = len(batch), max(p["ids"].shape[1] for p in parts)

    def full(key: str, fill: float | int, dtype: torch.dtype) -> Tensor:
        out = torch.full((n, width), fill, dtype=dtype)
        for p in parts:
            t = p[key]
            out[torch.tensor(p["rows"], dtype=torch.long), : t.shape[1]] = t.to(dtype)
        return out.to(device)

    prompt_ids, prompt_mask = left_pad([train_ids[i] for i in batch], tok.pad_token_id, device)
    rollout = Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=full("ids", tok.pad_token_id, local.response_ids.dtype),
        response_mask=full("mask", 0, local.response_mask.dtype),
        logprobs=full("logprobs", 0.0, local.logprobs.dtype),
        finished=torch.zeros(n, dtype=torch.bool),
        seconds=max(p["seconds"] for p in parts),
    )
    texts: list[str] = [""] * n
    scores = torch.zeros(n, head_scores.shape[1], dtype=head_scores.dtype)
    for p in parts:
        rows = torch.tensor(p["rows"], dtype=torch.long)
        rollout.finished[rows] = p["finished"]
        scores[rows] = p["heads"]
        for i, text in zip(p["rows"], p["responses"], strict=True):
            texts[i] = text
    rollout.finished = rollout.finished.to(device)
    gathered = (
        full("old", 0.0, old.dtype),
        full("ref", 0.0, ref.dtype),
        None if values is None else full("values", 0.0, values.dtype),
    )
    spreads = [(p["spread"], len(p["rows"])) for p in parts]
    total_spread = (
        None
        if any(v is None for v, _ in spreads)
        else sum(v * m for v, m in spreads) / sum(m for _, m in spreads)  # type: ignore[operator]
    )
    return _StepRows(rollout, texts, scores.to(head_scores.device), gathered, total_spread)


@contextmanager
def _whole_weights(trainee: nn.Module | None, dist: DistContext) -> Iterator[None]:
    """Under FSDP2: every sharded module's weights gathered (and kept: no resharding after a forward), so the
    sampler and the no-grad forwards run on plain tensors without collectives, whatever number of forwards
    each process makes; resharded on exit. Otherwise nothing."""
    if trainee is None or dist.strategy != "fsdp":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    root = trainee._get_fsdp_state()  # type: ignore[operator]
    root._lazy_init()  # FSDP2 initialises on the root's first forward; unshard() before it needs this
    modules = [m for m in trainee.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


class _TrainForward(nn.Module):
    """The update forward (:meth:`Forwarder.train_forward`) as one module over every trained parameter, so
    DDP sees the forward it must prepare its gradient all-reduce for (the packed forwards call the policy's
    trunk and head separately, never the policy's own ``forward``)."""

    def __init__(self, forwarder: Forwarder) -> None:
        super().__init__()
        self.trained = forwarder.trained
        if forwarder.critic is not None:
            self.critic = forwarder.critic
        self._forwarder = [forwarder]  # not a submodule

    def forward(self, rows: RolloutRows, idx: list[int]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        out = self._forwarder[0].train_forward(rows, idx)
        return out.logprobs, out.entropy, out.values


def _decode(tok: Any, rollout: Rollout) -> list[str]:
    rows = [
        r[m.bool()].tolist()
        for r, m in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu(), strict=True)
    ]
    return tok.batch_decode(rows, skip_special_tokens=True)


@dataclass
class _Updates:
    """One round of PPO updates: per-minibatch statistics by metric name, optimizer steps, early stop."""

    stats: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    count: int = 0
    early_stopped: bool = False


def _ppo_update(
    experience: Experience,
    forwarder: Forwarder,
    trainee: nn.Module | None,
    dist: DistContext,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    cfg: PPOConfig,
    step: int,
    ckpt: Any,
) -> _Updates:
    """``ppo.epochs`` passes over shuffled minibatches, one optimizer step each; stops the round early once the
    approximate KL to ``pi_old`` exceeds ``ppo.target_kl``.

    Every process holds the whole experience and draws the same minibatch order (a generator seeded by seed,
    step and epoch); process r runs the minibatch's rows ``r, r + N, ...``. Each loss is normalised by the
    minibatch's GLOBAL count (tokens, or sequences), so the gradient is the sum of the processes' (DDP averages:
    ``dist.backward`` scales by N), and every statistic is summed over the processes: all of them see the
    same values, and stop early together."""
    forwarder.train()
    updates = _Updates()
    mb = cfg.ppo.minibatch_size
    for epoch in range(cfg.ppo.epochs):
        generator = torch.Generator().manual_seed(_step_seed(cfg.train.seed, step, 1 + epoch))
        order = torch.randperm(len(experience), generator=generator).tolist()
        for first in range(0, len(experience), mb):
            whole = order[first : first + mb]
            idx = whole[dist.rank :: dist.world_size]
            out = (
                forwarder.train_forward(experience.rows, idx)
                if trainee is None
                else ForwardOut(*trainee(experience.rows, idx))
            )
            loss, parts = _minibatch_loss(experience, out, idx, whole, cfg)
            names = list(parts)
            summed = dist.sum_tensor(torch.stack([parts[n].detach().double().cpu() for n in names]))
            stats = {n: float(v) for n, v in zip(names, summed.tolist(), strict=True)}
            check_finite(
                torch.tensor(stats["loss/total"]), step, [experience.prompts[i] for i in whole][:5], ckpt
            )
            dist.backward(loss)
            stats["optim/grad_norm"] = T.clip_and_step(params, optimizer, cfg.optim.max_grad_norm)
            updates.count += 1
            for name, value in stats.items():
                updates.stats[name].append(value)
            if cfg.ppo.target_kl is not None and stats["policy/approx_kl"] > cfg.ppo.target_kl:
                updates.early_stopped = True
                return updates
    return updates


def _minibatch_loss(
    experience: Experience, out: ForwardOut, idx: list[int], whole: list[int], cfg: PPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate minus the entropy bonus, plus GRPO's KL term or the (clipped) value loss, on this
    process's rows ``idx`` of the minibatch ``whole``: every term (and statistic) is this process's share of
    the minibatch's value, normalised by the minibatch's global token or sequence count, so the shares of all
    processes sum to the one-process loss (in one process ``idx == whole`` and every share is the value)."""
    mask = experience.mask[idx]
    n_tok = experience.mask[whole].sum()
    tok_share = mask.sum() / n_tok  # this process's share of the minibatch's tokens (1 in one process)
    agg = cfg.ppo.aggregation
    num_items = n_tok if agg == "token-mean" else None
    if agg == "token-mean":
        seq_share = None
    elif agg == "seq-mean-token-mean":  # sequences with a response token
        seq_share = (mask.sum(1) > 0).sum() / (experience.mask[whole].sum(1) > 0).sum()
    else:
        seq_share = torch.tensor(len(idx) / len(whole))

    def share(loss: Tensor) -> Tensor:
        return loss if seq_share is None else loss * seq_share.to(loss.dtype)

    policy_loss, policy_stats = ppo_policy_loss(
        out.logprobs,
        experience.old_logprobs[idx],
        experience.advantages[idx],
        mask,
        cfg.ppo.clip_range,
        aggregation=agg,
        num_items_in_batch=num_items,
    )
    policy_loss = share(policy_loss)
    entropy = masked_mean(out.entropy, mask) * tok_share  # type: ignore[arg-type]
    loss = policy_loss - cfg.ppo.entropy_coef * entropy
    stats: dict[str, Tensor] = {}
    # GRPO's KL is a loss term, not a reward term (Shao et al. 2024, eq. 3).
    if cfg.advantage.estimator == "grpo" and experience.beta > 0:
        kl_term = masked_mean(kl_penalty(out.logprobs, experience.ref_logprobs[idx], "k3"), mask) * tok_share
        loss = loss + experience.beta * kl_term
        stats["loss/kl"] = kl_term
    if experience.values is not None and experience.returns is not None:
        critic_loss, critic_stats = value_loss(
            out.values,  # type: ignore[arg-type]
            experience.values[idx],
            experience.returns[idx],
            mask,
            cfg.value.clip_range,
            aggregation=agg,
            num_items_in_batch=num_items,
        )
        critic_loss = share(critic_loss)
        loss = loss + cfg.value.coef * critic_loss
        stats["value/loss"] = critic_loss
        stats["value/clip_frac"] = critic_stats["clip_frac"] * tok_share
    stats["loss/policy"] = policy_loss
    stats["loss/total"] = loss
    stats["policy/entropy"] = entropy
    for name in ("clip_frac", "approx_kl", "ratio_mean"):
        stats[f"policy/{name}"] = policy_stats[name] * tok_share
    return loss, {name: value.detach() for name, value in stats.items()}


def _step_metrics(
    experience: Experience, updates: _Updates, scheduler: Any, times: dict[str, float], step_seconds: float
) -> dict[str, float]:
    """The step's metrics (names in ``docs/metrics.md#ppo``): update means, rewards, KL, lengths, timings."""
    rollout = experience.rows.rollout
    lengths = rollout.lengths.float()
    raw = experience.raw_scores
    metrics = {name: float(np.mean(values)) for name, values in updates.stats.items()}
    metrics.update(
        {
            "reward/raw_mean": float(raw.mean()),
            "reward/raw_std": float(raw.std()) if raw.numel() > 1 else 0.0,
            "reward/shaped_mean": float(experience.scores.mean()),
            "reward/total_mean": float((experience.scores - experience.beta * experience.kl_seq).mean()),
            "kl/token_mean": float(masked_mean(experience.kl, experience.mask)),
            "kl/seq_sum_mean": float(experience.kl_seq.mean()),
            "kl/coef": experience.beta,
            "response/len_mean": float(lengths.mean()),
            "response/len_p95": float(torch.quantile(lengths, 0.95)),
            "response/eos_rate": float(rollout.finished.float().mean()),
            "ppo/updates": float(updates.count),
            "ppo/early_stopped": float(updates.early_stopped),
            "optim/lr": float(scheduler.get_last_lr()[0]),
            **times,
            "time/step": step_seconds,
            "throughput/gen_tokens_per_s": rollout.new_tokens / max(rollout.seconds, 1e-9),
            "throughput/episodes_per_s": len(experience) / max(step_seconds, 1e-9),
        }
    )
    if experience.values is not None and experience.returns is not None:
        metrics["value/explained_var"] = explained_variance(
            experience.values, experience.returns, experience.mask
        )
    return metrics


def _monitor(
    policy: nn.Module,
    tok: Any,
    held: list[Prompt],
    scorer: Callable[[list[str], list[str]], Tensor],
    heldout: _Heldout,
    cfg: PPOConfig,
    device: torch.device,
    head_scorer: HeadScorer | None = None,
) -> dict[str, float]:
    """Proxy reward (the training reward: combined heads, current multipliers), length and the held-out
    signals on held-out prompts: the gold score (``monitor/score``, also ``heldout/gold``), the judge's mean
    ``overall`` (or first-head) score, the reward model's accuracy and ECE on held-out pairs. Sampling uses
    its own generator."""
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed + 1_000_003)
    ids = [encode_prompt(tok, p.text, cfg.data.max_prompt_length, p.templated) for p in held]
    policy.eval()
    rollout = _sample(policy, ids, tok, cfg.rollout, device, generator)
    texts, responses = [p.text for p in held], _decode(tok, rollout)
    out = {
        "monitor/proxy_reward": float(scorer(texts, responses).mean()),
        "monitor/response_len": float(rollout.lengths.float().mean()),
    }
    if heldout.gold is not None:
        out["monitor/score"] = out["heldout/gold"] = float(heldout.gold(texts, responses).mean())
    if heldout.judge is not None:
        judged, heads = heldout.judge(texts, responses)
        out["heldout/judge_reward"] = float(judged[:, heads.index(OVERALL) if OVERALL in heads else 0].mean())
    if heldout.pairs:
        out.update(_pair_metrics(heldout, scorer, head_scorer))
    return out


def _sample_rows(prompts: list[str], responses: list[str], experience: Experience) -> list[dict[str, Any]]:
    """The step's sample table (``tracking.samples_every``): prompt, response, raw reward, sequence KL."""
    raw, kl = experience.raw_scores.tolist(), experience.kl_seq.tolist()
    return [
        {"prompt": p, "response": c, "reward": float(s), "kl": float(k)}
        for p, c, s, k in zip(prompts, responses, raw, kl, strict=True)
    ]


__all__ = ["PPOConfig", "run"]
