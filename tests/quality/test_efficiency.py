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
