"""Models and tokenizers: loading from local HF directories, LoRA, reference mode, tiny-model factory.

Submodules not re-exported here (import them directly): :mod:`alignflow.models.reward` (the reward-model
ensemble format, loading and scoring its members, ``freeze_bottom``) and :mod:`alignflow.models.export`
(writing a trained model back out as a HF folder).
"""

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
    make_tiny_encoder_dir,
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
    "make_tiny_encoder_dir",
    "make_tiny_model_dir",
    "reference_mode",
    "resolve_dtype",
    "tiny_llama",
    "train_bpe_tokenizer",
]
