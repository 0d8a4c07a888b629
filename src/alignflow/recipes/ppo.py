"""On-policy RLHF: PPO with a critic (GAE), or critic-free RLOO / GRPO, over prompts from a dataset artifact.

Reads top to bottom: setup (run, prompts, policy, reference, value model, reward source, optimizer, resume)
→ loop (rollout → score → experience → several epochs of minibatch updates → KL controller → metrics →
graceful stop) → checkpoint → evaluate (monitor on held-out prompts) → register the final policy with
lineage. Metric names are documented in ``docs/metrics.md#ppo``.

One step (Ouyang et al. 2022, "Training language models to follow instructions with human feedback", sec. 3.5;
Ziegler et al. 2019):

1. Sample ``rollout.batch_size`` prompts, each ``rollout.num_generations`` times (rows grouped per prompt).
2. Generate with the KV-cache sampler (:func:`alignflow.rollout.sample`); its log-probs are the "old" log-probs
   ``log pi_old`` (temperature-scaled, see :mod:`alignflow.rollout.generation`) unless
   ``rollout.recompute_logprobs`` asks for a fresh forward in the training layout.
3. Score the decoded responses (a reward function or reward model ensemble), shape the scores
   (missing-EOS / length penalties, running normalisation, clipping).
4. Reference log-probs (the frozen SFT model, or the LoRA policy with adapters off) give the per-token KL.
5. Advantages: ``gae`` — per-token reward ``-beta * KL_t`` plus the score at the last token, GAE over the
   critic's values, whitened; ``rloo`` — sequence reward ``score - beta * sum_t KL_t`` with the leave-one-out
   baseline (Ahmadian et al. 2024); ``grpo`` — group-normalised scores, with ``beta * KL`` (k3) as a loss
   term instead of a reward term (Shao et al. 2024, eq. 3).
6. ``ppo.epochs`` passes over shuffled minibatches with the clipped surrogate (and the clipped value loss for
   ``gae``); an epoch stops early when the approximate KL to ``pi_old`` exceeds ``ppo.target_kl``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from alignflow.config import (
    CheckpointSection,
    LoraSection,
    ModelSection,
    OptimSection,
    StageConfig,
    StrictModel,
    register_stage,
)
from alignflow.errors import ConfigError, DataFormatError
from alignflow.models import (
    CausalLMWithValueHead,
    load_policy,
    load_reference,
    load_tokenizer,
    load_value_model,
    reference_mode,
)
from alignflow.models.export import export_hf
from alignflow.recipes.common import Run, check_finite, console, set_seed, start_run
from alignflow.rollout import (
    EnsembleScorer,
    RewardModelScorer,
    Rollout,
    RolloutTrees,
    RunningMoments,
    ShapingConfig,
    function_scorer,
    packable,
    response_forward,
    rollout_trees,
    sample,
    shape_scores,
    tree_response_forward,
    tree_value_forward,
    value_forward,
)
from alignflow.store import Store
from alignflow.train import optim as T
from alignflow.train.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    rloo_advantages,
)
from alignflow.train.losses import ppo_policy_loss, value_loss

# --------------------------------------------------------------------------------------------------------------------
# config


class PromptDataSection(StrictModel):
    train: str = Field(
        description="Prompt dataset: artifact id/name or a JSONL/Parquet file (imported on the fly)."
    )
    kind: Literal["sft", "pairs"] = Field(
        default="sft",
        description="sft: the `prompt` column, or `messages` minus the last turn (chat template); pairs: `prompt`.",
    )
    eval: str | None = Field(
        default=None, description="Held-out prompts for the monitor; default: split off train."
    )
    eval_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Share of train prompts held out when `eval` is unset and monitoring is on.",
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


class RewardSection(StrictModel):
    fn: str | None = Field(
        default=None, description="'package.module:function' (prompts, responses) -> list[float]."
    )
    models: list[str] = Field(
        default_factory=list, description="Reward model checkpoint dirs (an ensemble if several)."
    )
    ensemble_k: float = Field(default=0.0, ge=0.0, description="Conservative ensemble score mean - k * std.")
    missing_eos_penalty: float | None = Field(
        default=None, description="Subtracted when a response has no EOS."
    )
    length_penalty: float = Field(default=0.0, ge=0.0, description="Subtracted per response token.")
    clip: float | None = Field(default=None, gt=0.0, description="Clip shaped scores to [-clip, clip].")
    normalize: bool = Field(default=False, description="Normalise scores by running mean/std over all steps.")

    @model_validator(mode="after")
    def _one_source(self) -> RewardSection:
        if (self.fn is None) == (not self.models):
            raise ValueError("set exactly one of reward.fn (a function) or reward.models (checkpoint dirs)")
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
    seed: int = 0
    steps: int = Field(default=100, gt=0, description="PPO steps (rollout + update rounds).")
    save_every: int = Field(
        default=0, ge=0, description="Checkpoint every N steps; 0 = only at the end/stop."
    )


class MonitorSection(StrictModel):
    every: int = Field(default=0, ge=0, description="Evaluate on held-out prompts every N steps; 0 = off.")
    score_fn: str | None = Field(
        default=None, description="Reference scorer 'module:function', logged as monitor/score."
    )
    num_prompts: int = Field(default=16, gt=0, description="Held-out prompts used.")


@register_stage("ppo")
class PPOConfig(StageConfig):
    """On-policy RLHF (``alignflow ppo``): PPO with GAE, RLOO or GRPO."""

    stage: Literal["ppo"] = "ppo"
    model: ModelSection
    lora: LoraSection = Field(default_factory=LoraSection)
    data: PromptDataSection
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    reward: RewardSection
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
        return self


# --------------------------------------------------------------------------------------------------------------------
# helpers (orchestration only; the arithmetic is in alignflow.train and alignflow.rollout)


def _prompt_texts(rows: list[dict[str, Any]], kind: str, tok: Any, source: str) -> list[str]:
    out = []
    for i, row in enumerate(rows):
        if kind == "sft" and row.get("messages"):
            if tok.chat_template is None:
                raise DataFormatError(
                    f"{source}: row {i} (id {row.get('id')}): field 'messages' needs a tokenizer chat_template"
                )
            msgs = [dict(m) for m in row["messages"]]
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            out.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        else:
            prompt = row.get("prompt")
            if not prompt:
                raise DataFormatError(f"{source}: row {i} (id {row.get('id')}): field 'prompt' is empty")
            out.append(prompt)
    return list(dict.fromkeys(out))  # unique, order kept


def _encode_prompt(tok: Any, text: str, max_len: int) -> list[int]:
    # Chat-templated prompts carry their special tokens in the text; plain prompts get bos like SFT's encoder.
    templated = tok.bos_token is not None and text.startswith(tok.bos_token)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not templated and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return ids[-max_len:]


def _left_pad(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _held_out(prompts: list[str], fraction: float) -> tuple[list[str], list[str]]:
    import hashlib

    def bucket(p: str) -> float:
        return int(hashlib.sha1(p.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    return [p for p in prompts if bucket(p) >= fraction], [p for p in prompts if bucket(p) < fraction]


class PromptStream:
    """Seeded epoch-wise shuffling of prompts; ``state_dict`` is the exact data position for resume."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.RandomState((self.seed + 7919 * self.epoch) % 2**32).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(int(self._perm[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


