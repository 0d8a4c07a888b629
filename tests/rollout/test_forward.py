"""The Forwarder (one layout for every forward of a PPO step) and make_experience (the step's tensors)."""

from __future__ import annotations

import math

import pytest
import torch

from alignflow.models import CausalLMWithValueHead, LoraSpec, load_policy, load_reference, load_value_model
from alignflow.rollout import (
    AdvantageSpec,
    Forwarder,
    RolloutRows,
    explained_variance,
    make_experience,
    sample,
)
from alignflow.train.advantages import gae, kl_penalty, per_token_rewards

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def rollout(model, tok):
    """2 prompts x 3 samples (rows grouped per prompt), ragged responses as EOS would cut them."""
    enc = tok(["hello there, how are you", "x"], return_tensors="pt", padding=True)
    ids, am = enc.input_ids.repeat_interleave(3, 0), enc.attention_mask.repeat_interleave(3, 0)
    gen = torch.Generator().manual_seed(0)
    roll = sample(
        model,
        ids,
        am,
        max_new_tokens=6,
        eos_token_id=[],
        pad_token_id=tok.pad_token_id,
        temperature=TEMPERATURE,
        generator=gen,
    )
    lengths = torch.tensor([6, 2, 4, 1, 6, 3])
    roll.response_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    roll.response_ids = roll.response_ids.masked_fill(roll.response_mask == 0, tok.pad_token_id)
    return roll


@pytest.fixture(scope="module")
def lora_policy(tiny_dir):
    policy = load_policy(tiny_dir, dtype="float32", lora=LoraSpec(r=4, alpha=8)).eval()
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # peft starts B at 0 (adapters a no-op): make them matter
            torch.nn.init.normal_(p, std=0.2)
    return policy


