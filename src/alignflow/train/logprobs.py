"""Token and sequence log-probabilities for causal LMs.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary.

Label convention (the Hugging Face one): ``labels`` are aligned with ``input_ids`` (same ``(B, T)`` shape),
``-100`` marks positions that carry no loss (prompt, padding), and the logits at position ``t`` predict the
token at ``t + 1``. The shift by one happens in exactly one place, :func:`shift_for_next_token`; every other
function here and in :mod:`alignflow.train.losses` goes through it, and the number of loss-bearing tokens is
counted in exactly one place, :func:`count_target_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -100

# Rows of the flattened (N, V) logits processed per logsumexp call: bounds the temporary memory of the
# low-precision path to chunk_rows * V float32 values.
DEFAULT_CHUNK_ROWS = 1024


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align logits with the tokens they predict (the single place the causal shift happens).

    Args:
        logits: ``(B, T, V)`` model outputs for ``input_ids``.
        labels: ``(B, T)`` targets aligned with ``input_ids`` (``-100`` = ignored).

    Returns:
        ``(logits[:, :-1], labels[:, 1:])`` with shapes ``(B, T-1, V)`` and ``(B, T-1)``.
    """
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"expected logits (B,T,V) and labels (B,T), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T); "
            "labels must be aligned with input_ids (unshifted)"
        )
    return logits[:, :-1, :], labels[:, 1:]


