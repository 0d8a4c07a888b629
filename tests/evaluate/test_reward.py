"""Reward-model accuracy, gold agreement and calibration (ECE) against hand cases and references."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.evaluate.reward import bt_probability, calibration, gold_agreement, preference_accuracy


def test_preference_accuracy_hand_case():
    """Gaps +1, -1, 0, +2: correct, wrong, tie (1/2), correct -> 2.5 / 4."""
    assert preference_accuracy([2, 0, 1, 3], [1, 1, 1, 1]) == 0.625
    assert preference_accuracy([5.0] * 7, [5.0] * 7) == 0.5
    with pytest.raises(ValueError, match="score_chosen has 2 values but score_rejected has 1"):
        preference_accuracy([1, 2], [1])
    with pytest.raises(ValueError, match="score_chosen: is empty"):
        preference_accuracy([], [])


def test_preference_accuracy_matches_trl_metric_without_ties():
    """TRL 1.16 RewardTrainer logs `(rewards_chosen > rewards_rejected).float().mean()` (reward_trainer.py);
    with continuous scores there are no ties and the two metrics agree. Importing TRL costs ~13 s, so the
    expression is reproduced here rather than called."""
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=200), rng.normal(size=200) - 0.3
    ref = float((c > r).astype(np.float32).mean())
    assert preference_accuracy(c, r) == pytest.approx(ref)
    assert 0.55 < ref < 0.75


def test_gold_agreement_excludes_gold_ties():
    score_gap = [1.0, -2.0, 0.5, 3.0, 0.0, -1.0]
    gold_gap = [0.2, 0.1, 0.0, 1e-12, -0.4, -0.3]
    # used: 0 (agree), 1 (disagree), 4 (score tie -> 1/2), 5 (agree); 2 and 3 are gold ties.
    acc, n_used = gold_agreement(score_gap, gold_gap)
    assert n_used == 4
    assert acc == pytest.approx(2.5 / 4)
    acc, n_used = gold_agreement(score_gap, gold_gap, tie_eps=0.15)
    assert n_used == 3 and acc == pytest.approx(2.5 / 3)  # 0 agree, 4 score tie, 5 agree
    acc, n_used = gold_agreement([1.0, 2.0], [0.0, 0.0])
    assert n_used == 0 and np.isnan(acc)


def test_bt_probability_is_a_stable_sigmoid():
    gaps = np.array([-1000.0, -2.0, 0.0, 2.0, 1000.0])
    p = bt_probability(gaps)
    assert p[2] == 0.5 and p[0] == 0.0 and p[-1] == 1.0
    assert p[3] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert p[1] + p[3] == pytest.approx(1.0)


def _ece_loop(probs, outcomes, n_bins):
    """Straightforward reference: assign each item to a bin one by one, then sum weighted gaps."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for p, y in zip(probs, outcomes, strict=True):
        b = min(int(p * n_bins), n_bins - 1)
        groups.setdefault(b, []).append((p, y))
    ece = 0.0
    for items in groups.values():
        mp = sum(p for p, _ in items) / len(items)
        fp = sum(y for _, y in items) / len(items)
        ece += len(items) / len(probs) * abs(mp - fp)
    return ece, {b: len(v) for b, v in groups.items()}


def test_calibration_hand_case():
    """Bins of width 0.5: [0.1, 0.3] with outcomes [0, 1] -> |0.2 - 0.5| = 0.3, weight 2/4;
    [0.7, 0.9] with outcomes [1, 1] -> |0.8 - 1| = 0.2, weight 2/4. ECE = 0.25."""
    out = calibration([0.1, 0.3, 0.7, 0.9], [0, 1, 1, 1], n_bins=2)
    assert out["ece"] == pytest.approx(0.25)
    assert out["bins"] == [
        {"lo": 0.0, "hi": 0.5, "mean_prob": pytest.approx(0.2), "frac_positive": 0.5, "count": 2},
        {"lo": 0.5, "hi": 1.0, "mean_prob": pytest.approx(0.8), "frac_positive": 1.0, "count": 2},
    ]


def test_calibration_edges_and_perfect_case():
    # 1.0 falls in the last bin, 0.5 starts the second; outcomes equal to the probabilities' bin means.
    out = calibration([0.0, 0.5, 1.0, 1.0], [0, 1, 1, 1], n_bins=2)
    assert [b["count"] for b in out["bins"]] == [1, 3]
    assert calibration([0.0, 0.0, 1.0], [0, 0, 1])["ece"] == 0.0


def test_calibration_parity_with_loop_and_sklearn():
    rng = np.random.default_rng(3)
    gaps = rng.normal(0, 2, size=3000)
    # Outcomes drawn from a temperature-2 version of the model: an over-confident reward model.
    outcomes = (rng.random(3000) < bt_probability(gaps / 2)).astype(float)
    probs = bt_probability(gaps)
    out = calibration(probs, outcomes, n_bins=15)
    ece_ref, counts_ref = _ece_loop(probs, outcomes, 15)
    assert out["ece"] == pytest.approx(ece_ref, abs=1e-12)
    assert {int(round(b["lo"] * 15)): b["count"] for b in out["bins"]} == counts_ref
    assert out["ece"] > 0.05  # over-confidence is visible

    sk = pytest.importorskip("sklearn.calibration")
    frac_pos, mean_pred = sk.calibration_curve(outcomes, probs, n_bins=15, strategy="uniform")
    np.testing.assert_allclose([b["frac_positive"] for b in out["bins"]], frac_pos)
    np.testing.assert_allclose([b["mean_prob"] for b in out["bins"]], mean_pred)

    calibrated = (rng.random(3000) < probs).astype(float)
    assert calibration(probs, calibrated, n_bins=15)["ece"] < 0.04


def test_calibration_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match=r"probs: value at index 1 is 1.2; expected a probability"):
        calibration([0.1, 1.2], [0, 1])
    with pytest.raises(ValueError, match=r"outcomes: value at index 0 is 2.0; expected 0 or 1"):
        calibration([0.1, 0.2], [2, 1])
    with pytest.raises(ValueError, match="n_bins"):
        calibration([0.1], [1], n_bins=0)
    with pytest.raises(ValueError, match="probs has 2 values but outcomes has 1"):
        calibration([0.1, 0.2], [1])
