"""Load policy, reference, reward and value models and tokenizers from local Hugging Face directories.

Everything here reads a directory written by ``save_pretrained`` (ours or a user's). Before handing
the directory to ``transformers`` we check the three things that most often go wrong and that
``transformers`` reports with deep, unhelpful stack traces: the directory is missing, it has no
weights file, or its ``config.json`` names a ``model_type`` this ``transformers`` does not know.
Those raise :class:`ModelLoadError`, which names the directory, the problem and the fix.

LoRA goes through ``peft``. The reference model of a LoRA policy is the same module with its
adapters switched off (:func:`reference_mode`), so no second copy of the weights is held.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from alignflow.errors import AlignflowError

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class ModelLoadError(AlignflowError):
    """A model or tokenizer directory cannot be loaded; the message names the directory and the fix."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter settings (Hu et al. 2021, "LoRA", eq. 3: ``h = W0 x + (alpha / r) * B A x``).

    ``adapter_path`` loads an existing adapter (trainable) instead of initialising a new one.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Sequence[str] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    adapter_path: str | os.PathLike[str] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# dtype and device


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (AVX512-BF16 or AMX-BF16).

    Without them bf16 matmuls on CPU are emulated and ~25x slower than fp32 (see DEPENDENCY-NOTES.md),
    so ``dtype="auto"`` must not pick bf16 there.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: DType | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Map a dtype name to a ``torch.dtype``; ``"auto"`` is bf16 only where the hardware runs it natively."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype must be one of 'auto', {', '.join(repr(n) for n in names)}; got {dtype!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        return (
            torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        )
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# directory checks


def _check_model_dir(path: str | os.PathLike[str], *, need_weights: bool = True) -> Path:
    """Fail early, naming the directory, for the errors transformers reports badly."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    p = Path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model directory {p} does not exist; pass a local directory written by save_pretrained "
            "(models are never downloaded at run time)"
        )
    if not p.is_dir():
        raise ModelLoadError(f"model path {p} is a file, expected a directory written by save_pretrained")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{cfg_file} is missing; the directory must hold config.json from save_pretrained"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ModelLoadError(
            f"{cfg_file}: field 'model_type' is missing; re-save the model with save_pretrained"
        )
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"{cfg_file}: unknown architecture model_type={model_type!r}; this transformers does not know it. "
            "Fix the model_type field or upgrade transformers (custom code via trust_remote_code is not loaded)"
        )
    if need_weights and not any((p / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(
            f"{p} has no weights file (expected one of {', '.join(WEIGHT_FILES)}); "
            "the save was interrupted or the files were not copied — re-save the model with save_pretrained"
        )
    return p


@contextlib.contextmanager
def _translate_errors(path: Path, what: str) -> Iterator[None]:
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside transformers becomes one clear message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {what} from {path}: {first}") from exc


@contextlib.contextmanager
def quiet_transformers_progress() -> Iterator[None]:
    """Silence transformers' own tqdm bars ("Loading weights", "Writing model shards") inside the block.

    transformers draws one bar per ``from_pretrained``/``save_pretrained``; a stage loads and saves many
    models in well under a second each, so those bars bury the stage's own progress (one bar per long
    step). The previous setting is restored on exit, so a user's own loads outside alignflow keep theirs.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _expected_fresh_head(expected: bool) -> Iterator[None]:
    """Hide transformers' LOAD REPORT when a causal-LM checkpoint gets a fresh score head, as RM training and
    PPO's critic always do: "lm_head UNEXPECTED, score MISSING" is then the expected result, printed once per
    load (four times a demo). A sequence-classification checkpoint keeps the report: a mismatch there is news.
    """
    if not expected:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(path: str | os.PathLike[str], padding_side: Literal["left", "right"] = "right") -> Any:
    """Load a tokenizer from a local directory.

    Decoder-only generation needs ``padding_side="left"``; training uses ``"right"``.
    Documented fix-up: a tokenizer without a pad token gets ``pad = eos`` (with a warning). Labels
    must then be built from lengths/masks, never by comparing ids to ``pad_token_id``, since eos
    tokens inside a completion would be mistaken for padding. No pad and no eos is an error.
    """
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(
            f"tokenizer directory {p} does not exist; pass a directory written by save_pretrained"
        )
    if not any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ModelLoadError(
            f"{p} has no tokenizer.json or tokenizer_config.json; save the tokenizer there first"
        )
    with _translate_errors(p, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(p), padding_side=padding_side)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(
                f"tokenizer in {p} has neither a pad token nor an eos token; add a pad token "
                "(tokenizer.add_special_tokens({'pad_token': ...})) and save it again"
            )
        logger.warning(
            "tokenizer in %s has no pad token; using eos %r as pad (documented fix-up)", p, tok.eos_token
        )
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# models


def _common_kwargs(dtype: DType | torch.dtype, device: str, attn_implementation: str) -> dict[str, Any]:
    return {"dtype": resolve_dtype(dtype, device), "attn_implementation": attn_implementation}


def _enable_checkpointing(model: nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (deprecated, removed in v6).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _apply_lora(model: nn.Module, lora: LoraSpec, task_type: str) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if lora.adapter_path is not None:
        ap = Path(lora.adapter_path)
        if not (ap / "adapter_config.json").is_file() or not any(
            (ap / n).is_file() for n in ADAPTER_WEIGHT_FILES
        ):
            raise ModelLoadError(
                f"LoRA adapter directory {ap} must hold adapter_config.json and adapter_model.safetensors"
            )
        with _translate_errors(ap, "LoRA adapter"), quiet_transformers_progress():
            return PeftModel.from_pretrained(model, str(ap), is_trainable=True)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, cfg)