def count_target_tokens(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of tokens that carry loss in ``labels`` after the causal shift.

    This is the one token count every recipe uses as a loss normaliser. Under gradient accumulation (or data
    parallelism) sum this over all micro-batches (and ranks) of an optimizer step and pass the total as
    ``num_items_in_batch`` to :func:`alignflow.train.losses.token_nll`, so that ``k`` micro-batches of size ``b`` give
    exactly the gradient of one batch of size ``k * b``.

    Args:
        labels: ``(B, T)`` targets aligned with ``input_ids``.

    Returns:
        0-dim int64 tensor: ``(labels[:, 1:] != ignore_index).sum()``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be (B, T), got {tuple(labels.shape)}")
    return (labels[:, 1:] != ignore_index).sum()


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Tensor:
    """``log_softmax(logits)`` gathered at ``index`` without materialising the full log-softmax.

    Uses ``log p_i = x_i - logsumexp(x)``: gather one logit per row, compute ``logsumexp`` over row chunks.
    For float16 / bfloat16 logits each chunk is upcast to float32 on its own (logsumexp in half precision
    loses several digits), so only ``chunk_rows x V`` float32 values exist at a time; the result is float32.

    Args:
        logits: ``(..., V)`` unnormalised scores, e.g. ``(B, T, V)``.
        index: ``(...)`` int64 token ids, e.g. ``(B, T)``; every entry must be a valid id in ``[0, V)``.
        chunk_rows: rows of the flattened ``(N, V)`` logits per logsumexp call.

    Returns:
        ``(...)`` log-probabilities (float32 for half-precision inputs, else the input dtype).
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal logits shape without the vocab dim {tuple(logits.shape[:-1])}"
        )
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    low_precision = logits.dtype in (torch.float16, torch.bfloat16)
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    selected = torch.gather(flat, 1, index.reshape(-1, 1)).squeeze(1)
    if low_precision:
        selected = selected.float()
    lse = torch.cat(
        [
            torch.logsumexp(chunk.float() if low_precision else chunk, dim=-1)
            for chunk in flat.split(chunk_rows)
        ]
    )
    return (selected - lse).reshape(index.shape)


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Per-token log-probability of each next token, with the causal shift applied.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` aligned with ``input_ids``, ``ignore_index`` where no loss is taken.

    Returns:
        ``(logps, mask)``, both ``(B, T-1)``: ``logps[b, t] = log p(labels[b, t+1] | tokens <= t)``, zero where
        ``mask`` (bool, ``labels[:, 1:] != ignore_index``) is False.
    """
    shift_logits, shift_labels = shift_for_next_token(logits, labels)
    mask = shift_labels != ignore_index
    # Ignored positions hold -100, an invalid index: gather a dummy id 0 there and zero the result.
    safe_labels = torch.where(mask, shift_labels, torch.zeros_like(shift_labels))
    logps = selective_log_softmax(shift_logits, safe_labels)
    return logps.masked_fill(~mask, 0.0), mask


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    average: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Sum (or mean) of completion-token log-probabilities per sequence: ``log pi(y | x) = sum_t log pi(y_t | x, y_<t)``.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` aligned with ``input_ids``; ``ignore_index`` on prompt and padding.
        mask: optional ``(B, T)`` 0/1 mask aligned with ``labels`` (e.g. a completion mask); a token counts
            only if it is non-ignored in ``labels`` and 1 in ``mask``.
        average: if True return the mean over counted tokens (SimPO/ORPO/IPO length normalisation); rows with
            no counted token give 0.

    Returns:
        ``(B,)`` log-probabilities in the dtype of :func:`selective_log_softmax`'s output.
    """
    logps, token_mask = token_logps(logits, labels, ignore_index)
    if mask is not None:
        if mask.shape != labels.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of labels {tuple(labels.shape)}")
        token_mask = token_mask & mask[:, 1:].bool()
        logps = logps.masked_fill(~token_mask, 0.0)
    total = logps.sum(dim=-1)
    if not average:
        return total
    return total / token_mask.sum(dim=-1).clamp(min=1).to(total.dtype)


@dataclass
class PairLogps:
    """Output of :func:`concatenated_forward`; per-pair tensors are ``(B,)``.

    ``*_logps`` are sums over completion tokens, ``*_logps_mean`` the per-token means, ``*_num_tokens`` the
    completion token counts (int64), ``*_mean_logits`` detached scalars (mean logit over completion tokens and
    vocabulary, for logging), ``chosen_nll`` the mean token NLL of the chosen completions (ORPO's SFT term,
    differentiable).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_logps_mean: Tensor
    rejected_logps_mean: Tensor
    chosen_num_tokens: Tensor
    rejected_num_tokens: Tensor
    chosen_mean_logits: Tensor
    rejected_mean_logits: Tensor
    chosen_nll: Tensor


def _pad_right(x: Tensor, length: int, value: int) -> Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1]), value)
    return torch.cat([x, pad], dim=1)


def concatenated_forward(
    model: Any,
    chosen_input_ids: Tensor,
    chosen_attention_mask: Tensor,
    chosen_labels: Tensor,
    rejected_input_ids: Tensor,
    rejected_attention_mask: Tensor,
    rejected_labels: Tensor,
    pad_token_id: int,
    chosen_position_ids: Tensor | None = None,
    rejected_position_ids: Tensor | None = None,
) -> PairLogps:
    """One forward pass over ``[chosen; rejected]`` (a ``2B`` batch) returning both sides' log-probs.

    A single forward halves the number of kernel launches / FSDP all-gathers compared with two passes, and
    keeps dropout / batch-dependent layers identical for both sides. Both halves are right-padded to a common
    length (``pad_token_id`` for ids, 0 for the attention mask, -100 for labels, 0 for position ids); right
    padding never changes a causal model's logits at real positions.

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=, [position_ids=,] use_cache=False)``
            returning an object with ``.logits`` ``(2B, T, V)`` (or the logits tensor itself).
        chosen_input_ids, chosen_attention_mask, chosen_labels: ``(B, Tc)`` each; labels -100 on prompt/padding.
        rejected_input_ids, rejected_attention_mask, rejected_labels: ``(B, Tr)`` each.
        pad_token_id: id used to pad the shorter side.
        chosen_position_ids, rejected_position_ids: optional ``(B, Tc)`` / ``(B, Tr)`` position ids for packed
            sequences; give both or neither.

    Returns:
        :class:`PairLogps`.
    """
    for name, ids, am, lab in (
        ("chosen", chosen_input_ids, chosen_attention_mask, chosen_labels),
        ("rejected", rejected_input_ids, rejected_attention_mask, rejected_labels),
    ):
        if ids.dim() != 2 or ids.shape != am.shape or ids.shape != lab.shape:
            raise ValueError(
                f"{name}_input_ids {tuple(ids.shape)}, {name}_attention_mask {tuple(am.shape)} and "
                f"{name}_labels {tuple(lab.shape)} must all be the same (B, T) shape"
            )
    if chosen_input_ids.shape[0] != rejected_input_ids.shape[0]:
        raise ValueError(
            f"chosen batch {chosen_input_ids.shape[0]} != rejected batch {rejected_input_ids.shape[0]}: pairs must align"
        )
    if (chosen_position_ids is None) != (rejected_position_ids is None):
        raise ValueError("pass both chosen_position_ids and rejected_position_ids, or neither")

    batch = chosen_input_ids.shape[0]
    length = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])
    input_ids = torch.cat(
        [
            _pad_right(chosen_input_ids, length, pad_token_id),
            _pad_right(rejected_input_ids, length, pad_token_id),
        ]
    )
    attention_mask = torch.cat(
        [_pad_right(chosen_attention_mask, length, 0), _pad_right(rejected_attention_mask, length, 0)]
    )
    labels = torch.cat(
        [_pad_right(chosen_labels, length, IGNORE_INDEX), _pad_right(rejected_labels, length, IGNORE_INDEX)]
    )
    kwargs: dict[str, Tensor] = {}
    if chosen_position_ids is not None and rejected_position_ids is not None:
        for name, pos, ids in (
            ("chosen", chosen_position_ids, chosen_input_ids),
            ("rejected", rejected_position_ids, rejected_input_ids),
        ):
            if pos.shape != ids.shape:
                raise ValueError(
                    f"{name}_position_ids {tuple(pos.shape)} must match {name}_input_ids {tuple(ids.shape)}"
                )
        kwargs["position_ids"] = torch.cat(
            [_pad_right(chosen_position_ids, length, 0), _pad_right(rejected_position_ids, length, 0)]
        )

    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    logits = outputs.logits if hasattr(outputs, "logits") else outputs  # (2B, T, V)

    logps, mask = token_logps(logits, labels)  # (2B, T-1)
    sums = logps.sum(dim=-1)  # (2B,)
    counts = mask.sum(dim=-1)  # (2B,)
    means = sums / counts.clamp(min=1).to(sums.dtype)
    with torch.no_grad():
        per_token_mean_logit = logits[:, :-1, :].mean(dim=-1)  # (2B, T-1)
        chosen_mask, rejected_mask = mask[:batch], mask[batch:]
        chosen_mean_logits = per_token_mean_logit[:batch][chosen_mask].mean()
        rejected_mean_logits = per_token_mean_logit[batch:][rejected_mask].mean()
    chosen_nll = -sums[:batch].sum() / counts[:batch].sum().clamp(min=1).to(sums.dtype)
    return PairLogps(
        chosen_logps=sums[:batch],
        rejected_logps=sums[batch:],
        chosen_logps_mean=means[:batch],
        rejected_logps_mean=means[batch:],
        chosen_num_tokens=counts[:batch],
        rejected_num_tokens=counts[batch:],
        chosen_mean_logits=chosen_mean_logits,
        rejected_mean_logits=rejected_mean_logits,
        chosen_nll=chosen_nll,
    )


# ---------------------------------------------------------------------------------------------------------------------
# prefix-shared (tree) forward


def decoder_and_head(model: Any, head: str = "lm_head") -> tuple[Any, Any]:
    """The transformer trunk and the output head of a HF model (also through a PEFT wrapper).

    ``head="lm_head"`` is the LM head (``get_output_embeddings``); ``"score"`` is a sequence-classification
    head. Raises ``TypeError`` for models whose logits are not ``head(last hidden state)`` (soft-capped or
    scaled logits), so callers can fall back to the padded path.
    """
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise TypeError(f"{type(model).__name__}: soft-capped or scaled logits are not a plain head")
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    out = model.get_output_embeddings() if head == "lm_head" else getattr(model, head, None)
    if decoder is None or out is None or decoder is model:
        raise TypeError(f"{type(model).__name__} has no separable decoder and {head!r} head")
    return decoder, out


def splittable(model: Any, head: str = "lm_head") -> bool:
    """Whether :func:`decoder_and_head` can split ``model`` (packed forwards need it; else use padded rows)."""
    try:
        decoder_and_head(model, head)
    except TypeError:
        return False
    return True


def tree_hidden(model: Any, batch: Any, head: str = "lm_head") -> tuple[Tensor, Any]:
    """Last hidden states ``(R, L, H)`` of a :class:`~alignflow.data.packing.TreeBatch`, and the head module."""
    decoder, out = decoder_and_head(model, head)
    hidden = decoder(**batch.model_inputs(), use_cache=False).last_hidden_state
    return hidden, out


def tree_pair_scores(model: Any, batch: Any, head: str = "score") -> tuple[Tensor, Tensor]:
    """Scalar rewards of preference pairs packed as two-branch trees (branch 0 chosen, branch 1 rejected).

    The ``head`` (a sequence-classification model's ``score``) runs on each branch's last token only, which is
    what the padded model's last-non-pad pooling reads, so the scores equal the padded forward's.

    Args:
        model: a reward model whose trunk and head split (:func:`splittable` with ``head``).
        batch: a :class:`~alignflow.data.packing.TreeBatch` of pairs on the model's device.

    Returns:
        ``(chosen (B,), rejected (B,))``.
    """
    hidden, score = tree_hidden(model, batch, head=head)
    scores = score(hidden[batch.end_rows, batch.end_cols]).squeeze(-1)  # (2B,) chosen, rejected, chosen, ...
    return scores[0::2], scores[1::2]


def tree_token_logps(model: Any, batch: Any) -> tuple[Tensor, Tensor]:
    """Log-probabilities of a tree batch's targets, running the LM head only where a target is predicted.

    Args:
        model: a causal LM (see :func:`decoder_and_head`).
        batch: a :class:`~alignflow.data.packing.TreeBatch` on the model's device.

    Returns:
        ``(logps (T,), logits (T, V))``: ``log pi(target_ids[t] | its branch's earlier tokens)``, and the logits
        they came from (for logging statistics).
    """
    hidden, lm_head = tree_hidden(model, batch)
    logits = lm_head(hidden[batch.target_rows, batch.target_cols])  # (T, V)
    return selective_log_softmax(logits, batch.target_ids), logits


def tree_pair_logps(model: Any, batch: Any) -> PairLogps:
    """:class:`PairLogps` of preference pairs packed as two-branch trees (branch 0 chosen, branch 1 rejected).

    Equal, up to float reduction order, to :func:`concatenated_forward` on the same pairs: each completion's
    log-probability is conditioned on exactly the same tokens at the same positions.
    """
    if batch.num_branches % 2:
        raise ValueError(f"pair trees have two branches each; got {batch.num_branches} branches")
    logps, logits = tree_token_logps(model, batch)
    n = batch.num_branches
    sums = logps.new_zeros(n).index_add(0, batch.target_branch, logps)  # (2B,) interleaved c, r, c, r ...
    counts = torch.zeros(n, dtype=torch.long, device=logps.device).index_add(
        0, batch.target_branch, torch.ones_like(batch.target_branch)
    )
    means = sums / counts.clamp(min=1).to(sums.dtype)
    with torch.no_grad():
        per_token = logits.mean(dim=-1)
        chosen_tok = (batch.target_branch % 2) == 0
        chosen_mean_logits = per_token[chosen_tok].mean()
        rejected_mean_logits = per_token[~chosen_tok].mean()
    c_sum, r_sum = sums[0::2], sums[1::2]
    c_cnt, r_cnt = counts[0::2], counts[1::2]
    return PairLogps(
        chosen_logps=c_sum,
        rejected_logps=r_sum,
        chosen_logps_mean=means[0::2],
        rejected_logps_mean=means[1::2],
        chosen_num_tokens=c_cnt,
        rejected_num_tokens=r_cnt,
        chosen_mean_logits=chosen_mean_logits,
        rejected_mean_logits=rejected_mean_logits,
        chosen_nll=-c_sum.sum() / c_cnt.sum().clamp(min=1).to(sums.dtype),
    )
