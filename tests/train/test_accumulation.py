"""Accumulation invariance: batch 8 x accumulation 1 == batch 1 x accumulation 8 (loss trajectory and weights).

The loss is normalised by the GLOBAL number of target tokens in the accumulated batch
(``alignflow.train.accum``). The examples have different lengths and prompt lengths, so the naive
per-micro-batch mean followed by ``/ accumulation`` would NOT be invariant; the last test checks that
the test is sensitive to that mistake.
"""

from __future__ import annotations

import torch

from alignflow.data.packing import IGNORE_INDEX
from alignflow.models import tiny_llama
from alignflow.train.accum import count_target_tokens, global_token_mean_loss, sum_token_nll

VOCAB = 67


def _data(n_steps: int, per_step: int = 8) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per optimizer step, ``per_step`` (ids (1, T), labels (1, T)) examples of varied lengths."""
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(n_steps):
        exs = []
        for _ in range(per_step):
            n = int(torch.randint(4, 24, (1,), generator=g))
            ids = torch.randint(3, VOCAB, (1, n), generator=g)
            labels = ids.clone()
            labels[:, : int(torch.randint(1, n - 1, (1,), generator=g))] = IGNORE_INDEX
            exs.append((ids, labels))
        steps.append(exs)
    return steps


def _pad(exs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(ids.shape[1] for ids, _ in exs)
    ids = torch.zeros(len(exs), T, dtype=torch.long)
    labels = torch.full((len(exs), T), IGNORE_INDEX)
    attn = torch.zeros(len(exs), T, dtype=torch.long)
    for i, (x, y) in enumerate(exs):
        ids[i, : x.shape[1]], labels[i, : y.shape[1]], attn[i, : x.shape[1]] = x[0], y[0], 1
    return ids, labels, attn


def _train(micro_batch: int, naive: bool = False, n_steps: int = 4) -> tuple[list[float], list[torch.Tensor]]:
    model = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for exs in _data(n_steps):
        micro = [_pad(exs[i : i + micro_batch]) for i in range(0, len(exs), micro_batch)]
        n_global = count_target_tokens([lab for _, lab, _ in micro])
        step_loss = 0.0
        for ids, labels, attn in micro:
            logits = model(input_ids=ids, attention_mask=attn).logits
            if naive:  # per-micro-batch mean, then average over micro-batches: the classic bug
                loss = sum_token_nll(logits, labels) / count_target_tokens(labels) / len(micro)
            else:
                loss = global_token_mean_loss(logits, labels, n_global)
            loss.backward()
            step_loss += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(step_loss)
    return losses, [p.detach().clone() for p in model.parameters()]


def test_batch8_acc1_equals_batch1_acc8() -> None:
    losses_a, weights_a = _train(micro_batch=8)
    losses_b, weights_b = _train(micro_batch=1)
    losses_c, weights_c = _train(micro_batch=2)
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_c), atol=1e-5, rtol=0)
    assert losses_a[-1] < losses_a[0]  # it trains
    for a, b, c in zip(weights_a, weights_b, weights_c, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


def test_naive_normalisation_breaks_invariance() -> None:
    """Sensitivity check: the comparison above would catch per-micro-batch normalisation."""
    losses_a, _ = _train(micro_batch=8, naive=True, n_steps=1)
    losses_b, _ = _train(micro_batch=1, naive=True, n_steps=1)
    assert abs(losses_a[0] - losses_b[0]) > 1e-3


def test_count_target_tokens_counts_after_shift() -> None:
    labels = torch.tensor([[5, 6, IGNORE_INDEX, 7], [IGNORE_INDEX, IGNORE_INDEX, 1, 2]])
    assert count_target_tokens(labels) == 4  # the first column is never predicted
    assert count_target_tokens([labels, labels[:1]]) == 6


def test_example_mean_shares_sum_to_the_weighted_mean_of_the_whole_step() -> None:
    """RM/DPO normalisation: micro-batches of 1, 3 and 2 weighted examples; each contributes its own weighted
    mean times W_m / W, and the shares add up to sum(w * l) / sum(w) over all six (any split gives the same)."""
    from alignflow.train.accum import example_mean_share, step_weight

    losses = torch.tensor([0.5, 2.0, 1.0, 4.0, 3.0, 0.25], dtype=torch.float64)
    weights = [1.0, 2.0, 0.5, 1.5, 1.0, 3.0]
    splits = [[0], [1, 2, 3], [4, 5]]
    micro_weights = [[weights[i] for i in s] for s in splits]
    total = step_weight(micro_weights)
    assert total == 9.0
    step_loss = sum(
        example_mean_share((losses[s] * torch.tensor(w, dtype=torch.float64)).sum() / sum(w), sum(w), total)
        for s, w in zip(splits, micro_weights, strict=True)
    )
    want = float((losses * torch.tensor(weights, dtype=torch.float64)).sum()) / 9.0
    assert abs(float(step_loss) - want) < 1e-12
    # Unweighted (all 1): shares are micro-batch size / step size, the DPO case.
    assert float(example_mean_share(torch.tensor(2.0), 3, 6)) == 1.0
    for bad in ([[0.0, 0.0]], []):
        try:
            step_weight(bad)
        except ValueError as exc:
            assert "positive" in str(exc)
        else:
            raise AssertionError(f"step_weight({bad}) should fail")
