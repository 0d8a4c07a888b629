"""Models and tokenizers: loading from local HF directories, LoRA, reference mode, tiny-model factory."""

from alignflow.models.loading import (
    CausalLMWithValueHead,
    LoraSpec,
    ModelLoadError,
    ValueHead,
    cpu_has_native_bf16,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    reference_mode,
    resolve_dtype,
)
from alignflow.models.tiny import (
    CHAT_TEMPLATE,
    default_corpus,
    make_tiny_model_dir,
    tiny_llama,
    train_bpe_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CausalLMWithValueHead",
    "LoraSpec",
    "ModelLoadError",
    "ValueHead",
    "cpu_has_native_bf16",
    "default_corpus",
    "load_policy",
    "load_reference",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
    "make_tiny_model_dir",
    "reference_mode",
    "resolve_dtype",
    "tiny_llama",
    "train_bpe_tokenizer",
]
