"""Candidate responses from a policy: ``n`` completions per prompt, decoded to text.

This is how the quickstart (and ``alignflow generate``) samples: through the one rollout sampler,
:func:`alignflow.rollout.generation.sample`, so it takes the lean fast path where the model is eligible and
behaves exactly as PPO's rollouts do. Prompts are encoded as PPO encodes them
(:func:`alignflow.data.prompts.encode_prompt`: bos before plain text, nothing added to chat-templated text),
left-padded, and sampled in batches of ``batch_size`` completions.

Reproducibility: one ``torch.Generator`` seeded with ``seed`` drives every batch, so a call is a function of
(model, prompts, settings, seed). Sampled tokens differ from ``model.generate``'s for the same seed (the
sampler draws by inverse CDF, not ``torch.multinomial``); greedy decoding (``temperature=0``) is
token-for-token the same as ``generate(do_sample=False)``.

Post-processing (e.g. cutting a chat reply at the end of its first line) is a property of the domain, not of
generation: pass it as ``postprocess``.

A byte-level tokenizer can decode a sampled byte 0 to a NUL character, which PostgreSQL text cannot hold and the
annotation platform refuses on import; it comes back as U+FFFD, the character a byte that decodes to nothing
printable already becomes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from alignflow.data.prompts import Prompt, encode_prompt, left_pad
from alignflow.rollout.generation import sample

REPLACEMENT = "\ufffd"


def _load(model: str | os.PathLike[str] | nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    from alignflow.models import load_policy, load_tokenizer

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise ValueError("generate_candidates: pass the tokenizer along with a loaded model")
        return model, tokenizer
    tok = tokenizer if tokenizer is not None else load_tokenizer(model, padding_side="left")
    return load_policy(model, dtype="float32"), tok


def generate_candidates(
    model: str | os.PathLike[str] | nn.Module,
    tokenizer: Any,
    prompts: Sequence[str | Prompt],
    *,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 64,
    max_prompt_length: int | None = None,
    postprocess: Callable[[str], str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """``n`` completions for each prompt; ``out[i][j]`` is the j-th completion of ``prompts[i]``.

    Args:
        model: a model directory (loaded in float32 on CPU) or a loaded causal LM; a loaded model is put in
            eval mode for the call and its mode restored after.
        tokenizer: the model's tokenizer, or None to load it from the model directory.
        prompts: plain prompt texts, or :class:`~alignflow.data.prompts.Prompt` s (e.g. chat-templated ones from
            :func:`~alignflow.data.prompts.prompts_from_rows`); text is used as given.
        n: completions per prompt (at least 1).
        temperature: 0 means greedy; ``n > 1`` greedy completions are then all the same.
        top_p: nucleus mass in ``(0, 1]``.
        max_new_tokens: cap on each completion's length in tokens, EOS included.
        seed: seeds the generator every batch draws from.
        batch_size: completions sampled together; the ``n`` completions of one prompt are consecutive.
        max_prompt_length: keep only the last this many prompt tokens (None: the whole prompt).
        postprocess: applied to each decoded completion (special tokens are already stripped, NUL characters
            replaced with U+FFFD).
        progress: called after each batch with the number of completions it produced.
    """
    if n < 1:
        raise ValueError(f"generate_candidates: n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"generate_candidates: batch_size must be >= 1, got {batch_size}")
    net, tok = _load(model, tokenizer)
    device = next(net.parameters()).device
    items = [p if isinstance(p, Prompt) else Prompt(p) for p in prompts]
    encoded = [encode_prompt(tok, p.text, max_prompt_length, templated=p.templated) for p in items]
    flat = [i for i in range(len(prompts)) for _ in range(n)]
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[list[str]] = [[] for _ in prompts]
    was_training = net.training
    net.eval()
    try:
        for start in range(0, len(flat), batch_size):
            rows = flat[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], tok.pad_token_id, device)
            roll = sample(
                net,
                ids,
                mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                temperature=temperature,
                top_p=top_p,
                generator=generator,
            )
            tokens = [
                r[m.bool()].tolist()
                for r, m in zip(roll.response_ids.cpu(), roll.response_mask.cpu(), strict=True)
            ]
            texts = [
                t.replace("\x00", REPLACEMENT) for t in tok.batch_decode(tokens, skip_special_tokens=True)
            ]
            for i, text in zip(rows, texts, strict=True):
                out[i].append(postprocess(text) if postprocess else text)
            if progress is not None:
                progress(len(rows))
    finally:
        net.train(was_training)
    return out
