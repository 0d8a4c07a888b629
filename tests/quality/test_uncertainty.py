"""Reward-model uncertainty for routing, derived by hand."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.quality.uncertainty import expert_mask, pair_uncertainty, queue_priorities, ranking_uncertainty


def test_two_members_by_hand() -> None:
    """r_A = (1, 3), r_B = (0, 0): d = (1, 3), mu = 2, s = std(1, 3) = 1 (population).
    margin = sigmoid(2) - 1/2 = 0.880797 - 0.5 = 0.380797.
    moderated: 2 / sqrt(1 + pi/8) = 2 / 1.180127 = 1.694733, sigmoid = 0.844846, priority = 1 - 2 * 0.344846
    = 0.310309."""
    u = pair_uncertainty(np.array([[1.0], [3.0]]), np.array([[0.0], [0.0]]))
    assert u.mean_diff == pytest.approx([2.0])
    assert u.disagreement == pytest.approx([1.0])
    assert u.margin == pytest.approx([0.380797], abs=1e-6)
    assert u.priority == pytest.approx([0.310309], abs=1e-6)


def test_disagreement_is_about_the_difference_not_the_candidates() -> None:
    """Item 0: both members score both candidates alike (r_A = r_B = (1, 2)): d = (0, 0), s = 0, mu = 0, a coin
    flip for the ensemble: margin 0, priority 1. Item 1: r_A = (2, 4), r_B = (1, 3): each candidate's std is 1,
    but d = (1, 1), so s = 0; margin = sigmoid(1) - 1/2 = 0.231059, priority = 1 - 2 * 0.231059 = 0.537883."""
    u = pair_uncertainty(np.array([[1.0, 2.0], [2.0, 4.0]]), np.array([[1.0, 1.0], [2.0, 3.0]]))
    assert u.disagreement == pytest.approx([0.0, 0.0])
    assert u.margin == pytest.approx([0.0, 0.231059], abs=1e-6)
    assert u.priority == pytest.approx([1.0, 0.537883], abs=1e-6)


def test_one_model_and_monotonicity() -> None:
    """One model, (N,) inputs: s = 0 and priority = 1 - 2 * margin. For a fixed mean difference the priority
    rises with the members' disagreement; for a fixed disagreement it falls with |mean|, symmetric in A/B."""
    one = pair_uncertainty(np.array([0.5, -2.0]), np.array([0.0, 0.0]))
    assert one.disagreement == pytest.approx([0.0, 0.0])
    assert one.priority == pytest.approx(1 - 2 * one.margin)
    spread = np.array([0.0, 1.0, 2.0, 4.0])
    a = np.stack([1.0 - spread, 1.0 + spread])  # (2 members, 4 items): mean 1, s = spread
    u = pair_uncertainty(a, np.zeros_like(a))
    assert u.disagreement == pytest.approx(spread)
    assert np.all(np.diff(u.priority) > 0)
    far = pair_uncertainty(np.array([[0.5, 1.0, 3.0]]), np.zeros((1, 3)))
    assert np.all(np.diff(far.priority) < 0)
    swapped = pair_uncertainty(np.zeros_like(a), a)
    assert swapped.priority == pytest.approx(u.priority) and swapped.mean_diff == pytest.approx(-u.mean_diff)


def test_ranking_items_take_their_most_uncertain_pair() -> None:
    """One model, candidates rewarded (0, 0.1, 5): pair (0, 1) has d = -0.1, priority 1 - 2 |sigmoid(-0.1) - 1/2|
    = 0.950042; pairs with candidate 2 are nearly certain. Second item (3, 0, 3.05): pair (0, 2)."""
    u = ranking_uncertainty(np.array([[0.0, 0.1, 5.0], [3.0, 0.0, 3.05]]))
    assert u.pair.tolist() == [[0, 1], [0, 2]]
    assert u.priority[0] == pytest.approx(0.950042, abs=1e-6)
    assert u.margin[0] == pytest.approx(0.024979, abs=1e-6)
    # Two candidates: the same figures as pair_uncertainty.
    r = np.random.default_rng(0).normal(size=(3, 5, 2))
    two, pair = ranking_uncertainty(r), pair_uncertainty(r[:, :, 0], r[:, :, 1])
    assert two.priority == pytest.approx(pair.priority) and two.disagreement == pytest.approx(
        pair.disagreement
    )
    with pytest.raises(ValueError, match="C >= 2"):
        ranking_uncertainty(np.zeros((2, 3, 1)))


def test_routing_helpers() -> None:
    p = np.array([0.1, 0.9, 0.5, 0.9])
    assert expert_mask(p, 0.5).tolist() == [False, True, False, True]
    assert expert_mask(p, 0.25).tolist() == [False, True, False, False]  # ties: the first one
    assert not expert_mask(p, 0.0).any() and expert_mask(p, 1.0).all()
    with pytest.raises(ValueError, match="fraction"):
        expert_mask(p, 1.5)
    assert queue_priorities(np.array([0.0, 0.310309, 1.0, 1.2])).tolist() == [0, 310, 1000, 1000]
    with pytest.raises(ValueError, match="shape"):
        pair_uncertainty(np.zeros((2, 3)), np.zeros((3, 3)))