def _decode(tok: Any, ids: Tensor, mask: Tensor) -> list[str]:
    rows = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu(), strict=True)]
    return tok.batch_decode(rows, skip_special_tokens=True)


class _StepRows:
    """One step's rollout as the scoring and update forwards see it: padded rows or packed prompt trees."""

    def __init__(self, roll: Rollout, groups: Tensor) -> None:
        self.roll, self.groups = roll, groups
        self.seq, self.seq_mask = roll.sequences()  # (B, P + R), the padded layout
        self.response_len = roll.response_ids.shape[1]

    def trees(self, rows: list[int]) -> RolloutTrees:
        return rollout_trees(self.roll, rows, self.groups)


def _chunked(fn: Callable[[_StepRows, list[int]], Tensor], cur: _StepRows, chunk: int) -> Tensor:
    """``fn(cur, rows)`` without grad over row chunks of ``chunk`` (bounds activation memory), concatenated."""
    n = cur.seq.shape[0]
    with torch.no_grad():
        return torch.cat([fn(cur, list(range(i, min(i + chunk, n)))) for i in range(0, n, chunk)])


def _p95(x: Tensor) -> float:
    return float(torch.quantile(x.float(), 0.95))


# --------------------------------------------------------------------------------------------------------------------
# recipe


def run(cfg: PPOConfig, store: Store | None = None) -> dict[str, Any]:
    """Train a policy with PPO/RLOO/GRPO, evaluate on held-out prompts and register the final checkpoint.

    Returns ``{"run_id", "checkpoint", "checkpoint_dir", "metrics"}``; after a SIGINT/SIGTERM it checkpoints and
    returns ``{"stopped": True, "step", "run_id", ...}`` instead, and re-running with the same ``output_dir``
    resumes exactly (policy, value model, optimizer, KL controller, reward statistics, RNG, data position).
    """
    r = start_run(cfg, store)
    try:
        return _run(cfg, r)
    except BaseException as exc:
        r.fail(exc)
        raise


