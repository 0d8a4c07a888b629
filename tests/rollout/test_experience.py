"""Running reward statistics, reward shaping, reward sources and the per-token forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignflow.errors import ConfigError
from alignflow.rollout import (
    EnsembleScorer,
    RunningMoments,
    ShapingConfig,
    function_scorer,
    response_forward,
    shape_scores,
    value_forward,
)
from alignflow.rollout.toy import brevity, digit_fraction, lowercase_fraction


def test_running_moments_equal_numpy_over_all_batches():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 32, 5)]
    rm = RunningMoments()
    for i, b in enumerate(batches):
        rm.update(torch.tensor(b))
        seen = np.concatenate(batches[: i + 1])
        assert rm.mean == pytest.approx(seen.mean(), rel=1e-12)
        assert rm.var == pytest.approx(seen.var(), rel=1e-12, abs=1e-12)
    clone = RunningMoments()
    clone.load_state_dict(rm.state_dict())
    assert clone.state_dict() == rm.state_dict()


def test_shape_scores_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    finished = torch.tensor([True, False, True, False])
    lengths = torch.tensor([2, 4, 6, 8])
    cfg = ShapingConfig(missing_eos_penalty=1.0, length_penalty=0.1)
    # 1 - 0.2, 2 - 1 - 0.4, 3 - 0.6, 4 - 1 - 0.8
    torch.testing.assert_close(
        shape_scores(scores, finished, lengths, cfg, None), torch.tensor([0.8, 0.6, 2.4, 2.2])
    )
    rm = RunningMoments()
    out = shape_scores(scores, finished, lengths, ShapingConfig(normalize=True, clip=1.0), rm)
    z = (scores - 2.5) / np.sqrt(1.25)
    torch.testing.assert_close(out, z.clamp(-1, 1))
    with pytest.raises(ValueError, match="RunningMoments"):
        shape_scores(scores, finished, lengths, ShapingConfig(normalize=True), None)


def test_ensemble_conservative_score():
    a = lambda p, r: (torch.tensor([1.0, 2.0]), torch.zeros(2))  # noqa: E731
    b = lambda p, r: (torch.tensor([3.0, 2.0]), torch.zeros(2))  # noqa: E731
    out = EnsembleScorer([a, b], k=1.0)(["x", "y"], ["u", "v"])
    # mean [2, 2], unbiased std across members [sqrt(2), 0]
    torch.testing.assert_close(out, torch.tensor([2.0 - 2**0.5, 2.0]))
    single = EnsembleScorer([lambda p, r: (torch.tensor([1.0]), torch.tensor([0.5]))], k=2.0)
    torch.testing.assert_close(single(["x"], ["y"]), torch.tensor([0.0]))  # one member: its own spread


def test_function_scorer_checks_spec_and_output():
    score = function_scorer("alignflow.rollout.toy:digit_fraction")
    torch.testing.assert_close(score(["p", "p"], ["12ab", ""]), torch.tensor([0.5, 0.0]))
    with pytest.raises(ConfigError, match="reward.fn: expected 'package.module:function'"):
        function_scorer("alignflow.rollout.toy.digit_fraction")
    with pytest.raises(ConfigError, match="cannot import module"):
        function_scorer("no_such_module_xyz:f")
    with pytest.raises(ConfigError, match="has no attribute"):
        function_scorer("alignflow.rollout.toy:nope")
    bad = function_scorer("builtins:list")  # returns a list of the prompt strings' characters... wrong length
    with pytest.raises((ValueError, TypeError)):
        bad(["ab"], ["c"])


def test_toy_rewards():
    assert digit_fraction([""], ["a1 2"]) == [pytest.approx(2 / 3)]
    assert brevity([""] * 2, ["", "one two"]) == [1.0, pytest.approx(1 / 3)]
    assert lowercase_fraction([""] * 2, ["abC!", ""]) == [0.5, 0.0]


def test_value_forward_and_value_head_shapes(tiny_dir, tok):
    from alignflow.models import load_value_model

    enc = tok(["hello there", "x"], return_tensors="pt", padding=True)
    ids = torch.cat([enc.input_ids, torch.tensor([[5, 6, 7], [8, 9, 10]])], dim=1)
    am = torch.cat([enc.attention_mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    sep = load_value_model(tiny_dir, dtype="float32", pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        v = value_forward(sep, ids, am, 3)
        # The value of the state before response token t is the score head on the hidden state at P + t - 1.
        hidden = sep.base_model(input_ids=ids, attention_mask=am).last_hidden_state
        torch.testing.assert_close(v, sep.score(hidden[:, -4:-1]).squeeze(-1), atol=1e-5, rtol=1e-5)
    shared = load_value_model(tiny_dir, dtype="float32", shared_trunk=True).eval()
    with torch.no_grad():
        out = response_forward(shared, ids, am, 3, with_values=True, with_entropy=True)
    assert out.values.shape == out.logprobs.shape == out.entropy.shape == (2, 3)
    assert (out.values == 0).all()  # zero-initialised value head
    with pytest.raises(TypeError, match="value-head"):
        response_forward(shared.lm, ids, am, 3, with_values=True)


def test_packed_prompt_trees_equal_padded_forwards(tiny_dir, tok, model):
    """GRPO-style groups (2 prompts x 3 samples, ragged EOS): packed trees give the padded outputs on the response."""
    from alignflow.models import load_value_model
    from alignflow.rollout import packable, rollout_trees, sample, tree_response_forward, tree_value_forward

    enc = tok(["hello there, how are you", "x"], return_tensors="pt", padding=True)
    ids, am = enc.input_ids.repeat_interleave(3, 0), enc.attention_mask.repeat_interleave(3, 0)
    gen = torch.Generator().manual_seed(0)
    roll = sample(
        model, ids, am, max_new_tokens=6, eos_token_id=[], pad_token_id=tok.pad_token_id, generator=gen
    )
    # Ragged responses: cut rows at different lengths as EOS would.
    lengths = torch.tensor([6, 2, 4, 1, 6, 3])
    roll.response_mask = (torch.arange(6)[None] < lengths[:, None]).long()
    roll.response_ids = roll.response_ids.masked_fill(roll.response_mask == 0, tok.pad_token_id)
    seq, seq_mask = roll.sequences()
    groups = torch.arange(6) // 3
    rows = [4, 0, 5, 2, 1, 3]  # a shuffled minibatch: group members are scattered
    trees = rollout_trees(roll, rows, groups)
    assert trees.batch.num_real_tokens == enc.attention_mask.sum() + lengths.sum()  # each prompt once
    m = roll.response_mask[rows].bool()
    shared = load_value_model(tiny_dir, dtype="float32", shared_trunk=True).eval()
    torch.nn.init.normal_(shared.value_head.summary.weight)
    separate = load_value_model(tiny_dir, dtype="float32", pad_token_id=tok.pad_token_id).eval()
    assert packable(model) and packable(shared) and packable(separate, head="score")
    assert not packable(separate)  # a value model has no LM head
    with torch.no_grad():
        packed = tree_response_forward(shared, trees, 0.7, with_entropy=True, with_values=True)
        padded = response_forward(
            shared, seq[rows], seq_mask[rows], 6, 0.7, with_entropy=True, with_values=True
        )
        for name in ("logprobs", "entropy", "values"):
            a, b = getattr(packed, name), getattr(padded, name)
            torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
            assert (a[~m] == 0).all()
        torch.testing.assert_close(
            tree_value_forward(separate, trees)[m],
            value_forward(separate, seq[rows], seq_mask[rows], 6)[m],
            atol=1e-5,
            rtol=1e-5,
        )
