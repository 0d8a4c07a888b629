"""alignflow.train.logprobs: hand values, parity with TRL's selective_log_softmax / get_batch_logps, and
concatenated_forward against separate forward passes of a tiny Llama."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import torch

from alignflow.train.logprobs import (
    concatenated_forward,
    count_target_tokens,
    selective_log_softmax,
    sequence_logps,
    shift_for_next_token,
    token_logps,
)
from alignflow.train.losses import token_nll

D = torch.float64
SEEDS = [21, 22, 23]


def test_selective_log_softmax_hand_values():
    """Uniform logits over V = 5 give log(1/5) for any id; logits (0, ln 3) give log(3/4) for id 1, log(1/4) for id 0."""
    out = selective_log_softmax(torch.zeros(2, 3, 5, dtype=D), torch.tensor([[0, 4, 2], [1, 1, 3]]))
    torch.testing.assert_close(out, torch.full((2, 3), -math.log(5), dtype=D))
    two = torch.tensor([[0.0, math.log(3)]], dtype=D).expand(2, 2)
    torch.testing.assert_close(
        selective_log_softmax(two, torch.tensor([1, 0])),
        torch.tensor([math.log(0.75), math.log(0.25)], dtype=D),
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 7, 13), (4, 33, 257)])
def test_selective_log_softmax_matches_trl_and_naive(seed, shape):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=D) * 4
    index = torch.randint(0, shape[-1], shape[:-1], generator=g)
    got = selective_log_softmax(logits, index, chunk_rows=5)
    torch.testing.assert_close(got, trl_utils.selective_log_softmax(logits, index), atol=1e-6, rtol=0)
    naive = torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, naive, atol=1e-12, rtol=0)


def test_selective_log_softmax_half_precision_upcasts():
    """bf16 logits: the result is float32 and matches the float64 computation on the same (rounded) logits to
    float32 precision; a pure-bf16 log_softmax would be off by ~1e-2."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 11, 1000, generator=g) * 5).to(torch.bfloat16)
    index = torch.randint(0, 1000, (3, 11), generator=g)
    got = selective_log_softmax(logits, index, chunk_rows=4)
    assert got.dtype == torch.float32
    want = torch.gather(logits.double().log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    assert (got.double() - want).abs().max().item() < 1e-4


def test_selective_log_softmax_gradient_matches_naive():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=g, dtype=D, requires_grad=True)
    index = torch.randint(0, 9, (2, 5), generator=g)
    w = torch.randn(2, 5, generator=g, dtype=D)
    (grad,) = torch.autograd.grad((selective_log_softmax(logits, index, chunk_rows=3) * w).sum(), logits)
    naive = torch.gather(logits.log_softmax(-1), -1, index.unsqueeze(-1)).squeeze(-1)
    (want,) = torch.autograd.grad((naive * w).sum(), logits)
    torch.testing.assert_close(grad, want, atol=1e-12, rtol=0)


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="index shape"):
        selective_log_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unshifted"):
        shift_for_next_token(torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        sequence_logps(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), mask=torch.ones(1, 2))


def test_sequence_logps_hand_values():
    """V = 4 uniform: each counted token contributes log(1/4). labels [[-100, 1, 2, 3]] -> 3 targets ->
    sum 3 log(1/4), mean log(1/4); a completion mask [0, 0, 1, 1] keeps targets 2 and 3 only -> 2 log(1/4)."""
    logits = torch.zeros(1, 4, 4, dtype=D)
    labels = torch.tensor([[-100, 1, 2, 3]])
    assert abs(sequence_logps(logits, labels).item() - 3 * math.log(0.25)) < 1e-15
    assert abs(sequence_logps(logits, labels, average=True).item() - math.log(0.25)) < 1e-15
    cm = torch.tensor([[0, 0, 1, 1]])
    assert abs(sequence_logps(logits, labels, mask=cm).item() - 2 * math.log(0.25)) < 1e-15
    assert count_target_tokens(labels).item() == 3
    logps, mask = token_logps(logits, labels)
    assert logps.shape == (1, 3) and mask.tolist() == [[True, True, True]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(1, 3, 5), (3, 10, 17), (6, 24, 64)])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_trl_get_batch_logps(seed, shape, average):
    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    g = torch.Generator().manual_seed(seed)
    b, t, v = shape
    logits = torch.randn(b, t, v, generator=g, dtype=D) * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    prompt = torch.randint(1, t - 1, (b,), generator=g)
    labels[torch.arange(t).expand(b, t) < prompt.unsqueeze(1)] = -100
    want = trl_orpo.ORPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=average)
    torch.testing.assert_close(sequence_logps(logits, labels, average=average), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- concatenated_forward


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config).double().eval()


