"""The KV-cache sampler: EOS stopping, top-p and temperature, log-probs (greedy vs `generate`: test_fast_decode)."""

from __future__ import annotations

import pytest
import torch

from alignflow.rollout import response_forward, sample, top_p_filter

PROMPTS = ["Hello there", "The model wrote a short poem carefully.", "x", "Item 42 costs $3.50 today, why?"]


def _enc(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def test_stops_at_eos_and_masks_after_it(model, tok):
    ids, am = _enc(tok)
    # Force EOS: make it the argmax for row 1 only by biasing the lm_head (a copy of the model).
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        m.lm_head.weight[tok.eos_token_id] *= 0
        m.lm_head.weight[tok.eos_token_id] += 0  # logit 0 for EOS at every position
    free = sample(
        m,
        ids,
        am,
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=0,
    )
    # Now make EOS overwhelmingly likely: every row finishes at step 1 and the loop stops there.
    with torch.no_grad():
        m.lm_head.bias = torch.nn.Parameter(torch.zeros(m.lm_head.out_features))
        m.lm_head.bias[tok.eos_token_id] = 1e4
    done = sample(
        m,
        ids,
        am,
        max_new_tokens=8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=1.0,
    )
    assert done.response_ids.shape == (4, 1)
    assert done.finished.all() and (done.response_ids[:, 0] == tok.eos_token_id).all()
    assert done.response_mask.tolist() == [[1]] * 4
    assert free.response_ids.shape[1] == 8  # without forced EOS the loop runs to max_new_tokens


def test_per_row_finish_pads_and_masks(model, tok):
    """A row that samples EOS stops (mask 0, pad after), the others continue."""
    ids, am = _enc(tok)
    eos_candidates = sample(
        model,
        ids,
        am,
        max_new_tokens=6,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=0,
    )
    # Declare the token greedy row 0 emits at step 2 an EOS id: row 0 must end there.
    stop_id = int(eos_candidates.response_ids[0, 2])
    r = sample(
        model, ids, am, max_new_tokens=6, eos_token_id=[stop_id], pad_token_id=tok.pad_token_id, temperature=0
    )
    first = [(row == stop_id).nonzero().flatten() for row in eos_candidates.response_ids]
    for b in range(4):
        end = int(first[b][0]) + 1 if len(first[b]) else 6
        assert r.response_mask[b].tolist() == [1] * end + [0] * (r.response_ids.shape[1] - end)
        assert (r.response_ids[b, end:] == tok.pad_token_id).all()
        assert bool(r.finished[b]) == (end <= 6 and len(first[b]) > 0)
    assert r.lengths[0] == 3


def test_sampler_logprobs_match_a_full_forward(model, tok):
    """Cached incremental log-probs equal the training-layout forward (why no second forward is needed)."""
    ids, am = _enc(tok)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.7):
        r = sample(
            model,
            ids,
            am,
            max_new_tokens=12,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            temperature=temperature,
            generator=g,
        )
        seq, seq_mask = r.sequences()
        with torch.no_grad():
            full = response_forward(model, seq, seq_mask, r.response_ids.shape[1], temperature).logprobs
        m = r.response_mask.bool()
        torch.testing.assert_close(r.logprobs[m], full[m], atol=1e-4, rtol=1e-4)
        assert (r.logprobs[~m] == 0).all()


def test_seeded_generator_is_reproducible(model, tok):
    ids, am = _enc(tok)
    kw = dict(max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = sample(model, ids, am, generator=torch.Generator().manual_seed(5), **kw)
    b = sample(model, ids, am, generator=torch.Generator().manual_seed(5), **kw)
    c = sample(model, ids, am, generator=torch.Generator().manual_seed(6), **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_top_p_filter_by_construction():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = torch.isfinite(top_p_filter(logits.clone(), 0.8))
    # 0.5 + 0.3 reaches 0.8: exactly the top two survive, in either order of the vocabulary.
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = torch.isfinite(top_p_filter(logits.clone(), 0.81))
    assert kept.sum(dim=1).tolist() == [3, 3]
    kept = torch.isfinite(top_p_filter(logits.clone(), 0.01))
    assert kept.sum(dim=1).tolist() == [1, 1]  # the top token always stays


class _Unigram(torch.nn.Module):
    """A 'model' with fixed next-token logits, to test the sampling distribution statistically."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("l", logits)

    def forward(
        self,
        input_ids,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=None,
    ):
        from types import SimpleNamespace

        b, t = input_ids.shape
        return SimpleNamespace(logits=self.l.expand(b, t, -1))


def test_temperature_and_top_p_sampling_frequencies():
    """Chi-square style bounds: empirical frequencies match softmax(l / T) renormalised over the nucleus."""
    base = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    n = 4000
    ids = torch.ones(n, 1, dtype=torch.long)
    am = torch.ones(n, 1, dtype=torch.long)
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.8)):
        r = sample(
            _Unigram(base),
            ids,
            am,
            max_new_tokens=1,
            eos_token_id=[],
            pad_token_id=0,
            temperature=temperature,
            top_p=top_p,
            generator=torch.Generator().manual_seed(1),
        )
        p = torch.softmax(base / temperature, dim=0)
        if top_p < 1:
            keep = (p.cumsum(0) - p) < top_p
            p = torch.where(keep, p, torch.zeros_like(p))
            p = p / p.sum()
        freq = torch.bincount(r.response_ids[:, 0], minlength=5).float() / n
        se = torch.sqrt(p * (1 - p) / n)
        assert ((freq - p).abs() <= 5 * se + 1e-9).all(), (temperature, top_p, freq, p)
        # log-probs are of the temperature-scaled, untruncated distribution
        expected = torch.log_softmax(base / temperature, dim=0)[r.response_ids[:, 0]]
        torch.testing.assert_close(r.logprobs[:, 0], expected)


def test_bad_inputs_are_rejected(model, tok):
    ids, am = _enc(tok)
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, ids, torch.flip(am, dims=[1]), max_new_tokens=2, eos_token_id=2, pad_token_id=0)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, ids, am, max_new_tokens=2, eos_token_id=2, pad_token_id=0, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sample(model, ids, am, max_new_tokens=0, eos_token_id=2, pad_token_id=0)
