"""Gradient-accumulation-safe loss normalisation over micro-batches: the one place every recipe takes it from.

Token mean (SFT, and PPO's ``token-mean`` aggregation). With accumulation over micro-batches ``m = 1..M``, the loss of the whole accumulated batch is the mean
token negative log-likelihood over all its target tokens::

    L = (1 / N) * sum_m sum_{t in targets(m)} -log p(y_t | y_<t),    N = sum_m |targets(m)|

Each micro-batch therefore contributes ``sum_nll(m) / N`` with the GLOBAL ``N``, and the gradients
summed over micro-batches equal the gradient of ``L``. Normalising each micro-batch by its own count
and dividing by ``M`` (a common bug; see STYLE.md on torchtune's DPO recipes) weights tokens of short
micro-batches more and breaks "batch 8 x accumulation 1 == batch 1 x accumulation 8".

The arithmetic itself lives in one place — :func:`alignflow.train.logprobs.count_target_tokens` and
:func:`alignflow.train.losses.token_nll` (``num_items_in_batch``); this module only adds the
micro-batch bookkeeping around them. Labels follow the HF convention: unshifted, ``-100`` = not a target.

Example (pair) mean (reward model, DPO; PPO's per-sequence aggregations). A loss that is a (weighted) mean
over examples, ``L = sum_i w_i l_i / W`` with ``W = sum_m W_m`` over the step's micro-batches and
``W_m = sum_{i in m} w_i``, is accumulated from each micro-batch's own mean ``L_m = sum_{i in m} w_i l_i / W_m``
as ``L = sum_m (W_m / W) L_m`` (:func:`example_mean_share`); unweighted, ``w_i = 1`` and ``W_m`` is the
micro-batch size. Under data parallelism, ``W`` is the all-reduced sum over ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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


def step_weight(micro_weights: Sequence[Sequence[float]]) -> float:
    """``W``: the summed example weights of all micro-batches of an optimizer step (their count if all 1)."""
    total = float(sum(w for micro in micro_weights for w in micro))
    if total <= 0:
        raise ValueError(f"the step's examples weigh {total}; the accumulated mean needs a positive total")
    return total


def example_mean_share(
    micro_mean_loss: torch.Tensor, micro_weight: float, total_weight: float
) -> torch.Tensor:
    """One micro-batch's share of the step's example-mean loss: ``L_m * W_m / W`` (module docstring).

    Args:
        micro_mean_loss: scalar, the micro-batch's (weighted) mean loss ``L_m``.
        micro_weight: ``W_m``, the summed weights of the micro-batch's examples (its size if unweighted).
        total_weight: ``W`` from :func:`step_weight` over ALL micro-batches of the step.
    """
    if total_weight <= 0:
        raise ValueError(f"total_weight must be positive, got {total_weight}")
    return micro_mean_loss * (micro_weight / total_weight)