def _pair_batch(seed: int, b: int, tc: int, tr: int, pad: int):
    """Random prompts+completions, right-padded per side, labels -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in (tc, tr):
        ids = torch.randint(1, 40, (b, t), generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        prompt = torch.randint(1, 3, (b,), generator=g)
        pos = torch.arange(t).expand(b, t)
        am = (pos < lengths.unsqueeze(1)).long()
        ids = ids.masked_fill(am == 0, pad)
        labels = ids.masked_fill((am == 0) | (pos < prompt.unsqueeze(1)), -100)
        out.append((ids, am, labels))
    return out


# float64 rounding: the concatenated forward pads both halves to one length, and this machine's kernels
# (CPU-dependent) sum the masked softmax in another order than the separate forwards (seen: 5.5e-9 on a
# log-prob of ~-7, 7e-10 relative). A real bug (a shifted label, a missed mask) is off by > 1e-3.
TOL = 1e-8


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("b", "tc", "tr"), [(1, 5, 5), (3, 9, 6), (2, 4, 12)])
def test_concatenated_forward_equals_separate_forwards(tiny_llama, seed, b, tc, tr):
    (c_ids, c_am, c_lab), (r_ids, r_am, r_lab) = _pair_batch(seed, b, tc, tr, pad=0)
    out = concatenated_forward(tiny_llama, c_ids, c_am, c_lab, r_ids, r_am, r_lab, pad_token_id=0)

    with torch.no_grad():
        c_logits = tiny_llama(input_ids=c_ids, attention_mask=c_am).logits
        r_logits = tiny_llama(input_ids=r_ids, attention_mask=r_am).logits
    torch.testing.assert_close(out.chosen_logps, sequence_logps(c_logits, c_lab), atol=TOL, rtol=0)
    torch.testing.assert_close(out.rejected_logps, sequence_logps(r_logits, r_lab), atol=TOL, rtol=0)
    torch.testing.assert_close(
        out.chosen_logps_mean, sequence_logps(c_logits, c_lab, average=True), atol=TOL, rtol=0
    )
    torch.testing.assert_close(
        out.rejected_logps_mean, sequence_logps(r_logits, r_lab, average=True), atol=TOL, rtol=0
    )
    assert out.chosen_num_tokens.tolist() == (c_lab[:, 1:] != -100).sum(1).tolist()
    assert out.rejected_num_tokens.tolist() == (r_lab[:, 1:] != -100).sum(1).tolist()
    assert abs(out.chosen_nll.item() - token_nll(c_logits, c_lab).item()) < TOL
    keep = c_lab[:, 1:] != -100
    assert abs(out.chosen_mean_logits.item() - c_logits[:, :-1].mean(-1)[keep].mean().item()) < TOL
    assert out.chosen_logps.shape == (b,) and out.rejected_logps.shape == (b,)


def test_concatenated_forward_is_one_forward_and_differentiable(tiny_llama):
    (c_ids, c_am, c_lab), (r_ids, r_am, r_lab) = _pair_batch(3, 2, 6, 8, pad=0)
    calls = []

    def model(**kwargs):
        calls.append({k: v.shape if torch.is_tensor(v) else v for k, v in kwargs.items()})
        return tiny_llama(**kwargs)

    out = concatenated_forward(model, c_ids, c_am, c_lab, r_ids, r_am, r_lab, pad_token_id=0)
    assert len(calls) == 1 and calls[0]["input_ids"] == (4, 8) and "position_ids" not in calls[0]
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    grads = [p.grad for p in tiny_llama.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    tiny_llama.zero_grad(set_to_none=True)


def test_concatenated_forward_passes_position_ids(tiny_llama):
    """Default positions (0..T-1) passed explicitly reproduce the implicit result; restarting the positions
    mid-row, as packing does, changes it, which shows the ids reach the model (a uniform shift would not:
    RoPE attention only sees relative offsets)."""
    (c_ids, c_am, c_lab), (r_ids, r_am, r_lab) = _pair_batch(4, 2, 7, 5, pad=0)
    base = concatenated_forward(tiny_llama, c_ids, c_am, c_lab, r_ids, r_am, r_lab, pad_token_id=0)
    c_pos = torch.arange(7).expand(2, 7).clone()
    r_pos = torch.arange(5).expand(2, 5).clone()
    same = concatenated_forward(
        tiny_llama,
        c_ids,
        c_am,
        c_lab,
        r_ids,
        r_am,
        r_lab,
        0,
        chosen_position_ids=c_pos,
        rejected_position_ids=r_pos,
    )
    torch.testing.assert_close(same.chosen_logps, base.chosen_logps, atol=1e-10, rtol=0)
    torch.testing.assert_close(same.rejected_logps, base.rejected_logps, atol=1e-10, rtol=0)
    packed = c_pos.clone()
    packed[:, 3:] -= 3  # a second packed sequence restarting at position 0
    moved = concatenated_forward(
        tiny_llama,
        c_ids,
        c_am,
        c_lab,
        r_ids,
        r_am,
        r_lab,
        0,
        chosen_position_ids=packed,
        rejected_position_ids=r_pos,
    )
    assert (moved.chosen_logps - base.chosen_logps).abs().max().item() > 1e-6
    with pytest.raises(ValueError, match="both"):
        concatenated_forward(tiny_llama, c_ids, c_am, c_lab, r_ids, r_am, r_lab, 0, chosen_position_ids=c_pos)


def test_concatenated_forward_validates_inputs(tiny_llama):
    (c_ids, c_am, c_lab), (r_ids, r_am, r_lab) = _pair_batch(5, 2, 6, 6, pad=0)
    with pytest.raises(ValueError, match="chosen_input_ids"):
        concatenated_forward(tiny_llama, c_ids, c_am[:, :5], c_lab, r_ids, r_am, r_lab, 0)
    with pytest.raises(ValueError, match="pairs must align"):
        concatenated_forward(tiny_llama, c_ids, c_am, c_lab, r_ids[:1], r_am[:1], r_lab[:1], 0)
