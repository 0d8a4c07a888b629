"""Batched KV-cache sampling for on-policy RLHF: the hot path (most of an RLHF step is generation).

Why our own loop instead of ``model.generate``: ``generate`` rebuilds the attention mask by concatenation
every step, runs a chain of logits processors and stopping criteria, and computes logits for every prompt
position in the prefill. Here the KV cache (``transformers.StaticCache``), the attention mask and the output
buffer are allocated once, the prefill
computes logits for the last position only (``logits_to_keep=1``), sampling works in place on a ``(B, V)``
tensor, and the loop stops as soon as every row has emitted EOS. Greedy decoding (``temperature=0``) is
token-for-token identical to ``generate(do_sample=False)`` (tested).

For plain Llama models the forward itself is replaced by :mod:`alignflow.rollout.fast_llama` (``fast=True``, the
default): same logits to float rounding with fewer, larger ops (fused QKV and gate/up weights, a preallocated
cache, a prefill over real prompt tokens only). At small batch a decode step is then bound by reading the fp32
weights from memory. Other models (PEFT/LoRA wrappers, other architectures) use the HF forward with a
``StaticCache``.

Tokens are drawn by inverse CDF (:func:`categorical_draw`: one uniform per row, a float64 cumulative sum and a
binary search) rather than ``torch.multinomial``, whose exponential-race draw costs ~1 ms per step at
``(16, 4096)`` on CPU. Same distribution, different tokens for a given seed than ``multinomial`` would give.

Log-probabilities returned with the sample (``logprobs``) are ``log softmax(logits / temperature)`` at the
sampled token: the *temperature-scaled, untruncated* distribution. That is the distribution the PPO trainer
differentiates (it divides the logits by the same temperature), so these can serve as the "old" log-probs
without a second forward pass. Top-p only decides which tokens may be drawn; it does not enter the
log-probs (as in TRL and OpenRLHF), so a top-p rollout is slightly off-policy for the trainer — use
``top_p=1`` when exact on-policy ratios matter. In greedy mode (``temperature=0``) the log-probs are those of
the unscaled distribution (temperature 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignflow.rollout.fast_llama import build_fast_llama


@dataclass
class Rollout:
    """Output of :func:`sample`.

    Attributes:
        prompt_ids: ``(B, P)`` left-padded prompt ids (as given).
        prompt_mask: ``(B, P)`` 1 on real prompt tokens.
        response_ids: ``(B, R)`` sampled ids, ``pad_token_id`` after a row's EOS; ``R <= max_new_tokens``
            (the loop stops once every row has finished).
        response_mask: ``(B, R)`` 1 on generated tokens up to and including the first EOS.
        logprobs: ``(B, R)`` float32 log-probs of the sampled tokens under the sampling policy (see module
            docstring), 0 on masked-out positions.
        finished: ``(B,)`` bool, True where the row emitted EOS within ``max_new_tokens``.
        seconds: wall time of the call.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    finished: Tensor
    seconds: float

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` response lengths in tokens (EOS included)."""
        return self.response_mask.sum(dim=1)

    @property
    def new_tokens(self) -> int:
        return int(self.response_mask.sum())

    def sequences(self) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` of prompt + response, ``(B, P + R)``, ready for a scoring forward."""
        return (
            torch.cat([self.prompt_ids, self.response_ids], dim=1),
            torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1),
        )


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", eq. 2), in place.

    Keeps the smallest set of highest-probability tokens whose total probability reaches ``top_p`` (always at
    least the top token); the rest get ``-inf``. ``logits`` is ``(B, V)``; returns the same tensor.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # A token is dropped when the tokens ranked above it already reach top_p; the top token always stays.
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.masked_fill_(drop, float("-inf"))


def categorical_draw(
    probs: Tensor, generator: torch.Generator | None = None, u: Tensor | None = None
) -> Tensor:
    """One draw per row from the (possibly unnormalised) categorical distributions ``probs`` ``(B, V)``.

    Inverse CDF: ``u ~ U[0, 1)`` per row, the first index whose cumulative mass exceeds ``u * total``. Zero-mass
    entries (e.g. removed by top-p) are never drawn: the cumulative sum is flat there and the search is strict
    (``right=True``). The cumulative sum is in float64 so rounding over a large vocabulary does not shift mass,
    and the target is kept strictly below the total so a ``u`` that rounds up cannot fall off the end.
    Rows must have positive total mass. ``u`` ``(B, 1)`` float64: the uniforms to use instead of drawing them
    from ``generator``. Returns ``(B,)`` int64.
    """
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device)
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def prompt_position_ids(attention_mask: Tensor) -> Tensor:
    """Position ids for a left-padded batch: ``cumsum(mask) - 1``, with 1 on padding (as ``generate`` does)."""
    pos = attention_mask.long().cumsum(dim=1) - 1
    return pos.masked_fill_(attention_mask == 0, 1)


@torch.no_grad()
def sample(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int | list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    static_cache: bool = True,
    fast: bool = True,
    row_index: Tensor | list[int] | None = None,
    num_rows: int | None = None,
    keep_going: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample up to ``max_new_tokens`` tokens for each left-padded prompt with a KV cache.

    Args:
        model: a causal LM (``transformers`` or a ``peft`` wrapper); its train/eval mode is left untouched, so
            put it in eval mode first if it has dropout.
        prompt_ids: ``(B, P)`` int64, left-padded.
        prompt_mask: ``(B, P)`` 0/1.
        max_new_tokens: at least 1.
        eos_token_id: one id or several; a row finishes at the first one it samples.
        pad_token_id: written after a row finishes.
        temperature: 0 means greedy (argmax).
        top_p: nucleus mass in ``(0, 1]``.
        generator: a ``torch.Generator`` on the model's device for reproducible sampling; default the global RNG.
        static_cache: pre-allocate the KV cache (``transformers.StaticCache``) instead of growing it (HF path).
        fast: use :mod:`alignflow.rollout.fast_llama` when the model is eligible (plain Llama); otherwise, or
            with ``fast=False``, the HF forward.
        row_index, num_rows: draws that do not depend on which rows a process holds (data-parallel PPO).
            With them, every decode step draws ``num_rows`` uniforms from ``generator`` (a CPU generator, the
            same seed in every process) and row ``b`` of this batch uses entry ``row_index[b]``: the rows of
            a global batch of ``num_rows`` get the same tokens however the batch is split across processes.
            Without them (the default) one uniform per row of this batch is drawn, as before.
        keep_going: called once per decode step with "all of this batch's rows are done"; the loop stops when
            it returns False (e.g. a collective ``any`` over processes that must run the same number of
            forwards). Default: stop when this batch is done.

    Returns:
        :class:`Rollout`.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids and prompt_mask must both be (B, P); got {tuple(prompt_ids.shape)} and "
            f"{tuple(prompt_mask.shape)}"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left-padded: the last column of prompt_mask has zeros")
    if (row_index is None) != (num_rows is None):
        raise ValueError("pass both row_index and num_rows, or neither")
    draw_rows: Tensor | None = None
    if row_index is not None:
        draw_rows = torch.as_tensor(row_index, dtype=torch.long).cpu()
        if draw_rows.shape != (prompt_ids.shape[0],):
            raise ValueError(
                f"row_index must have one entry per row ({prompt_ids.shape[0]}), got {tuple(draw_rows.shape)}"
            )
        if len(draw_rows) and (int(draw_rows.min()) < 0 or int(draw_rows.max()) >= int(num_rows)):  # type: ignore[arg-type]
            raise ValueError(f"row_index entries must lie in [0, num_rows={num_rows})")
    from transformers import DynamicCache, StaticCache

    t0 = time.perf_counter()
    device = prompt_ids.device
    batch, plen = prompt_ids.shape
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    # One mask buffer for the whole call; each step passes a view of its first columns.
    full_mask = torch.ones(batch, plen + max_new_tokens, dtype=prompt_mask.dtype, device=device)
    full_mask[:, :plen] = prompt_mask
    out_ids = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    out_logps = torch.zeros(batch, max_new_tokens, dtype=torch.float32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)

    positions = prompt_position_ids(prompt_mask)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    # Built per call: it holds fused copies of the weights, which go stale once the policy is trained.
    lean = build_fast_llama(model, batch, plen + max_new_tokens) if fast else None
    if lean is not None:
        logits = lean.prefill(prompt_ids, prompt_mask, positions)
    else:
        # A static cache writes each step's keys/values into a pre-allocated buffer; the dynamic cache
        # re-concatenates the whole cache every step (measured: ~18% of sampling time on a 4-layer, hidden-256
        # model).
        config = getattr(model, "config", None)
        cache = (
            StaticCache(config=config, max_cache_len=plen + max_new_tokens)
            if static_cache and config is not None
            else DynamicCache()
        )
        logits = model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]
    steps = 0
    for t in range(max_new_tokens):
        # A private fp32 copy (B x V, cheap): the in-place ops below must not write into the model's output.
        logits = logits.to(torch.float32, copy=True)
        if temperature > 0:
            if temperature != 1.0:
                logits.div_(temperature)
            logps = torch.log_softmax(logits, dim=-1)
            # Without top-p the sampling distribution is exp(logps): saves a softmax.
            probs = logps.exp() if top_p >= 1.0 else top_p_filter(logits, top_p).softmax(dim=-1)
            if draw_rows is None:
                token = categorical_draw(probs, generator)
            else:  # the global batch's uniforms for this step; this batch's rows read theirs
                u_all = torch.rand(int(num_rows), 1, generator=generator, dtype=torch.float64)  # type: ignore[arg-type]
                token = categorical_draw(probs, u=u_all[draw_rows].to(device))
        else:
            logps = torch.log_softmax(logits, dim=-1)
            token = logits.argmax(dim=-1)
        token = token.masked_fill_(done, pad_token_id)
        out_ids[:, t] = token
        out_logps[:, t] = logps.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill_(done, 0.0)
        hit = torch.isin(token, eos) & ~done
        lengths = torch.where(hit, torch.full_like(lengths, t + 1), lengths)
        done |= hit
        steps = t + 1
        # One host sync per step: stopping early when all rows are done pays for itself many times over.
        if t == max_new_tokens - 1:
            break
        finished_all = bool(done.all())
        if not (keep_going(finished_all) if keep_going is not None else not finished_all):
            break
        if lean is not None:
            logits = lean.step(token, next_pos, plen + t)
        else:
            logits = model(
                input_ids=token.unsqueeze(1),
                attention_mask=full_mask[:, : plen + t + 1],
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]
        next_pos = next_pos + 1
    response_ids = out_ids[:, :steps].clone()
    steps_idx = torch.arange(steps, device=device).unsqueeze(0)
    response_mask = (steps_idx < lengths.unsqueeze(1)).long()
    logprobs = out_logps[:, :steps].clone() * response_mask
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=logprobs,
        finished=done.clone(),
        seconds=time.perf_counter() - t0,
    )
