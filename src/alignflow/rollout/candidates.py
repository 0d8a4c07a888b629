"""Candidate responses from a policy: ``n`` completions per prompt, decoded to text.

This is how the quickstart (and ``alignflow generate``) samples: through the one rollout sampler,
:func:`alignflow.rollout.generation.sample`, so it takes the lean fast path where the model is eligible and
behaves exactly as PPO's rollouts do. Prompts are encoded with PPO's rule (bos before plain prompts, none
before chat-templated ones, which carry their own), left-padded, and sampled in batches of ``batch_size``
completions.

Reproducibility: one ``torch.Generator`` seeded with ``seed`` drives every batch, so a call is a function of
(model, prompts, settings, seed). Sampled tokens differ from ``model.generate``'s for the same seed (the
sampler draws by inverse CDF, not ``torch.multinomial``); greedy decoding (``temperature=0``) is
token-for-token the same as ``generate(do_sample=False)``.

Post-processing (e.g. cutting a chat reply at the end of its first line) is a property of the domain, not of
generation: pass it as ``postprocess``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alignflow.rollout.generation import sample


def encode_prompt(tok: Any, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of one prompt: bos first for plain text (as SFT's encoder does), nothing added to a
    chat-templated prompt (its text starts with the bos token already); the last ``max_length`` ids kept."""
    templated = tok.bos_token is not None and text.startswith(tok.bos_token)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not templated and tok.bos_token_id is not None:
        ids = [tok.bos_token_id, *ids]
    return ids[-max_length:] if max_length else ids


def left_pad(
    seqs: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """``(ids, mask)``, both ``(B, P)`` int64 with ``P`` the longest sequence: sequences right-aligned, ``pad``
    and mask 0 on the left (the layout :func:`~alignflow.rollout.generation.sample` needs)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


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
    prompts: Sequence[str],
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
        prompts: prompt texts, used as given (apply a chat template before, if the model expects one).
        n: completions per prompt (at least 1).
        temperature: 0 means greedy; ``n > 1`` greedy completions are then all the same.
        top_p: nucleus mass in ``(0, 1]``.
        max_new_tokens: cap on each completion's length in tokens, EOS included.
        seed: seeds the generator every batch draws from.
        batch_size: completions sampled together; the ``n`` completions of one prompt are consecutive.
        max_prompt_length: keep only the last this many prompt tokens (None: the whole prompt).
        postprocess: applied to each decoded completion (special tokens are already stripped).
        progress: called after each batch with the number of completions it produced.
    """
    if n < 1:
        raise ValueError(f"generate_candidates: n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"generate_candidates: batch_size must be >= 1, got {batch_size}")
    net, tok = _load(model, tokenizer)
    device = next(net.parameters()).device
    encoded = [encode_prompt(tok, p, max_prompt_length) for p in prompts]
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
            texts = tok.batch_decode(tokens, skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                out[i].append(postprocess(text) if postprocess else text)
            if progress is not None:
                progress(len(rows))
    finally:
        net.train(was_training)
    return out
