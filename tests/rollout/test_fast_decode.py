"""The lean Llama decode path: same logits as the HF forward, same samples, follows training, falls back."""

from __future__ import annotations

import pytest
import torch

from alignflow.models.tiny import tiny_llama
from alignflow.rollout import prompt_position_ids, sample
from alignflow.rollout.fast_llama import build_fast_llama, fast_ineligibility
from alignflow.rollout.generation import categorical_draw

PROMPTS = ["Hello there", "The model wrote a short poem carefully.", "x", "Item 42 costs $3.50 today, why?"]


def _enc(tok, prompts=PROMPTS):
    enc = tok(prompts, return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def _left_padded(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = max(lengths)
    ids = torch.zeros(len(lengths), p, dtype=torch.long)
    am = torch.zeros(len(lengths), p, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, p - n :] = torch.randint(3, vocab, (n,), generator=g)
        am[i, p - n :] = 1
    return ids, am


@torch.no_grad()
def _hf_vs_fast_logits(model, ids, am, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(fast, hf) logits for the prefill and ``steps`` greedy decode steps (both fed the HF argmax)."""
    from transformers import StaticCache

    b, p = ids.shape
    pos = prompt_position_ids(am)
    lean = build_fast_llama(model, b, p + steps + 1)
    assert lean is not None
    cache = StaticCache(config=model.config, max_cache_len=p + steps + 1)
    full = torch.cat([am, torch.ones(b, steps + 1, dtype=am.dtype)], dim=1)
    hf = model(
        input_ids=ids,
        attention_mask=am,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    out = [(lean.prefill(ids, am, pos), hf)]
    nxt = pos[:, -1:] + 1
    for t in range(steps):
        tok = hf.argmax(-1)
        hf = model(
            input_ids=tok[:, None],
            attention_mask=full[:, : p + t + 1],
            position_ids=nxt,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
        out.append((lean.step(tok, nxt, p + t), hf))
        nxt = nxt + 1
    return out


@pytest.mark.parametrize("kv_heads", [None, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_fast_logits_equal_hf_prefill_and_every_decode_step(kv_heads):
    model = tiny_llama(300, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=kv_heads, seed=1).eval()
    ids, am = _left_padded(300, [9, 3, 12, 1, 7])
    for t, (fast, hf) in enumerate(_hf_vs_fast_logits(model, ids, am, steps=6)):
        torch.testing.assert_close(fast, hf, atol=1e-5, rtol=1e-5, msg=f"step {t}")


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500.0,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_fast_logits_follow_rope_scaling(rope):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        tie_word_embeddings=True,
        rope_parameters=rope,
    )
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ids, am = _left_padded(200, [20, 5, 14])
    for t, (fast, hf) in enumerate(_hf_vs_fast_logits(model, ids, am, steps=4)):
        torch.testing.assert_close(fast, hf, atol=1e-5, rtol=1e-5, msg=f"step {t}")


def test_bf16_model_is_served_close_to_hf():
    model = tiny_llama(300, hidden_size=64, num_layers=2, seed=2).to(torch.bfloat16).eval()
    ids, am = _left_padded(300, [8, 3, 6])
    for fast, hf in _hf_vs_fast_logits(model, ids, am, steps=3):
        assert fast.dtype == torch.bfloat16
        torch.testing.assert_close(fast.float(), hf.float(), atol=3e-2, rtol=3e-2)


def test_greedy_fast_equals_hf_path_equals_generate(model, tok):
    ids, am = _enc(tok)
    kw = dict(max_new_tokens=24, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0)
    assert fast_ineligibility(model) is None
    fast = sample(model, ids, am, fast=True, **kw)
    slow = sample(model, ids, am, fast=False, **kw)
    ref = model.generate(
        ids,
        attention_mask=am,
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )[:, ids.shape[1] :]
    steps = fast.response_ids.shape[1]
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_ids, ref[:, :steps])
    # generate may run further (it pads finished rows); anything past our stop is padding.
    assert (ref[:, steps:] == tok.pad_token_id).all()
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_seeded_sampling_is_identical_fast_and_hf(model, tok, temperature, top_p):
    ids, am = _enc(tok)
    kw = dict(
        max_new_tokens=16,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        temperature=temperature,
        top_p=top_p,
    )
    fast = sample(model, ids, am, fast=True, generator=torch.Generator().manual_seed(3), **kw)
    slow = sample(model, ids, am, fast=False, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(fast.response_ids, slow.response_ids)
    assert torch.equal(fast.response_mask, slow.response_mask)
    torch.testing.assert_close(fast.logprobs, slow.logprobs, atol=1e-5, rtol=1e-5)


def test_fast_path_follows_in_place_weight_updates(tok):
    """The policy is trained between rollouts: the next sample must see the new weights (fused ones included)."""
    model = tiny_llama(len(tok), hidden_size=64, num_layers=2, seed=4).eval()
    ids, am = _enc(tok)
    kw = dict(max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, temperature=0)
    before = sample(model, ids, am, fast=True, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # an optimizer-like in-place step on every weight
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        # ... and an update that bypasses autograd's version counter, through .data
        attn = model.model.layers[0].self_attn
        attn.k_proj.weight.data.mul_(-1.5)
        model.model.layers[1].mlp.up_proj.weight.data.mul_(2.0)
    after_fast = sample(model, ids, am, fast=True, **kw)
    after_hf = sample(model, ids, am, fast=False, **kw)
    assert not torch.equal(before.response_ids, after_fast.response_ids)
    assert torch.equal(after_fast.response_ids, after_hf.response_ids)
    torch.testing.assert_close(after_fast.logprobs, after_hf.logprobs, atol=1e-5, rtol=1e-5)
    ids2, am2 = _left_padded(len(tok), [6, 2, 9])
    for fast, hf in _hf_vs_fast_logits(model, ids2, am2, steps=3):
        torch.testing.assert_close(fast, hf, atol=1e-5, rtol=1e-5)


def test_lora_model_falls_back_and_still_samples(tiny_dir, tok):
    from alignflow.models import LoraSpec, load_policy

    lora = load_policy(tiny_dir, dtype="float32", lora=LoraSpec(r=4, alpha=8)).eval()
    assert fast_ineligibility(lora) is not None
    assert build_fast_llama(lora, 2, 8) is None
    assert fast_ineligibility(lora.base_model.model) is not None  # the adapter-injected inner model too
    ids, am = _enc(tok)
    kw = dict(max_new_tokens=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    a = sample(lora, ids, am, fast=True, generator=torch.Generator().manual_seed(0), **kw)
    b = sample(lora, ids, am, fast=False, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a.response_ids, b.response_ids)
    assert a.response_ids.shape[0] == 4


def test_other_ineligible_models_are_rejected():
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(**kw):
        cfg = LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            **kw,
        )
        return LlamaForCausalLM(cfg)

    assert "bias" in fast_ineligibility(build(attention_bias=True))
    assert "bias" in fast_ineligibility(build(mlp_bias=True))
    assert "rope_type" in fast_ineligibility(build(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    assert "dropout" in fast_ineligibility(build(attention_dropout=0.1).train())
    assert fast_ineligibility(build(attention_dropout=0.1).eval()) is None
    assert "dtype" in fast_ineligibility(build().half())

    class MyLinear(torch.nn.Linear):  # stands for an adapter layer swapped in place of a projection
        pass

    swapped = build()
    swapped.model.layers[0].self_attn.q_proj = MyLinear(16, 16, bias=False)
    assert "adapter" in fast_ineligibility(swapped)
    hooked = build()
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in fast_ineligibility(hooked)
    assert fast_ineligibility(torch.nn.Linear(2, 2)) is not None


def test_categorical_draw_matches_the_distribution():
    """Max frequency error within 5 standard errors; zero-mass entries never drawn; unnormalised input ok."""
    p = torch.tensor([0.0, 0.3, 0.0, 0.05, 0.4, 0.2, 0.05, 0.0])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    draws = categorical_draw((p * 3.7).expand(n, -1), g)  # unnormalised: total 3.7
    freq = torch.bincount(draws, minlength=8).double() / n
    se = torch.sqrt(p.double() * (1 - p.double()) / n)
    assert ((freq - p.double()).abs() <= 5 * se + 1e-12).all(), freq
    assert (freq[p == 0] == 0).all()
    # chi-square with 4 degrees of freedom (5 positive cells): P(chi2 > 23) < 2e-4
    keep = p > 0
    chi2 = float((((freq - p.double()) ** 2 / p.double())[keep]).sum() * n)
    assert chi2 < 23.0, chi2


def test_categorical_draw_is_reproducible_and_edge_safe():
    probs = torch.softmax(torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)), dim=-1)
    a = categorical_draw(probs, torch.Generator().manual_seed(7))
    b = categorical_draw(probs, torch.Generator().manual_seed(7))
    c = categorical_draw(probs, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.long and a.shape == (64,)
    # All mass on one entry followed by zeros: a uniform near 1 must not run off into the zero tail.
    one = torch.zeros(5000, 10)
    one[:, 3] = 1e-30
    assert (categorical_draw(one, torch.Generator().manual_seed(0)) == 3).all()
