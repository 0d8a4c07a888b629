"""Learning curves and the default embedding reward model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from alignflow.quality.efficiency import bt_accuracy, embedding_fit_and_score, fit_bt_linear, learning_curve

FIXTURES = Path(__file__).parent / "fixtures"


def test_fit_bt_linear_recovers_direction():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=8)
    diff = rng.normal(size=(2000, 8))
    p = 1 / (1 + np.exp(-2 * diff @ w_true))
    w = fit_bt_linear(diff, p, c=10.0)
    cosine = w @ w_true / np.linalg.norm(w) / np.linalg.norm(w_true)
    assert cosine > 0.98
    # Antisymmetry: the mirrored rows make an intercept-free model; swapping A and B flips the prediction.
    assert bt_accuracy(w, diff, np.where(diff @ w_true > 0, "A", "B")) > 0.9


def test_learning_curve_grows_with_labels():
    rng = np.random.default_rng(1)
    w_true = rng.normal(size=10)

    def make(n):
        diff = rng.normal(size=(n, 10))
        noisy = np.where(rng.random(n) < 0.8, diff @ w_true > 0, diff @ w_true <= 0)
        return pd.DataFrame({"diff": list(diff), "label": np.where(noisy, "A", "B")})

    pool, heldout = make(800), make(1000)

    def fit_and_score(train, test):
        p = (train["label"] == "A").to_numpy(float)
        w = fit_bt_linear(np.stack(train["diff"]), p)
        return bt_accuracy(w, np.stack(test["diff"]), test["label"].tolist())

    curve = learning_curve(pool, heldout, fit_and_score, sizes=[20, 100, 800], repeats=3)
    assert list(curve["n_labels"]) == [20, 100, 800]
    assert curve["accuracy"].iat[-1] > curve["accuracy"].iat[0]
    assert curve["gain_per_100_labels"].iat[0] is None
    expected = (curve["accuracy"].iat[2] - curve["accuracy"].iat[1]) / 700 * 100
    assert curve["gain_per_100_labels"].iat[2] == pytest.approx(expected)
    with pytest.raises(ValueError, match="exceeds the pool"):
        learning_curve(pool, heldout, fit_and_score, sizes=[900])


def test_embedding_reward_model_on_llmbar_fixture():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    records = json.loads((FIXTURES / "llmbar_natural_60.json").read_text())
    pairs = pd.DataFrame(
        {
            "prompt": [r["input"] for r in records],
            "response_a": [r["output_1"] for r in records],
            "response_b": [r["output_2"] for r in records],
            "label": ["A" if r["label"] == 1 else "B" for r in records],
        }
    )
    fit_and_score = embedding_fit_and_score()
    curve = learning_curve(pairs.iloc[:40], pairs.iloc[40:], fit_and_score, sizes=[10, 40])
    assert curve["accuracy"].between(0.0, 1.0).all()
    # Trained and scored on the same pairs, a linear head on 384-d embeddings must fit 40 pairs well.
    assert fit_and_score(pairs.iloc[:40], pairs.iloc[:40]) >= 0.8


def test_label_costs_and_cost_curve_by_hand():
    """Tier rates expert 1.0, standard 0.25: item x has an expert and a standard judgment (1.25; its
    non-overall dimension row does not count), item y two standard ones (0.5), item z one expert one (1.0)."""
    from alignflow.quality.efficiency import label_costs, labels_to_reach

    judgments = pd.DataFrame(
        {
            "item_id": ["x", "x", "x", "y", "y", "z"],
            "annotator_id": ["e1", "s1", "s1", "s1", "s2", "e1"],
            "dimension": ["overall", "overall", "accuracy", "overall", "overall", "overall"],
        }
    )
    tiers = {"e1": "expert", "s1": "standard", "s2": "standard"}
    costs = label_costs(judgments, tiers, {"expert": 1.0, "standard": 0.25})
    assert costs.to_dict() == {"x": 1.25, "y": 0.5, "z": 1.0}
    with pytest.raises(ValueError, match="no cost per label"):
        label_costs(judgments, tiers, {"expert": 1.0})
    with pytest.raises(ValueError, match="no tier"):
        label_costs(judgments, {"e1": "expert"}, {"expert": 1.0})

    # A fake fit_and_score whose accuracy is the share of "good" rows trained on: in the given order
    # (good, bad, good, good) and sizes 1, 2, 4 the accuracies are 1, 0.5, 0.75.
    pool = pd.DataFrame({"good": [1.0, 0.0, 1.0, 1.0], "cost": [1.25, 0.5, 1.0, 0.25]})
    curve = learning_curve(
        pool, pool, lambda tr, ho: float(tr["good"].mean()), sizes=[1, 2, 4], order="given", cost="cost"
    )
    assert curve["accuracy"].tolist() == [1.0, 0.5, 0.75]
    assert curve["cost"].tolist() == [1.25, 1.75, 3.0]
    # (0.5 - 1) / 0.5 = -1 per unit of cost; (0.75 - 0.5) / 1.25 = 0.2; per 100 labels (0.25 / 2) * 100 = 12.5.
    assert curve["gain_per_unit_cost"].tolist()[1:] == pytest.approx([-1.0, 0.2])
    assert curve["gain_per_unit_cost"].iat[0] is None
    assert curve["gain_per_100_labels"].iat[2] == pytest.approx(12.5)
    assert labels_to_reach(curve, 0.7) == 1 and labels_to_reach(curve.iloc[1:], 0.7) == 4
    assert labels_to_reach(curve, 1.1) is None
    with pytest.raises(ValueError, match="repeats=1"):
        learning_curve(pool, pool, lambda tr, ho: 0.0, sizes=[1], order="given", repeats=2)
    with pytest.raises(ValueError, match="cost column"):
        learning_curve(pool, pool, lambda tr, ho: 0.0, sizes=[1], cost="price")
