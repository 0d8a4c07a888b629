"""Gradient-accumulation-safe loss normalisation over micro-batches.

With accumulation over micro-batches ``m = 1..M``, the loss of the whole accumulated batch is the mean
token negative log-likelihood over all its target tokens::

    L = (1 / N) * sum_m sum_{t in targets(m)} -log p(y_t | y_<t),    N = sum_m |targets(m)|

Each micro-batch therefore contributes ``sum_nll(m) / N`` with the GLOBAL ``N``, and the gradients
summed over micro-batches equal the gradient of ``L``. Normalising each micro-batch by its own count
and dividing by ``M`` (a common bug; see STYLE.md on torchtune's DPO recipes) weights tokens of short
micro-batches more and breaks "batch 8 x accumulation 1 == batch 1 x accumulation 8".

The arithmetic itself lives in one place — :func:`alignflow.train.logprobs.count_target_tokens` and
:func:`alignflow.train.losses.token_nll` (``num_items_in_batch``); this module only adds the
micro-batch bookkeeping around them. Labels follow the HF convention: unshifted, ``-100`` = not a target.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from alignflow.train import logprobs, losses


def count_target_tokens(labels: torch.Tensor | Iterable[torch.Tensor]) -> int:
    """Target tokens after the causal shift in ``labels (B, T)``, or summed over a list of micro-batches.

    Under data parallelism, all-reduce (sum) this over ranks before passing it on.
    """
    if isinstance(labels, torch.Tensor):
        return int(logprobs.count_target_tokens(labels))
    return sum(int(logprobs.count_target_tokens(lab)) for lab in labels)


def sum_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL: ``logits (B, T, V)``, ``labels (B, T)`` → scalar (``token_nll`` with N = 1)."""
    return losses.token_nll(logits, labels, num_items_in_batch=1)


def global_token_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_target_tokens: int
) -> torch.Tensor:
    """One micro-batch's share of the accumulated mean NLL: ``sum_token_nll / N_global`` (module docstring).

    ``num_target_tokens`` is :func:`count_target_tokens` over ALL micro-batches of the optimizer step.
    """
    if num_target_tokens <= 0:
        raise ValueError(
            f"num_target_tokens must be positive, got {num_target_tokens} (no target tokens in batch)"
        )
    return losses.token_nll(logits, labels, num_items_in_batch=num_target_tokens)