def _close_on(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_packed_and_padded_forwarders_agree_and_reference_is_adapters_off(
    tiny_dir, tok, rollout, lora_policy
):
    critic = load_value_model(tiny_dir, dtype="float32", pad_token_id=tok.pad_token_id).eval()
    rows = RolloutRows(rollout, group_size=3)
    assert rows.groups.tolist() == [0, 0, 0, 1, 1, 1] and len(rows) == 6
    mask = rollout.response_mask.bool()
    got = {}
    for packing in (True, False):
        fwd = Forwarder(lora_policy, None, critic, temperature=TEMPERATURE, packing=packing, chunk_size=4)
        assert fwd.packed is packing  # every model here splits its head off its trunk
        assert fwd.layout == ("packed prompt trees" if packing else "padded rows")
        got[packing] = {
            "policy": fwd.policy_logprobs(rows),
            "reference": fwd.reference_logprobs(rows),
            "values": fwd.values(rows),
        }
        assert not any(t.requires_grad for t in got[packing].values())  # scoring runs without grad
        idx = [4, 0, 5]  # a shuffled minibatch: group members scattered
        train = fwd.train_forward(rows, idx)
        assert train.logprobs.requires_grad and train.values.requires_grad
        _close_on(mask[idx], train.logprobs, got[packing]["policy"][idx])
        _close_on(mask[idx], train.values, got[packing]["values"][idx])
        assert train.entropy.shape == (3, 6)
    for name in ("policy", "reference", "values"):
        _close_on(mask, got[True][name], got[False][name])
    # The LoRA reference is the policy with its adapters off: the base model's log-probs, not the policy's.
    base = Forwarder(
        load_policy(tiny_dir, dtype="float32").eval(), None, temperature=TEMPERATURE, packing=False
    )
    _close_on(mask, got[True]["reference"], base.policy_logprobs(rows))
    assert not torch.allclose(got[True]["policy"][mask], got[True]["reference"][mask], atol=1e-3)
    # Chunking changes nothing.
    one_chunk = Forwarder(lora_policy, None, critic, temperature=TEMPERATURE, chunk_size=64)
    _close_on(mask, one_chunk.values(rows), got[True]["values"])


def test_shared_trunk_values_and_the_padded_fallback(tiny_dir, tok, rollout, model):
    rows = RolloutRows(rollout, group_size=3)
    mask = rollout.response_mask.bool()
    shared = CausalLMWithValueHead(model)
    torch.nn.init.normal_(shared.value_head.summary.weight)
    fwd = Forwarder(model, load_reference(tiny_dir, dtype="float32"), policy_with_value=shared)
    assert fwd.trained is shared and fwd.has_critic and fwd.packed
    out = fwd.train_forward(rows, [1, 2])
    _close_on(mask[[1, 2]], out.values, fwd.values(rows)[[1, 2]])
    # A model whose head cannot be split off its trunk (here a value model in the reference's place) sends every
    # forward to padded rows.
    critic = load_value_model(tiny_dir, dtype="float32", pad_token_id=tok.pad_token_id)
    assert not Forwarder(model, critic).packed
    with pytest.raises(ValueError, match="not both"):
        Forwarder(model, None, critic, policy_with_value=shared)
    with pytest.raises(ValueError, match="no critic"):
        Forwarder(model, None).values(rows)


def test_make_experience_by_hand(tiny_dir, tok, rollout, model):
    """Reference = the policy's own weights and old log-probs recomputed: the KL is 0, so RLOO's advantages are
    the leave-one-out baseline of the scores alone, derived here by hand."""
    rows = RolloutRows(rollout, group_size=3)
    fwd = Forwarder(model, load_reference(tiny_dir, dtype="float32"), temperature=TEMPERATURE)
    scores = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    spec = AdvantageSpec("rloo", group_size=3, whiten=False, recompute_logprobs=True)
    exp = make_experience(fwd, rows, ["p"] * 6, scores, scores, 0.5, spec)
    assert exp.kl.abs().max() < 1e-5 and exp.kl_seq.shape == (6,)
    # A_i = r_i - mean of the other two in its group.
    torch.testing.assert_close(
        exp.advantages, torch.tensor([-1.5, 0.0, 1.5, -3.0, -3.0, 6.0]), atol=1e-4, rtol=0
    )
    assert exp.values is None and exp.returns is None and len(exp) == 6
    # The sampler's log-probs (the default "old" log-probs) equal a training-layout forward at the same temperature.
    mask = rollout.response_mask.bool()
    _close_on(mask, exp.old_logprobs, rollout.logprobs)
    grpo = make_experience(fwd, rows, ["p"] * 6, scores, scores, 0.5, AdvantageSpec("grpo", group_size=3))
    assert grpo.advantages.shape == (6,) and abs(float(grpo.advantages[:3].sum())) < 1e-5  # centred per group


def test_make_experience_gae_returns_are_advantages_plus_values(tiny_dir, tok, rollout, lora_policy):
    critic = load_value_model(tiny_dir, dtype="float32", pad_token_id=tok.pad_token_id).eval()
    rows = RolloutRows(rollout, group_size=3)
    fwd = Forwarder(lora_policy, None, critic, temperature=TEMPERATURE)
    scores = torch.linspace(-1.0, 1.0, 6)
    spec = AdvantageSpec("gae", group_size=3, kl_estimator="k1", gamma=1.0, lam=0.9, whiten=False)
    exp = make_experience(fwd, rows, ["p"] * 6, scores, scores, 0.1, spec)
    m = exp.mask.bool()
    assert exp.advantages.shape == exp.values.shape == exp.returns.shape == (6, 6)
    _close_on(m, exp.returns, exp.advantages + exp.values)  # GAE's value targets
    torch.testing.assert_close(exp.kl, kl_penalty(rollout.logprobs, exp.ref_logprobs) * exp.mask)
    rewards, _, _ = per_token_rewards(scores, exp.old_logprobs, exp.ref_logprobs, exp.mask, 0.1, "k1")
    torch.testing.assert_close(exp.advantages, gae(rewards, exp.values, exp.mask, 1.0, 0.9)[0])
    whitened = make_experience(fwd, rows, ["p"] * 6, scores, scores, 0.1, AdvantageSpec("gae", group_size=3))
    assert abs(float(whitened.advantages[m].mean())) < 1e-5
    assert explained_variance(exp.returns, exp.returns, exp.mask) == 1.0  # a perfect critic
    # predicting 0 explains none of the variance: 1 - Var[R] / Var[R]
    assert explained_variance(exp.returns * 0, exp.returns, exp.mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(
        explained_variance(exp.values, torch.ones_like(exp.values), exp.mask)
    )  # constant returns
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        make_experience(fwd, rows, ["p"] * 6, scores, scores, 0.1, AdvantageSpec("ppo", group_size=3))  # type: ignore[arg-type]
