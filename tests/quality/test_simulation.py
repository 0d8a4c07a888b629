"""Simulated pools with known truth: QC detection, aggregation accuracy, soft-label reward models."""

from __future__ import annotations

import numpy as np
import pytest

from alignflow.quality.aggregate import aggregate
from alignflow.quality.efficiency import bt_accuracy, fit_bt_linear
from alignflow.quality.policy import QCPolicy, evaluate_policy, flagged_annotators
from alignflow.quality.schema import validate_judgments
from alignflow.quality.simulate import PoolSpec, simulate_pool

SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_detection_precision_recall(seed):
    # 3-way overlap, 10% gold: 20 annotators, 6 unreliable (2 spammers, 2 flippers, 2 position-biased).
    sim = simulate_pool(n_items=1200, overlap=3, gold_rate=0.1, seed=seed)
    judgments = validate_judgments(sim.judgments)
    flagged = flagged_annotators(evaluate_policy(judgments, QCPolicy()))
    bad = set(sim.annotators.loc[sim.annotators["unreliable"], "annotator_id"])
    tp = len(flagged & bad)
    precision = tp / len(flagged) if flagged else 0.0
    recall = tp / len(bad)
    assert precision >= 0.9, (precision, sorted(flagged - bad))
    assert recall >= 0.9, (recall, sorted(bad - flagged))


def _accuracy(result, truth):
    return float((result.set_index("item_id")["label"] == truth.reindex(result["item_id"]).to_numpy()).mean())


@pytest.mark.parametrize("seed", SEEDS)
def test_ds_beats_majority_vote(seed):
    sim = simulate_pool(n_items=600, seed=seed)
    judgments = validate_judgments(sim.judgments)
    regular = judgments[~judgments["is_gold"]]
    mv = _accuracy(aggregate(regular, "majority_vote"), sim.truth)
    ds = _accuracy(aggregate(regular, "dawid_skene"), sim.truth)
    assert ds > mv, (ds, mv)


@pytest.mark.parametrize("seed", SEEDS)
def test_soft_label_reward_model_at_least_as_accurate(seed):
    sim = simulate_pool(n_items=600, seed=seed)
    judgments = validate_judgments(sim.judgments)
    regular = judgments[~judgments["is_gold"]]
    row = {item: i for i, item in enumerate(sim.items["item_id"])}
    diff = sim.features_a - sim.features_b
    rng = np.random.default_rng(1000 + seed)
    test_diff = rng.normal(size=(3000, diff.shape[1])) - rng.normal(size=(3000, diff.shape[1]))
    test_labels = np.where(test_diff @ sim.weights > 0, "A", "B")

    mv = aggregate(regular, "majority_vote")
    ds = aggregate(regular, "dawid_skene")
    hard = mv["label"].map({"A": 1.0, "B": 0.0, "tie": 0.5}).to_numpy()
    acc_majority = bt_accuracy(
        fit_bt_linear(diff[[row[i] for i in mv["item_id"]]], hard), test_diff, test_labels
    )
    soft = ds["p_a"].to_numpy(float)
    acc_soft = bt_accuracy(fit_bt_linear(diff[[row[i] for i in ds["item_id"]]], soft), test_diff, test_labels)
    assert acc_soft >= acc_majority, (acc_soft, acc_majority)


def test_simulation_contract():
    pool = [PoolSpec("expert", 2, 0.9), PoolSpec("spammer", 1), PoolSpec("regular", 3, 0.8)]
    sim = simulate_pool(pool, n_items=50, overlap=3, gold_rate=0.2, tie_rate=0.2, seed=5)
    df = validate_judgments(sim.judgments)
    non_gold = df[~df["is_gold"]]
    assert (non_gold.groupby("item_id")["annotator_id"].nunique() == 3).all()
    gold_share = df.groupby("annotator_id")["is_gold"].mean()
    assert ((gold_share > 0.1) & (gold_share < 0.3)).all()
    assert set(sim.truth.unique()) <= {"A", "B", "tie"} and (sim.truth == "tie").any()
    assert sim.annotators["type"].tolist() == ["expert"] * 2 + ["spammer"] + ["regular"] * 3
    with pytest.raises(ValueError, match="unknown annotator type"):
        PoolSpec("genius", 1)