def _run(cfg: PPOConfig, r: Run) -> dict[str, Any]:
    # ================================================================ setup
    set_seed(cfg.train.seed)
    device = T.resolve_device(cfg.model)
    est = cfg.advantage.estimator
    k = cfg.rollout.num_generations
    temp = cfg.rollout.temperature
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path, padding_side="left")

    # prompts
    aid = r.dataset(cfg.data.train, cfg.data.kind, role="prompts")
    train_prompts = _prompt_texts(r.store.read_dataset(aid).to_pylist(), cfg.data.kind, tok, cfg.data.train)
    held: list[str] = []
    if cfg.monitor.every > 0:
        if cfg.data.eval:
            eid = r.dataset(cfg.data.eval, cfg.data.kind, role="eval_prompts")
            held = _prompt_texts(r.store.read_dataset(eid).to_pylist(), cfg.data.kind, tok, cfg.data.eval)
        else:
            train_prompts, held = _held_out(train_prompts, cfg.data.eval_fraction)
        held = held[: cfg.monitor.num_prompts]
        if not held:
            raise ConfigError(
                "monitor.every > 0 but there are no held-out prompts; set data.eval or data.eval_fraction"
            )
    if not train_prompts:
        raise DataFormatError(f"{cfg.data.train}: no training prompts")
    encoded = [_encode_prompt(tok, p, cfg.data.max_prompt_length) for p in train_prompts]
    stream = PromptStream(len(train_prompts), cfg.train.seed)

    # models
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
    reference = None if lora is not None else load_reference(cfg.model.path, **common)
    value_model: nn.Module | None = None
    policy_vh: CausalLMWithValueHead | None = None
    if est == "gae" and cfg.value.shared_trunk:
        policy_vh = CausalLMWithValueHead(policy).to(device)
    elif est == "gae":
        value_model = load_value_model(
            cfg.value.path or cfg.model.path, pad_token_id=tok.pad_token_id, shared_trunk=False, **common
        )
    train_module: nn.Module = policy_vh if policy_vh is not None else policy  # the module the PPO loss runs

    # reward source
    scorer: Callable[[list[str], list[str]], Tensor]
    if cfg.reward.fn:
        scorer = function_scorer(cfg.reward.fn, "reward.fn")
    else:
        for path in cfg.reward.models:
            r.model_dir(path, role="reward_model")
        scorer = EnsembleScorer(
            [RewardModelScorer(p, device=str(device)) for p in cfg.reward.models], cfg.reward.ensemble_k
        )
    monitor_fn = function_scorer(cfg.monitor.score_fn, "monitor.score_fn") if cfg.monitor.score_fn else None
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

    # optimizer: one AdamW, the value parameters in their own group (own learning rate)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    value_params: list[nn.Parameter] = []
    if value_model is not None:
        value_params = [p for p in value_model.parameters() if p.requires_grad]
    elif policy_vh is not None:
        value_params = list(policy_vh.value_head.parameters())
    groups = [{"params": policy_params, "lr": cfg.optim.lr}]
    if value_params:
        groups.append({"params": value_params, "lr": cfg.value.lr or cfg.optim.lr})
    optimizer = T.adamw(
        groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    scheduler = T.build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    all_params = policy_params + value_params

    # what a checkpoint holds: a LoRA policy alone saves only its adapter
    ckpt_module: nn.Module = (
        nn.ModuleDict({"policy": policy, "value": value_model}) if value_model is not None else train_module
    )
    ckpt = r.checkpoints(T.retention(cfg.checkpoint))
    start = 0
    loaded = ckpt.load_latest()
    if loaded is not None:
        state = loaded.restore(ckpt_module, optimizer, scheduler)
        start = int(state["step"])
        stream.load_state_dict(state["stream"])
        moments.load_state_dict(state["moments"])
        kl_ctl.value = float(state["kl_coef"])
        console.print(f"resumed from {loaded.path} (step {start})")

    def data_state(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "stream": stream.state_dict(),
            "moments": moments.state_dict(),
            "kl_coef": kl_ctl.value,
        }

    # Forwards over rollout rows: packed prompt trees, or the padded (rows, P + R) layout.
    packed = (
        cfg.ppo.packing
        and packable(train_module)
        and (reference is None or packable(reference))
        and (value_model is None or packable(value_model, head="score"))
    )

    def forward(
        model: nn.Module, cur: _StepRows, rows: list[int], trees: RolloutTrees | None = None, **kw: bool
    ) -> Any:
        if packed:
            return tree_response_forward(model, trees or cur.trees(rows), temp, **kw)
        return response_forward(model, cur.seq[rows], cur.seq_mask[rows], cur.response_len, temp, **kw)

    def value_of(cur: _StepRows, rows: list[int], trees: RolloutTrees | None = None) -> Tensor:
        if packed:
            return tree_value_forward(value_model, trees or cur.trees(rows))  # type: ignore[arg-type]
        return value_forward(value_model, cur.seq[rows], cur.seq_mask[rows], cur.response_len)  # type: ignore[arg-type]

    def ref_logprobs(cur: _StepRows, rows: list[int]) -> Tensor:
        if reference is not None:
            return forward(reference, cur, rows).logprobs
        with reference_mode(policy):
            return forward(policy, cur, rows).logprobs

    def values_of(cur: _StepRows, rows: list[int]) -> Tensor:
        if policy_vh is not None:
            return forward(policy_vh, cur, rows, with_values=True).values
        return value_of(cur, rows)

    def monitor(step: int) -> dict[str, float]:
        """Proxy reward, reference score and length on held-out prompts; sampling with its own generator."""
        gen = torch.Generator(device=device).manual_seed(cfg.train.seed + 1_000_003)
        ids, am = _left_pad(
            [_encode_prompt(tok, p, cfg.data.max_prompt_length) for p in held], tok.pad_token_id, device
        )
        policy.eval()
        roll = sample(
            policy,
            ids,
            am,
            max_new_tokens=cfg.rollout.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            temperature=temp,
            top_p=cfg.rollout.top_p,
            generator=gen,
        )
        texts = _decode(tok, roll.response_ids, roll.response_mask)
        out = {
            "monitor/proxy_reward": float(scorer(held, texts).mean()),
            "monitor/response_len": float(roll.lengths.float().mean()),
        }
        if monitor_fn is not None:
            out["monitor/score"] = float(monitor_fn(held, texts).mean())
        return out

    # ================================================================ loop
    last: dict[str, float] = {}
    keys = ("reward/raw_mean", "kl/seq_sum_mean", "response/len_mean")
    with r.stopper() as stop, r.progress(cfg.train.steps, keys, completed=start) as bar:
        for step in range(start + 1, cfg.train.steps + 1):
            t_step = time.perf_counter()
            # ---- rollout
            idx = [i for i in stream.take(cfg.rollout.batch_size) for _ in range(k)]  # grouped per prompt
            prompts = [train_prompts[i] for i in idx]
            ids, am = _left_pad([encoded[i] for i in idx], tok.pad_token_id, device)
            policy.eval()
            if policy_vh is not None:
                policy_vh.eval()
            if value_model is not None:
                value_model.eval()
            roll = sample(
                policy,
                ids,
                am,
                max_new_tokens=cfg.rollout.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                temperature=temp,
                top_p=cfg.rollout.top_p,
            )
            t_gen = roll.seconds
            # ---- score
            t0 = time.perf_counter()
            responses = _decode(tok, roll.response_ids, roll.response_mask)
            raw = scorer(prompts, responses).to(device)
            scores = shape_scores(raw, roll.finished, roll.lengths, shaping, moments)
            t_score = time.perf_counter() - t0
            # ---- experience
            t0 = time.perf_counter()
            cur = _StepRows(roll, torch.arange(len(idx)) // k)  # rows are grouped per prompt
            mask = roll.response_mask.float()
            chunk = cfg.rollout.scoring_batch_size
            n_rows = len(idx)
            if cfg.rollout.recompute_logprobs:
                old_logps = _chunked(lambda c, rows: forward(policy, c, rows).logprobs, cur, chunk)
            else:
                old_logps = roll.logprobs
            ref_logps = _chunked(ref_logprobs, cur, chunk)
            kl = kl_penalty(old_logps, ref_logps, cfg.kl.estimator) * mask  # (B, R)
            kl_seq = kl.sum(dim=1)  # (B,)
            beta = kl_ctl.value
            old_values = returns = None
            if est == "gae":
                old_values = _chunked(values_of, cur, chunk)
                rewards, _, _ = per_token_rewards(scores, old_logps, ref_logps, mask, beta, cfg.kl.estimator)
                advantages, returns = gae(rewards, old_values, mask, cfg.advantage.gamma, cfg.advantage.lam)
                if cfg.advantage.whiten:
                    advantages = masked_whiten(advantages, mask)
            elif est == "rloo":
                advantages = rloo_advantages(scores - beta * kl_seq, k, normalize=cfg.advantage.whiten)
            else:
                advantages = grpo_advantages(scores, k, scale_rewards=cfg.advantage.grpo_scale)
            # ---- update
            train_module.train()
            if value_model is not None:
                value_model.train()
            stats: dict[str, list[float]] = defaultdict(list)
            updates, early = 0, False
            for _epoch in range(cfg.ppo.epochs):
                order = torch.randperm(n_rows).tolist()
                for s in range(0, n_rows, cfg.ppo.minibatch_size):
                    rows = order[s : s + cfg.ppo.minibatch_size]
                    mb = torch.tensor(rows, device=device)
                    trees = cur.trees(rows) if packed else None  # one packing for policy and value
                    fo = forward(
                        train_module, cur, rows, trees, with_entropy=True, with_values=policy_vh is not None
                    )
                    m = mask[mb]
                    pl, pst = ppo_policy_loss(
                        fo.logprobs,
                        old_logps[mb],
                        advantages[mb],
                        m,
                        cfg.ppo.clip_range,
                        aggregation=cfg.ppo.aggregation,
                    )
                    entropy = masked_mean(fo.entropy, m)  # type: ignore[arg-type]
                    loss = pl - cfg.ppo.entropy_coef * entropy
                    if est == "grpo" and beta > 0:
                        kl_term = masked_mean(kl_penalty(fo.logprobs, ref_logps[mb], "k3"), m)
                        loss = loss + beta * kl_term
                        stats["loss/kl"].append(float(kl_term.detach()))
                    if est == "gae":
                        v = fo.values if policy_vh is not None else value_of(cur, rows, trees)
                        vl, vst = value_loss(
                            v,
                            old_values[mb],
                            returns[mb],
                            m,
                            cfg.value.clip_range,
                            aggregation=cfg.ppo.aggregation,
                        )  # type: ignore[index]
                        loss = loss + cfg.value.coef * vl
                        stats["value/loss"].append(float(vl.detach()))
                        stats["value/clip_frac"].append(float(vst["clip_frac"]))
                    check_finite(loss, step, [prompts[i] for i in mb.tolist()][:5], ckpt)
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(all_params, cfg.optim.max_grad_norm or float("inf"))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    updates += 1
                    stats["loss/policy"].append(float(pl.detach()))
                    stats["loss/total"].append(float(loss.detach()))
                    stats["policy/entropy"].append(float(entropy.detach()))
                    stats["policy/clip_frac"].append(float(pst["clip_frac"]))
                    stats["policy/approx_kl"].append(float(pst["approx_kl"]))
                    stats["policy/ratio_mean"].append(float(pst["ratio_mean"]))
                    stats["optim/grad_norm"].append(float(norm))
                    if cfg.ppo.target_kl is not None and float(pst["approx_kl"]) > cfg.ppo.target_kl:
                        early = True
                        break
                if early:
                    break
            scheduler.step()
            kl_ctl.update(float(kl_seq.mean()), n_rows)
            t_train = time.perf_counter() - t0
            # ---- metrics
            dt = time.perf_counter() - t_step
            lengths = roll.lengths.float()
            metrics = {k_: float(np.mean(v_)) for k_, v_ in stats.items()}
            metrics.update(
                {
                    "reward/raw_mean": float(raw.mean()),
                    "reward/raw_std": float(raw.std()) if raw.numel() > 1 else 0.0,
                    "reward/shaped_mean": float(scores.mean()),
                    "reward/total_mean": float((scores - beta * kl_seq).mean()),
                    "kl/token_mean": float(masked_mean(kl, mask)),
                    "kl/seq_sum_mean": float(kl_seq.mean()),
                    "kl/coef": beta,
                    "response/len_mean": float(lengths.mean()),
                    "response/len_p95": _p95(lengths),
                    "response/eos_rate": float(roll.finished.float().mean()),
                    "ppo/updates": float(updates),
                    "ppo/early_stopped": float(early),
                    "optim/lr": float(scheduler.get_last_lr()[0]),
                    "time/generation": t_gen,
                    "time/scoring": t_score,
                    "time/training": t_train,
                    "time/step": dt,
                    "throughput/gen_tokens_per_s": roll.new_tokens / max(t_gen, 1e-9),
                    "throughput/episodes_per_s": n_rows / max(dt, 1e-9),
                }
            )
            if est == "gae":
                metrics["value/explained_var"] = _explained_variance(old_values, returns, mask)  # type: ignore[arg-type]
            if cfg.monitor.every and step % cfg.monitor.every == 0:
                metrics.update(monitor(step))
            r.log(step, metrics)
            bar.update(step, metrics)
            last = metrics
            if stop.requested:
                ckpt.save(
                    step,
                    ckpt_module,
                    optimizer,
                    scheduler,
                    data_state=data_state(step),
                    config=r.config,
                    blocking=True,
                )
                ckpt.close()
                r.stop(step, stop.signal_name)
                return {"stopped": True, "step": step, "run_id": r.run_id, "run_dir": str(r.run_dir)}
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                ckpt.save(
                    step,
                    ckpt_module,
                    optimizer,
                    scheduler,
                    data_state=data_state(step),
                    config=r.config,
                    blocking=False,
                )

    # ================================================================ checkpoint
    final_step = cfg.train.steps
    if start < final_step:
        ckpt.save(
            final_step,
            ckpt_module,
            optimizer,
            scheduler,
            data_state=data_state(final_step),
            config=r.config,
            blocking=True,
        )
    ckpt.close()

    # ================================================================ evaluate
    final_metrics = {
        k_: last[k_] for k_ in ("reward/raw_mean", "kl/seq_sum_mean", "response/len_mean") if k_ in last
    }
    if held:
        final_metrics.update(monitor(final_step))
    if loaded is not None and start >= final_step:
        console.print(f"run already complete at step {start}; re-exporting the final policy")

    # ================================================================ register
    out_dir = r.run_dir / "final"
    export_hf(policy, tok, out_dir, merge_lora=True)
    art = r.register_checkpoint(out_dir, meta={"estimator": est, "steps": final_step, **final_metrics})
    layout = "packed prompt trees" if packed else "padded rows"
    r.finish(
        {"steps": final_step, "forward_layout": layout, "metrics": final_metrics}, outputs={"checkpoint": art}
    )
    return {"run_id": r.run_id, "checkpoint": art, "checkpoint_dir": str(out_dir), "metrics": final_metrics}


def _explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over response tokens: 1 is a perfect critic, <= 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    if float(var_r) == 0.0 or int(mask.sum()) < 2:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)


__all__ = ["PPOConfig", "run"]
