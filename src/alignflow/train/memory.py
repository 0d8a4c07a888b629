"""How much memory one training micro-batch needs, and the token budget that fits (``train.tokens_per_batch``).

The model of a training step's peak resident memory is linear in the micro-batch's token count ``T``
(padded rows x row length, or packed tokens)::

    peak(T) = fixed_bytes + bytes_per_token * T

**Fixed part** (exact for what it counts; ``p`` = bytes per parameter element, 4 for fp32, 2 for bf16/fp16)::

    fixed_bytes = n_models * (N_total * p                 # parameters
                              + N_trainable * p           # gradients (trainable parameters only)
                              + N_trainable * S) / shards # optimizer state; FSDP shards all three
                  + N_frozen * p                          # e.g. DPO's reference model (no gradients)
                  + RUNTIME_OVERHEAD                      # thread pools, kernel workspaces, malloc arenas

``S`` for AdamW is two moment tensors. ``torch.optim.AdamW`` keeps them in the parameter's dtype, which is how
alignflow trains (a bf16 model has bf16 states, no master copy): ``S = 2p``. With ``mixed_precision=True``
(fp32 master weights and fp32 states beside low-precision parameters) ``S = 2 * 4 + 4``. Plain SGD: ``S = 0``.
Gradients and optimizer state are counted whole although the gradients are only built up during the
backward pass, as the activations are released: a deliberate margin.

**Activations.** Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198, section 4.1, eq. 1) count ``s*b*h*(34 + 5*a*s/h)`` bytes per layer for a GPT layer in fp16
with dropout (``s`` sequence length, ``b`` batch, ``h`` hidden size, ``a`` heads): 11sbh + 5as²b in attention,
19sbh in the MLP, 4sbh in the layer norms. What a Hugging Face Llama-style layer really keeps on the CPU
differs: no dropout (no masks), RMSNorm, rotary embeddings (rotated copies of q and k), a SwiGLU MLP of width
``I`` (gate, up, act(gate), act(gate)*up), and the SDPA kernel, which keeps its output and one log-sum-exp per
head and token instead of the ``a*s²`` probabilities, so the ``5as/h`` term is gone (``eager`` attention
keeps them: ``a*s`` per token and layer). Counting the unique storages autograd saves
(``torch.autograd.graph.saved_tensors_hooks``; transformers 5.23, torch 2.13; ``h_kv`` = key/value width
under grouped-query attention), in elements per token and layer::

    full fine-tuning:  8h + 2h_kv + 4I + a
    LoRA (q/k/v/o):    5h + 2h_kv + 3I + a      (a frozen linear layer keeps no input for a weight gradient)

plus ``3h`` outside the layers (final norm input and output, the LM head's input; 0 with LoRA) and, for a
padded or packed batch, its ``(B, 1, T, T)`` attention mask, which SDPA gets as a float copy per layer
(``L*s`` per token). Gradient checkpointing keeps only each layer's input ``h``, and one layer is
recomputed during the backward pass: ``L*h + layer`` instead of ``L*layer``. The backward pass needs one
more layer's worth for the activation gradients in flight.

**Loss.** A causal-LM head adds ``B*T*V`` logits. In fp32 the recipes' loss
(:func:`alignflow.train.logprobs.selective_log_softmax` on the shifted logits) has ``LOGIT_BUFFERS = 5``
vocabulary-wide buffers alive at its peak early in the backward pass: the logits the loop keeps, the
flattened shifted copy ``logsumexp`` saves, the gradient chunks of ``logsumexp``, their concatenation and
the gradient of ``gather``. Low-precision logits add the fp32 chunk copies ``logsumexp`` saves (4 bytes per
vocabulary entry). Reward models (a score head) have no such term.

**Allocator.** Resident memory is more than live tensors: glibc serves blocks under its mmap threshold
(which grows to the size of freed mmapped blocks, up to 32 MiB) from heaps that only shrink from the top, so
the forward pass's temporaries, freed between tensors autograd keeps, stay resident. Measured as the resident
growth over the forward pass minus what autograd saves: about ``7h`` per layer and token for full
fine-tuning (residual sums, rotary products, projection outputs) and ``3h`` more per LoRA-adapted
projection (base output, adapter output, their scaled sum): ``TRANSIENT_PER_LAYER`` and
``TRANSIENT_PER_ADAPTER``; one layer's under checkpointing, whose forward frees each layer whole.
``RUNTIME_OVERHEAD`` (20 MiB) is what the same measurement leaves on a 0.2M-parameter model.

**Validation** (``benchmarks/bench_memory_estimator.py``, ``benchmarks/RESULTS.md``): the peak resident memory
of real SFT steps (load, forward, backward, AdamW; fresh process per configuration) minus the resident memory
before the model was loaded, for three random-init Llama sizes (5M, 30M, 120M parameters), full,
gradient-checkpointed and LoRA fine-tuning at several budgets. Every constant above is an architecture count
or a mechanism measured once, none a per-size fit; the remaining error comes from how the heap happens to
fragment (largest for small models whose logits sit just under the 32 MiB threshold).

Preference recipes (RM, DPO) count a pair's chosen and rejected tokens together (their samplers already
double the lengths), so ``T`` is the pair tokens. DPO keeps a frozen reference model (``frozen_params``)
unless it trains LoRA adapters (the reference is then the policy with its adapters off), and a reference
that is not precomputed runs a no-grad forward per micro-batch (``reference_forward``: two vocabulary-wide
buffers and one layer).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from alignflow.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PretrainedConfig

    from alignflow.config import ModelSection, TrainSection

log = logging.getLogger(__name__)

GIB = 1024**3
# Fractions of the device memory (CUDA) or of the available RAM (CPU) ``auto`` plans for by default.
CUDA_FRACTION = 0.9
CPU_FRACTION = 0.8
# Vocabulary-wide buffers per token the causal-LM loss holds at its peak (module docstring).
LOGIT_BUFFERS = 5
# Forward-pass temporaries per layer and token (elements, in units of h) that the C allocator keeps resident:
# freed between tensors autograd saves, they fragment the heap (module docstring, "allocator").
TRANSIENT_PER_LAYER = 7
TRANSIENT_PER_ADAPTER = 3  # each LoRA-adapted projection: base output, adapter output, their scaled sum
# What a training step costs beyond its tensors (thread pools, kernel workspaces, the autograd engine, malloc
# arenas): 20.8 MiB measured on a 0.2M-parameter model whose tensors are 5 MiB (module docstring).
RUNTIME_OVERHEAD = 20 * 1024**2
PLAN_FILE = "batch_plan.json"
# Projection names of the MLP block (Llama, GPT-2, OPT, BERT-style): LoRA there keeps their inputs.
MLP_MODULES = frozenset(
    {"gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h"}
)

_DTYPE_BYTES = {"float32": 4, "float": 4, "float64": 8, "bfloat16": 2, "float16": 2, "half": 2}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float32"``)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unsupported parameter dtype {dtype!r} (expected one of {sorted(_DTYPE_BYTES)})")
    return _DTYPE_BYTES[name]


@dataclass(frozen=True)
class MemoryEstimate:
    """``peak(T) = fixed_bytes + bytes_per_token * T``; ``parts`` itemises both (bytes, and bytes per token)."""

    fixed_bytes: int
    bytes_per_token: int
    parts: dict[str, int] = field(default_factory=dict)

    def peak_bytes(self, tokens: int) -> int:
        """Estimated peak of a training step whose micro-batch holds ``tokens`` tokens (padded or packed)."""
        return self.fixed_bytes + self.bytes_per_token * tokens


@dataclass(frozen=True)
class BatchPlan:
    """A run's micro-batch token budget and gradient accumulation, and why.

    ``mode``: ``default`` (``batch_size x max_length``), ``fixed`` (``train.tokens_per_batch: N``) or ``auto``.
    ``est_peak_bytes`` is the estimate for a full micro-batch (None in ``default`` mode, which estimates nothing).
    """

    tokens_per_batch: int
    grad_accum: int
    est_peak_bytes: int | None
    mode: Literal["default", "fixed", "auto"] = "auto"
    limit_bytes: int | None = None
    fixed_bytes: int | None = None
    bytes_per_token: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the byte counts also in GiB (what ``summary.json`` records as ``batch_plan``)."""
        out: dict[str, Any] = asdict(self)
        for key in ("est_peak_bytes", "limit_bytes", "fixed_bytes"):
            if out[key] is not None:
                out[key.replace("_bytes", "_gib")] = round(out[key] / GIB, 3)
        return out


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config has (architectures name the same thing differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def estimate_memory(
    model_config: PretrainedConfig,
    *,
    trainable_params: int,
    total_params: int,
    param_dtype: Any = "float32",
    optimizer: Literal["adamw", "sgd"] = "adamw",
    grad_checkpointing: bool = False,
    lora: bool = False,
    lora_mlp: bool = False,
    n_models: int = 1,
    frozen_params: int = 0,
    shards: int = 1,
    mixed_precision: bool = False,
    lm_head: bool = True,
    seq_len: int | None = None,
    attn_implementation: str = "sdpa",
    reference_forward: bool = False,
) -> MemoryEstimate:
    """The memory model of one training step (module docstring has the formula and its source).

    Args:
        model_config: the model's ``PretrainedConfig`` (``hidden_size``, ``intermediate_size``,
            ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``vocab_size``; GPT-2 and
            BERT names are understood too).
        trainable_params, total_params: parameter counts (``requires_grad`` ones, and all of them).
        param_dtype: the parameters' (and activations') dtype.
        optimizer: ``adamw`` (two moments per trainable parameter) or ``sgd`` (no state).
        grad_checkpointing: activations of layer inputs only, one layer recomputed at a time.
        lora: the base weights are frozen (fewer saved activations; the counts say how many are trainable).
        lora_mlp: the adapters also sit on the MLP projections, whose inputs are then kept as in full
            fine-tuning (the LoRA activation count assumes attention-only adapters, the config's default).
        n_models: trained models resident at once (each with parameters, gradients and optimizer state).
        frozen_params: parameters of frozen models held beside them (DPO's reference).
        shards: ranks the trained parameters, gradients and optimizer state are sharded over (FSDP); frozen
            models stay whole on every rank.
        mixed_precision: fp32 master weights and fp32 optimizer states beside low-precision parameters.
        lm_head: a causal-LM head whose vocabulary-wide logits enter the loss (False for a score head).
        seq_len: the padded row length, for the attention mask (and eager attention's probabilities).
        attn_implementation: ``sdpa`` or ``eager`` (keeps ``heads x seq_len`` probabilities per token and layer).
        reference_forward: a no-grad reference forward per micro-batch on top of the policy's activations.
    """
    if n_models < 1:
        raise ValueError(f"n_models must be at least 1, got {n_models}")
    if trainable_params > total_params:
        raise ValueError(f"trainable_params={trainable_params} exceeds total_params={total_params}")
    p = dtype_bytes(param_dtype)
    h = int(_cfg(model_config, "hidden_size", "n_embd", "d_model"))
    layers = int(_cfg(model_config, "num_hidden_layers", "n_layer", "num_layers"))
    heads = int(_cfg(model_config, "num_attention_heads", "n_head", default=1))
    kv_heads = int(_cfg(model_config, "num_key_value_heads", default=heads))
    inter = int(_cfg(model_config, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
    vocab = int(_cfg(model_config, "vocab_size", default=0))
    h_kv = h * kv_heads // max(heads, 1)

    # ---------------------------------------------------------------- fixed
    if optimizer == "adamw":
        state = 2 * 4 + 4 if mixed_precision else 2 * p
    elif optimizer == "sgd":
        state = 4 if mixed_precision else 0
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    parts = {
        "parameters": -(-n_models * total_params * p // shards),
        "gradients": -(-n_models * trainable_params * p // shards),
        "optimizer": -(-n_models * trainable_params * state // shards),
        "frozen": frozen_params * p,
        "runtime": RUNTIME_OVERHEAD,
    }
    fixed = sum(parts.values())

    # ---------------------------------------------------------------- per token (elements, then bytes)
    if lora and not lora_mlp:
        layer = 5 * h + 2 * h_kv + 3 * inter + heads
    else:
        layer = 8 * h + 2 * h_kv + 4 * inter + heads
    outside = 0 if lora else 3 * h
    if attn_implementation == "eager" and seq_len:
        layer += heads * seq_len
    kept = (layers * h + layer) if grad_checkpointing else layers * layer
    transient = TRANSIENT_PER_LAYER * h
    if lora:
        transient += TRANSIENT_PER_ADAPTER * h * (7 if lora_mlp else 4)
    per_token = {
        "layers": (kept + outside) * p,
        "backward": layer * p,  # one layer's activation gradients at a time
        # the forward's temporaries the allocator keeps: every layer's, or (checkpointing) one layer's
        "transient": (transient if grad_checkpointing else layers * transient) * p,
        # the (B, 1, T, T) attention mask of a padded or packed batch, materialised per layer
        "mask": layers * (seq_len or 0) * p,
        "logits": (LOGIT_BUFFERS * p + (4 if p < 4 else 0)) * vocab if lm_head else 0,
        "reference": ((2 * vocab if lm_head else 0) + layer) * p if reference_forward else 0,
    }
    parts.update({f"{k}_per_token": v for k, v in per_token.items()})
    return MemoryEstimate(fixed_bytes=fixed, bytes_per_token=sum(per_token.values()), parts=parts)


def plan_batches(
    estimate: MemoryEstimate,
    limit_bytes: int,
    *,
    global_tokens: int,
    max_length: int,
    batch_size: int,
    accum_multiple: int = 1,
) -> BatchPlan:
    """The largest micro-batch of whole ``max_length`` rows (at most ``batch_size``) whose estimated peak fits.

    The accumulation keeps an optimizer step's rows (``global_tokens / max_length``) about the same: with
    ``G`` rows per step and ``r`` rows that fit, ``grad_accum = ceil(G / r)`` and the micro-batch shrinks to
    ``ceil(G / grad_accum)`` rows, so a step holds between ``G`` and ``G + grad_accum - 1`` rows.
    ``accum_multiple`` rounds ``grad_accum`` up to a multiple of it (the data-parallel world size, whose ranks
    split a step's micro-batches).

    Raises ConfigError naming the limit, the estimate and what to change when one row does not fit.
    """
    if max_length <= 0 or batch_size <= 0 or global_tokens < max_length:
        raise ValueError(
            f"need max_length > 0, batch_size > 0 and global_tokens >= max_length; got "
            f"{max_length}, {batch_size}, {global_tokens}"
        )
    global_rows = global_tokens // max_length
    room = limit_bytes - estimate.fixed_bytes
    row_bytes = estimate.bytes_per_token * max_length
    fit = max(room, 0) // row_bytes if row_bytes > 0 else (batch_size if room >= 0 else 0)
    rows = int(min(fit, batch_size, global_rows))
    if rows < 1:
        one = estimate.peak_bytes(max_length)
        cause = (
            "the parameters, gradients and optimizer state alone exceed it"
            if room <= 0
            else f"one row of {max_length} tokens adds {row_bytes / GIB:.2f} GiB of activations"
        )
        raise ConfigError(
            f"train.tokens_per_batch=auto: even one row of {max_length} tokens needs an estimated "
            f"{one / GIB:.2f} GiB ({estimate.fixed_bytes / GIB:.2f} GiB parameters, gradients and optimizer "
            f"state + {row_bytes / GIB:.2f} GiB activations), over the memory limit of {limit_bytes / GIB:.2f} GiB "
            f"({cause}). Train LoRA adapters (lora.enabled=true: gradients and optimizer state for the adapters "
            "only), turn on model.gradient_checkpointing (activations of layer inputs only), shorten "
            "data.max_length, or raise train.memory_limit_gb."
        )
    grad_accum = math.ceil(global_rows / rows)
    if accum_multiple > 1:
        grad_accum = math.ceil(grad_accum / accum_multiple) * accum_multiple
    rows = math.ceil(global_rows / grad_accum)
    tokens = rows * max_length
    return BatchPlan(
        tokens_per_batch=tokens,
        grad_accum=grad_accum,
        est_peak_bytes=estimate.peak_bytes(tokens),
        mode="auto",
        limit_bytes=int(limit_bytes),
        fixed_bytes=estimate.fixed_bytes,
        bytes_per_token=estimate.bytes_per_token,
    )


# ---------------------------------------------------------------------------------------------------------------------
# from a loaded model and the config


def _unwrap(model: Any) -> Any:
    """The model with the HF config under wrappers: DDP (``.module``), a pooled reward model (``.model``);
    a PEFT model answers for its base."""
    while not hasattr(model, "config"):
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "model", None)
        if inner is None:
            break
        model = inner
    return model


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared tensors (tied embeddings) count once."""
    seen: dict[int, tuple[int, bool]] = {}
    for prm in model.parameters():
        seen.setdefault(id(prm), (prm.numel(), prm.requires_grad))
    return sum(n for n, g in seen.values() if g), sum(n for n, _ in seen.values())


def model_estimate(
    model: nn.Module,
    *,
    grad_checkpointing: bool,
    seq_len: int | None,
    attn_implementation: str = "sdpa",
    frozen_params: int = 0,
    reference_forward: bool = False,
    shards: int = 1,
) -> MemoryEstimate:
    """:func:`estimate_memory` for a loaded model: counts, dtype, LoRA and the head read off the model."""
    inner = _unwrap(model)
    trainable, total = count_params(model)
    first = next(model.parameters())
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    peft = getattr(inner, "peft_config", None)
    targets = {t for c in (peft or {}).values() for t in (getattr(c, "target_modules", None) or ())}
    return estimate_memory(
        inner.config,
        trainable_params=trainable,
        total_params=total,
        param_dtype=first.dtype,
        grad_checkpointing=grad_checkpointing,
        lora=peft is not None,
        lora_mlp=bool(targets & MLP_MODULES),
        frozen_params=frozen_params,
        lm_head=head is not None,
        seq_len=seq_len,
        attn_implementation=attn_implementation,
        reference_forward=reference_forward,
        shards=shards,
    )


def mem_available_bytes(meminfo: str | os.PathLike[str] = "/proc/meminfo") -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (the kernel's estimate of what can be allocated)."""
    for line in Path(meminfo).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemAvailable line")


def default_memory_limit(device: torch.device, resident_bytes: int = 0) -> int:
    """CUDA: ``0.9 x`` the device's total memory. CPU: ``0.8 x (MemAvailable + resident_bytes)``.

    ``resident_bytes`` is what the already loaded models hold: MemAvailable no longer counts it, but the
    estimate does. Several local ranks (``LOCAL_WORLD_SIZE``) on one CPU host share the RAM equally.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_FRACTION)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(CPU_FRACTION * (mem_available_bytes() + resident_bytes * ranks) / ranks)


def _agree_on_min(value: int, device: torch.device) -> tuple[int, int]:
    """``(smallest value over the ranks, world size)`` under torch.distributed (so every rank picks the same
    plan); ``(value, 1)`` in one process."""
    import torch
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return value, 1
    on = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=on)
    tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
    return int(t.item()), tdist.get_world_size()


def _fsdp_shards(train: TrainSection) -> int:
    """The world size when ``train.distributed.strategy`` is fsdp under torch.distributed, else 1."""
    import torch.distributed as tdist

    dist = getattr(train, "distributed", None)
    if getattr(dist, "strategy", None) != "fsdp" or not (tdist.is_available() and tdist.is_initialized()):
        return 1
    return tdist.get_world_size()


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _report(plan: BatchPlan, kept: bool = False) -> None:
    if not _is_main():
        return
    from rich.console import Console

    text = f"batch plan ({plan.mode}): {plan.tokens_per_batch} tokens per micro-batch, grad_accum {plan.grad_accum}"
    if plan.est_peak_bytes is not None:
        text += f", estimated peak {plan.est_peak_bytes / GIB:.2f} GiB"
    if plan.limit_bytes is not None:
        text += f" of a {plan.limit_bytes / GIB:.2f} GiB limit"
    if kept:
        text += f" (kept from this run's {PLAN_FILE})"
    log.info(text)
    Console(stderr=True, soft_wrap=True).print(text)


def resolve_token_budget(
    train: TrainSection,
    model: nn.Module,
    model_section: ModelSection,
    max_length: int,
    *,
    frozen_params: int = 0,
    reference: Literal["cached", "live"] | None = None,
    state_dir: str | os.PathLike[str] | None = None,
) -> BatchPlan:
    """The micro-batch token budget and accumulation of a run, from ``train.tokens_per_batch``.

    ``max_length`` is the sampler's (``data.max_length``, doubled for chosen + rejected). None gives today's
    ``(batch_size x max_length, grad_accum)``; N gives ``(N, grad_accum)``; ``auto`` gives :func:`plan_batches`
    under ``train.memory_limit_gb`` (default :func:`default_memory_limit`). ``reference``: DPO's reference
    log-probs, precomputed (``cached``) or computed per micro-batch (``live``); without LoRA the reference is a
    frozen copy of the policy's size unless ``frozen_params`` says otherwise. An ``auto`` plan is kept in
    ``state_dir/batch_plan.json`` so a resumed run samples the same batches whatever memory is free then.
    The plan is logged (unless ``default``) and returned for the run's summary.
    """
    setting = train.tokens_per_batch
    rows_tokens = train.batch_size * max_length
    if setting is None:
        return BatchPlan(rows_tokens, train.grad_accum, None, mode="default")
    lora = hasattr(_unwrap(model), "peft_config")
    if reference is not None and not lora and not frozen_params:
        frozen_params = count_params(model)[1]
    try:
        estimate: MemoryEstimate | None = model_estimate(
            model,
            grad_checkpointing=model_section.gradient_checkpointing,
            seq_len=max_length,
            attn_implementation=model_section.attn_implementation,
            frozen_params=frozen_params,
            reference_forward=reference == "live",
            shards=_fsdp_shards(train),
        )
    except (AttributeError, TypeError, ValueError) as exc:  # a model whose config names no sizes we know
        if setting == "auto":
            raise ConfigError(
                f"train.tokens_per_batch=auto cannot estimate the memory of {type(_unwrap(model)).__name__}: "
                f"{exc}; set train.tokens_per_batch to a number of tokens instead"
            ) from None
        estimate = None
    if setting != "auto":
        if setting < max_length:
            raise ConfigError(
                f"train.tokens_per_batch={setting} is below the longest example a micro-batch must hold "
                f"({max_length} tokens: data.max_length, doubled for a preference pair); use at least "
                f"{max_length}, or shorten data.max_length"
            )
        plan = BatchPlan(
            int(setting),
            train.grad_accum,
            None if estimate is None else estimate.peak_bytes(min(int(setting), rows_tokens)),
            mode="fixed",
            fixed_bytes=None if estimate is None else estimate.fixed_bytes,
            bytes_per_token=None if estimate is None else estimate.bytes_per_token,
        )
        _report(plan)
        return plan

    key = {"batch_size": train.batch_size, "grad_accum": train.grad_accum, "max_length": max_length}
    path = Path(state_dir) / PLAN_FILE if state_dir is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            plan = BatchPlan(**saved["plan"])
            _report(plan, kept=True)
            return plan
    first = next(model.parameters())
    if train.memory_limit_gb is not None:
        limit = int(train.memory_limit_gb * GIB)
    else:
        resident = (count_params(model)[1] + frozen_params) * first.element_size()
        limit = default_memory_limit(first.device, resident)
    limit, world = _agree_on_min(limit, first.device)
    assert estimate is not None  # auto raised above otherwise
    plan = plan_batches(
        estimate,
        limit,
        global_tokens=rows_tokens * train.grad_accum,
        max_length=max_length,
        batch_size=train.batch_size,
        accum_multiple=world,
    )
    if path is not None and _is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "plan": asdict(plan)}, indent=1))
        os.replace(tmp, path)
    _report(plan)
    return plan
