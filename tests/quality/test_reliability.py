"""Annotator reliability against gold and consensus; QC detection precision/recall."""

from __future__ import annotations

import pandas as pd
import pytest

from alignflow.quality.aggregate import aggregate
from alignflow.quality.reliability import annotator_reliability, detection_precision_recall
from alignflow.quality.schema import validate_judgments
from alignflow.quality.simulate import simulate_pool


def _j(ann: str, item: str, label: str, gold: str | None = None, dimension: str = "overall") -> dict:
    return {
        "annotator_id": ann,
        "item_id": item,
        "label": label,
        "dimension": dimension,
        "is_gold": gold is not None,
        "gold_label": gold,
        "created_at": pd.Timestamp("2024-01-01"),
    }


def test_hand_counted_gold_accuracy_and_consensus_agreement():
    judgments = pd.DataFrame(
        [
            # ann1: gold 2 of 2 right; agrees with consensus on i1, i2, not on i3 -> 2/3
            _j("ann1", "g1", "A", gold="A"),
            _j("ann1", "g2", "B", gold="B"),
            _j("ann1", "i1", "A"),
            _j("ann1", "i2", "tie"),
            _j("ann1", "i3", "A"),
            _j("ann1", "i1", "B", dimension="accuracy"),  # another dimension: not counted
            # ann2: gold 1 of 2 right; i4 has no consensus (not compared) -> agrees on 1 of 1
            _j("ann2", "g1", "B", gold="A"),
            _j("ann2", "g2", "B", gold="B"),
            _j("ann2", "i1", "A"),
            _j("ann2", "i4", "B"),
            # ann3: no gold, nothing comparable
            _j("ann3", "i4", "A"),
        ]
    )
    consensus = {"i1": "A", "i2": "tie", "i3": "B"}
    out = annotator_reliability(judgments, consensus).set_index("annotator_id")
    assert out.loc["ann1", "gold_accuracy"] == 1.0 and out.loc["ann1", "n_gold"] == 2
    assert out.loc["ann1", "consensus_agreement"] == pytest.approx(2 / 3)
    assert out.loc["ann1", "n_compared"] == 3
    assert out.loc["ann2", "gold_accuracy"] == 0.5
    assert out.loc["ann2", "consensus_agreement"] == 1.0 and out.loc["ann2", "n_compared"] == 1
    assert out.loc["ann3", "gold_accuracy"] is None and out.loc["ann3", "consensus_agreement"] is None
    assert out.loc["ann3", "n_compared"] == 0
    lo, hi = out.loc["ann2", "gold_ci_low"], out.loc["ann2", "gold_ci_high"]
    assert lo < 0.5 < hi


def test_missing_dimension_is_an_error():
    with pytest.raises(ValueError, match="dimension 'empathy'"):
        annotator_reliability(pd.DataFrame([_j("a", "i", "A")]), {}, dimension="empathy")


def test_simulated_pool_experts_rank_above_spammers():
    sim = simulate_pool(n_items=400, seed=0)
    judgments = validate_judgments(sim.judgments)
    consensus = aggregate(judgments[~judgments["is_gold"]], "dawid_skene").set_index("item_id")["label"]
    out = annotator_reliability(judgments, consensus.to_dict()).merge(sim.annotators, on="annotator_id")
    by_type = out.groupby("type")[["consensus_agreement", "gold_accuracy"]].mean()
    assert by_type.loc["expert", "consensus_agreement"] > by_type.loc["spammer", "consensus_agreement"] + 0.2
    assert by_type.loc["expert", "gold_accuracy"] > by_type.loc["spammer", "gold_accuracy"] + 0.2


def test_detection_precision_recall():
    assert detection_precision_recall({"s1", "e1"}, {"s1", "s2", "p1"}) == (0.5, pytest.approx(1 / 3))
    assert detection_precision_recall(set(), {"s1"}) == (1.0, 0.0)
    assert detection_precision_recall({"s1"}, set()) == (0.0, 1.0)
