"""Reward-model accuracy, gold agreement, top-label calibration (ECE) and the RM eval metrics against hand cases
and references."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.evaluate.reward import (
    bt_probability,
    calibration,
    gold_agreement,
    preference_accuracy,
    preference_metrics,
)


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
    """Straightforward top-label reference: each pair's confidence and correctness one by one, then bins."""
    groups: dict[int, list[tuple[float, float]]] = {}
    for p, y in zip(probs, outcomes, strict=True):
        conf = max(p, 1 - p)
        correct = 0.5 if p == 0.5 else float((p > 0.5) == (y == 1))
        b = min(int((conf - 0.5) * 2 * n_bins), n_bins - 1)
        groups.setdefault(b, []).append((conf, correct))
    ece = 0.0
    for items in groups.values():
        mean_conf = sum(c for c, _ in items) / len(items)
        acc = sum(a for _, a in items) / len(items)
        ece += len(items) / len(probs) * abs(acc - mean_conf)
    return ece, {b: len(v) for b, v in groups.items()}


def test_calibration_hand_case():
    """Top-label, 2 bins on [0.5, 1]. p = 0.1, 0.3, 0.7, 0.9 -> confidences 0.9, 0.7, 0.7, 0.9; with outcomes
    0, 1, 1, 1 the predictions are right, wrong, right, right. Bin [0.5, 0.75): conf 0.7, acc 1/2 -> 0.2;
    bin [0.75, 1]: conf 0.9, acc 1 -> 0.1; each weighs 2/4, so ECE = 0.15."""
    out = calibration([0.1, 0.3, 0.7, 0.9], [0, 1, 1, 1], n_bins=2)
    assert out["ece"] == pytest.approx(0.15)
    assert out["bins"] == [
        {"lo": 0.5, "hi": 0.75, "confidence": pytest.approx(0.7), "accuracy": 0.5, "count": 2},
        {"lo": 0.75, "hi": 1.0, "confidence": pytest.approx(0.9), "accuracy": 1.0, "count": 2},
    ]


def test_calibration_edges_ties_and_perfect_case():
    # 1.0 and 0.0 are confidence 1 (the last bin), 0.75 starts the second bin, a tie p = 0.5 counts one half.
    out = calibration([0.0, 0.5, 1.0, 0.75], [0, 1, 1, 1], n_bins=2)
    assert [(b["lo"], b["count"]) for b in out["bins"]] == [(0.5, 1), (0.75, 3)]
    assert out["bins"][0]["accuracy"] == 0.5 and out["bins"][0]["confidence"] == 0.5
    assert calibration([0.0, 0.0, 1.0], [0, 0, 1])["ece"] == 0.0
    # Order-free: listing every pair the other way round (p -> 1 - p, outcome -> 1 - outcome) changes nothing.
    p, y = np.array([0.1, 0.35, 0.62, 0.97]), np.array([0, 0, 1, 0])
    assert calibration(1 - p, 1 - y, n_bins=4) == calibration(p, y, n_bins=4)


def test_calibration_parity_with_loop_and_sklearn():
    rng = np.random.default_rng(3)
    gaps = rng.normal(0, 2, size=3000)
    # Outcomes drawn from a temperature-2 version of the model: an over-confident reward model.
    outcomes = (rng.random(3000) < bt_probability(gaps / 2)).astype(float)
    probs = bt_probability(gaps)
    out = calibration(probs, outcomes, n_bins=15)
    ece_ref, counts_ref = _ece_loop(probs, outcomes, 15)
    assert out["ece"] == pytest.approx(ece_ref, abs=1e-12)
    assert {int(round((b["lo"] - 0.5) * 30)): b["count"] for b in out["bins"]} == counts_ref
    assert out["ece"] > 0.05  # over-confidence is visible

    # scikit-learn's reliability curve of the top label: correctness against confidence. Its 30 uniform bins
    # on [0, 1] have the same upper 15 edges as ours on [0.5, 1].
    sk = pytest.importorskip("sklearn.calibration")
    conf = np.maximum(probs, 1 - probs)
    correct = ((probs > 0.5) == (outcomes == 1)).astype(float)
    frac_pos, mean_pred = sk.calibration_curve(correct, conf, n_bins=30, strategy="uniform")
    np.testing.assert_allclose([b["accuracy"] for b in out["bins"]], frac_pos)
    np.testing.assert_allclose([b["confidence"] for b in out["bins"]], mean_pred)

    calibrated = (rng.random(3000) < probs).astype(float)
    assert calibration(probs, calibrated, n_bins=15)["ece"] < 0.04


def test_preference_metrics_by_hand_and_against_the_training_loss():
    """Gaps +2, +2, -2, 0 (pairs listed chosen-first): accuracy (1 + 1 + 0 + 1/2) / 4, margin 1/2.

    Top-label with 2 bins: the tie has confidence 0.5 and counts one half (bin [0.5, 0.75), no error); the
    three others have confidence s(2) = 0.8808 with two right: ECE = 3/4 * |2/3 - 0.8808|.
    """
    import torch

    from alignflow.train.losses import bradley_terry_loss

    chosen, rejected = [1.0, 3.0, 0.0, 0.5], [-1.0, 1.0, 2.0, 0.5]
    m = preference_metrics(chosen, rejected, n_bins=2)
    s2 = 1 / (1 + np.exp(-2.0))
    assert m["accuracy"] == pytest.approx(2.5 / 4) and m["margin"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(0.75 * abs(2 / 3 - s2), abs=1e-12)
    assert [b["count"] for b in m["reliability"]] == [1, 3]
    want = bradley_terry_loss(
        torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    )
    assert m["loss"] == pytest.approx(float(want), abs=1e-12)
    big = preference_metrics([800.0], [0.0])  # no overflow in -log sigmoid(-gap) terms
    assert big["loss"] == 0.0 and big["accuracy"] == 1.0


def test_calibration_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match=r"probs: value at index 1 is 1.2; expected a probability"):
        calibration([0.1, 1.2], [0, 1])
    with pytest.raises(ValueError, match=r"outcomes: value at index 0 is 2.0; expected 0 or 1"):
        calibration([0.1, 0.2], [2, 1])
    with pytest.raises(ValueError, match="n_bins"):
        calibration([0.1], [1], n_bins=0)
    with pytest.raises(ValueError, match="probs has 2 values but outcomes has 1"):
        calibration([0.1, 0.2], [1])
