"""Packing: packed loss and gradients equal unpacked ones; layout invariants; token-budget sampler."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignflow.data.packing import IGNORE_INDEX, TokenBudgetSampler, pack_examples
from alignflow.models import tiny_llama
from alignflow.train.accum import sum_token_nll

VOCAB = 101


def _examples(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = max(1, n // 3)
        out.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (n - prompt)})
    return out


def _unpacked_labels(ex: dict[str, list[int]]) -> torch.Tensor:
    return torch.tensor(
        [[t if m else IGNORE_INDEX for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True)]]
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy", ["first_fit", "best_fit"])
def test_packed_loss_and_grads_equal_unpacked(attn: str, strategy: str) -> None:
    """Sum of token NLL over a packed batch == sum over the examples run one by one (float32, ≤ 1e-5)."""
    model = tiny_llama(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=1, attn_implementation=attn
    )
    exs = _examples([5, 17, 9, 30, 3, 12, 22, 2, 40])
    pb = pack_examples(exs, max_tokens=48, pad_token_id=0, strategy=strategy)
    assert pb.input_ids.shape[0] < len(exs)  # really packed several per row

    mask = pb.attention_mask if attn == "sdpa" else pb.additive_mask(torch.float32)
    out = model(input_ids=pb.input_ids, attention_mask=mask, position_ids=pb.position_ids)
    n_tok = pb.num_target_tokens
    packed_loss = sum_token_nll(out.logits, pb.labels) / n_tok
    packed_loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    unpacked_sum = torch.zeros(())
    unpacked_tokens = 0
    for ex in exs:
        labels = _unpacked_labels(ex)
        unpacked_sum = unpacked_sum + sum_token_nll(
            model(input_ids=torch.tensor([ex["input_ids"]])).logits, labels
        )
        unpacked_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert unpacked_tokens == n_tok
    unpacked_loss = unpacked_sum / unpacked_tokens
    unpacked_loss.backward()

    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=0)
    for (name, p), g in zip(model.named_parameters(), packed_grads, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=0, msg=name)


def test_padded_batch_equals_packed_last_token_values() -> None:
    """Per-example last-token logits (what a reward head pools) agree between packed and one-by-one."""
    model = tiny_llama(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, seed=2).eval()
    exs = _examples([7, 3, 11, 6])
    pb = pack_examples(exs, max_tokens=16, pad_token_id=0)
    with torch.no_grad():
        packed = pb.gather_last_token(model(**pb.model_inputs()).logits)  # (N, V)
        single = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits[:, -1] for e in exs])
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=0)


def test_layout_invariants() -> None:
    exs = _examples([4, 6, 3, 5])
    exs.append({"input_ids": [9, 8, 7], "labels": [IGNORE_INDEX, 8, 7]})
    pb = pack_examples(exs, max_tokens=10, pad_token_id=0, pad_to="max_tokens")
    assert pb.input_ids.shape == (pb.input_ids.shape[0], 10)
    assert sorted(n for row in pb.seq_lens for n in row) == [3, 3, 4, 5, 6]
    for i, (r, s, n) in enumerate(pb.placements):
        assert pb.input_ids[r, s : s + n].tolist() == exs[i]["input_ids"]
        assert pb.position_ids[r, s : s + n].tolist() == list(range(n))
        assert pb.labels[r, s] == IGNORE_INDEX  # first token never a target
        seg = pb.segment_ids[r, s]
        # Attention stays inside the example and is causal.
        allowed = pb.attention_mask[r, 0, s : s + n]
        expected = torch.zeros_like(allowed)
        expected[:, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()
        assert torch.equal(allowed, expected)
        assert (pb.segment_ids[r, s : s + n] == seg).all()
    pad = pb.segment_ids < 0
    assert (pb.labels[pad] == IGNORE_INDEX).all() and (pb.input_ids[pad] == 0).all()
    # No query row is fully masked (SDPA would return NaN there).
    assert pb.attention_mask.any(dim=-1).all()
    # cu_seqlens cover the flattened rows contiguously.
    assert pb.cu_seqlens[0] == 0 and pb.cu_seqlens[-1] == pb.input_ids.numel()
    assert (pb.cu_seqlens.diff() > 0).all()
    # Explicit labels are used as given; prompt tokens of completion_mask examples are ignored.
    r, s, n = pb.placements[4]
    assert pb.labels[r, s : s + n].tolist() == [IGNORE_INDEX, 8, 7]
    r, s, n = pb.placements[0]
    assert pb.labels[r, s : s + n].tolist() == [IGNORE_INDEX] + exs[0]["input_ids"][1:]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 32), min_size=1, max_size=40), st.sampled_from(["first_fit", "best_fit"]))
def test_every_example_placed_once_within_capacity(lengths: list[int], strategy: str) -> None:
    pb = pack_examples([[5] * n for n in lengths], max_tokens=32, pad_token_id=0, strategy=strategy)
    assert all(sum(row) <= 32 for row in pb.seq_lens)
    assert sorted(n for row in pb.seq_lens for n in row) == sorted(lengths)
    assert pb.num_real_tokens == sum(lengths)
    # Any-fit property: a row is opened only when the item fits in no open row, so no two rows could merge.
    loads = [sum(row) for row in pb.seq_lens]
    assert all(loads[i] + loads[j] > 32 for i in range(len(loads)) for j in range(i + 1, len(loads)))


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than max_tokens=8"):
        pack_examples([[1, 2], list(range(9))], max_tokens=8, pad_token_id=0)
    with pytest.raises(ValueError, match="example 0: field 'labels' has 1 entries"):
        pack_examples([{"input_ids": [1, 2], "labels": [1]}], max_tokens=8, pad_token_id=0)
    with pytest.raises(ValueError, match="example 0: missing field 'input_ids'"):
        pack_examples([{"ids": [1]}], max_tokens=8, pad_token_id=0)
    with pytest.raises(ValueError, match="example 0: 'input_ids' is empty"):
        pack_examples([[]], max_tokens=8, pad_token_id=0)


# ------------------------------------------------------------------------------------------------------------------
# TokenBudgetSampler


def _lengths(n: int = 500, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [min(256, max(1, int(rng.lognormvariate(3.5, 0.8)))) for _ in range(n)]


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_sampler_budget_and_coverage(mode: str) -> None:
    lengths = _lengths()
    s = TokenBudgetSampler(lengths, max_tokens=512, seed=3, mode=mode)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        lens = [lengths[i] for i in b]
        cost = len(b) * max(lens) if mode == "padded" else sum(lens)
        assert cost <= 512
        assert s.batch_cost(b) == cost
    assert s.epoch == 1 and s.position == 0
    # Grouping by length: padding waste far below random batching's.
    if mode == "padded":
        waste = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
        assert waste / sum(lengths) < 0.15


def test_sampler_deterministic_and_epochs_differ() -> None:
    lengths = _lengths()
    a = TokenBudgetSampler(lengths, max_tokens=512, seed=7)
    b = TokenBudgetSampler(lengths, max_tokens=512, seed=7)
    assert a.batches_for_epoch(0) == b.batches_for_epoch(0)
    assert a.batches_for_epoch(0) != a.batches_for_epoch(1)
    assert a.batches_for_epoch(0) != TokenBudgetSampler(lengths, max_tokens=512, seed=8).batches_for_epoch(0)


def test_sampler_resumes_from_state() -> None:
    lengths = _lengths(200)
    full = TokenBudgetSampler(lengths, max_tokens=256, seed=1, max_batch_size=6)
    reference = [b for _ in range(3) for b in full]  # three epochs
    first = TokenBudgetSampler(lengths, max_tokens=256, seed=1, max_batch_size=6)
    got: list[list[int]] = []
    it = iter(first)
    cut = len(reference) // 2 + 3  # past the first epoch
    while len(got) < cut:
        try:
            got.append(next(it))
        except StopIteration:
            it = iter(first)
    state = first.state_dict()
    resumed = TokenBudgetSampler(lengths, max_tokens=256, seed=1, max_batch_size=6)
    resumed.load_state_dict(state)
    while len(got) < len(reference):
        got.extend(resumed)
    assert got == reference
    with pytest.raises(ValueError, match="dataset changed"):
        TokenBudgetSampler(lengths[:-1], max_tokens=256, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="'seed'"):
        TokenBudgetSampler(lengths, max_tokens=256, seed=2).load_state_dict(state)


def test_sampler_rejects_oversized_example() -> None:
    with pytest.raises(ValueError, match="example 2 has 300 tokens"):
        TokenBudgetSampler([1, 2, 300], max_tokens=256)


# ---------------------------------------------------------------------------------------------------------------------
# prefix trees (DPO / reward-model pairs, GRPO groups)


def _pairs(n: int, seed: int = 1):
    from alignflow.data.encode import Encoded, EncodedPair

    g = torch.Generator().manual_seed(seed)
    items = []

    def tokens(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    for i in range(n):
        prompt, c, r = [1] + tokens(2, 14), tokens(1, 9) + [2], tokens(1, 9) + [2]
        items.append(
            EncodedPair(
                str(i),
                Encoded(prompt + c, [IGNORE_INDEX] * len(prompt) + c),
                Encoded(prompt + r, [IGNORE_INDEX] * len(prompt) + r),
                1.0,
            )
        )
    return items


def _tiny(seq_cls: bool = False):
    model = tiny_llama(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0
    )
    if not seq_cls:
        return model.eval()
    from transformers import LlamaForSequenceClassification

    config = model.config
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(config)
    rm.model.load_state_dict(model.model.state_dict())
    return rm.eval()


def test_prefix_tree_layout_by_hand() -> None:
    from alignflow.data.packing import pack_prefix_trees

    # prefix [5 6], branch A [7 8] (both targets), branch B [9] (target)
    tb = pack_prefix_trees([([5, 6], [([7, 8], [7, 8]), ([9], [9])])], pad_token_id=0)
    assert tb.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert tb.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # B continues from the prefix, not from A
    allowed = tb.attention_mask[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # B's token sees the prefix and itself, never A
    ]
    # 7 is predicted at slot 1 (prefix end), 8 at slot 2, 9 at slot 1 again (prefix end)
    assert tb.target_cols.tolist() == [1, 2, 1] and tb.target_ids.tolist() == [7, 8, 9]
    assert tb.target_branch.tolist() == [0, 0, 1]
    assert tb.end_cols.tolist() == [3, 4]


def test_tree_pair_logps_equal_concatenated_forward_and_branches_are_isolated() -> None:
    from alignflow.data.encode import pack_pairs, pad_batch
    from alignflow.train.logprobs import concatenated_forward, tree_pair_logps

    model, items = _tiny(), _pairs(6)
    tree = tree_pair_logps(model, pack_pairs(items, 0, "cpu"))
    c = pad_batch([p.chosen for p in items], 0, "cpu")
    r = pad_batch([p.rejected for p in items], 0, "cpu")
    ref = concatenated_forward(
        model,
        c["input_ids"],
        c["attention_mask"],
        c["labels"],
        r["input_ids"],
        r["attention_mask"],
        r["labels"],
        0,
    )
    for name in ("chosen_logps", "rejected_logps", "chosen_logps_mean", "rejected_logps_mean", "chosen_nll"):
        torch.testing.assert_close(getattr(tree, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(tree.chosen_num_tokens, ref.chosen_num_tokens)
    # Rejected comes after chosen in the row but never attends to it: change chosen, rejected stays put.
    for p in items:
        p.chosen.input_ids[-1] = 3 if p.chosen.input_ids[-1] != 3 else 4
    again = tree_pair_logps(model, pack_pairs(items, 0, "cpu"))
    torch.testing.assert_close(again.rejected_logps, tree.rejected_logps, atol=1e-6, rtol=0)
    assert not torch.allclose(again.chosen_logps, tree.chosen_logps)


def test_packed_reward_scores_equal_padded_last_token_pooling() -> None:
    from alignflow.data.encode import model_kwargs, pack_pairs, pad_batch
    from alignflow.train.logprobs import tree_pair_scores

    model, items = _tiny(seq_cls=True), _pairs(5, seed=4)
    with torch.no_grad():
        packed = tree_pair_scores(model, pack_pairs(items, 0, "cpu"))
        rows = pad_batch([p.chosen for p in items] + [p.rejected for p in items], 0, "cpu")
        scores = model(**model_kwargs(rows)).logits.squeeze(-1)  # (2B,) last-non-pad pooling
    padded = (scores[: len(items)], scores[len(items) :])
    for a, b in zip(packed, padded, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