def load_policy(
    path: str | os.PathLike[str],
    dtype: DType | torch.dtype = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lora: LoraSpec | None = None,
) -> nn.Module:
    """Load a causal LM (``AutoModelForCausalLM``) for training, optionally wrapped with LoRA adapters."""
    from transformers import AutoModelForCausalLM

    p = _check_model_dir(path)
    with _translate_errors(p, "policy"), quiet_transformers_progress():
        model = AutoModelForCausalLM.from_pretrained(
            str(p), **_common_kwargs(dtype, device, attn_implementation)
        )
    model.to(device)
    if gradient_checkpointing:
        _enable_checkpointing(model)
        # Checkpointing is incompatible with the KV cache during training forward passes.
        model.config.use_cache = False
        if lora is not None:
            model.enable_input_require_grads()
    if lora is not None:
        model = _apply_lora(model, lora, "CAUSAL_LM")
    model.train()
    return model


def load_reference(
    path: str | os.PathLike[str],
    dtype: DType | torch.dtype = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
) -> nn.Module:
    """Load a frozen copy of a causal LM in eval mode (for full fine-tuning; LoRA uses :func:`reference_mode`)."""
    model = load_policy(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def reference_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a LoRA policy as its own reference: adapters disabled, same parameters, no second copy.

    Usage: ``with reference_mode(policy): ref_logits = policy(ids).logits``. Computations inside are
    usually wrapped in ``torch.no_grad()`` by the caller.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"reference_mode needs a peft.PeftModel (a policy loaded with lora=LoraSpec(...)); got "
            f"{type(model).__name__}. For full fine-tuning load a separate reference with load_reference()"
        )
    with model.disable_adapter():
        yield model


def load_reward_model(
    path: str | os.PathLike[str],
    dtype: DType | torch.dtype = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lora: LoraSpec | None = None,
    pad_token_id: int | None = None,
    num_labels: int = 1,
) -> nn.Module:
    """Load a reward model: ``AutoModelForSequenceClassification`` with ``num_labels`` outputs (1 = scalar; a
    multi-head reward model has one per head, in the order ``ensemble.json``'s ``heads`` gives).

    The sequence-classification head pools the last non-pad token, which it finds through
    ``config.pad_token_id``; we set it (from ``pad_token_id`` or the saved config) and fail if neither
    gives one. A causal-LM checkpoint gets a freshly initialised ``score`` head (expected for RM training).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    p = _check_model_dir(path)
    with _translate_errors(p, "reward model"), quiet_transformers_progress():
        cfg = AutoConfig.from_pretrained(str(p))
        cfg.num_labels = num_labels
        if pad_token_id is not None:
            cfg.pad_token_id = pad_token_id
        if cfg.pad_token_id is None:
            raise ModelLoadError(
                f"{p / 'config.json'}: pad_token_id is not set; pass pad_token_id=tokenizer.pad_token_id"
            )
        fresh_head = not any(a.endswith("ForSequenceClassification") for a in cfg.architectures or [])
        with _expected_fresh_head(fresh_head):
            model = AutoModelForSequenceClassification.from_pretrained(
                str(p), config=cfg, **_common_kwargs(dtype, device, attn_implementation)
            )
    model.to(device)
    if gradient_checkpointing:
        _enable_checkpointing(model)
        if lora is not None:
            model.enable_input_require_grads()
    if lora is not None:
        model = _apply_lora(model, lora, "SEQ_CLS")
    model.train()
    return model


class ValueHead(nn.Module):
    """Linear value head ``V(h_t) = w^T h_t + b`` on the trunk's last hidden states.

    Input ``(B, T, H)``, output ``(B, T)``. Initialised to zero so the first value estimates do not
    inject noise into GAE (Schulman et al. 2016).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states).squeeze(-1)  # (B, T)


class CausalLMWithValueHead(nn.Module):
    """A causal LM and a value head sharing one trunk: ``forward`` returns ``(logits (B,T,V), values (B,T))``."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = ValueHead(lm.config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits_to_keep``: as in HF, logits for the last N positions only (0 = all); values cover all."""
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=logits_to_keep,
        )
        hidden = out.hidden_states[-1]  # (B, T, H)
        return out.logits, self.value_head(hidden.to(self.value_head.summary.weight.dtype))


def load_value_model(
    path: str | os.PathLike[str],
    dtype: DType | torch.dtype = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    gradient_checkpointing: bool = False,
    lora: LoraSpec | None = None,
    pad_token_id: int | None = None,
    shared_trunk: bool = False,
) -> nn.Module:
    """Load a PPO value model.

    ``shared_trunk=False``: a separate ``AutoModelForSequenceClassification`` (1 label), whose per-token
    scores ``(B, T)`` come from ``model.model`` + ``model.score``. ``shared_trunk=True``: the policy's
    causal LM with a :class:`ValueHead`, returned as :class:`CausalLMWithValueHead`.
    """
    if not shared_trunk:
        return load_reward_model(
            path,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            gradient_checkpointing=gradient_checkpointing,
            lora=lora,
            pad_token_id=pad_token_id,
        )
    lm = load_policy(
        path,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
        gradient_checkpointing=gradient_checkpointing,
        lora=lora,
    )
    model = CausalLMWithValueHead(lm)
    model.value_head.to(device)
    return model
