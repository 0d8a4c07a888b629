"""Aggregations equal crowd-kit called directly; ties and soft labels behave as documented."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from crowdkit.aggregation import GLAD, MACE, BradleyTerry, DawidSkene, MajorityVote, NoisyBradleyTerry

from alignflow.quality.aggregate import aggregate, fit, to_classification_frame, to_pairwise_frame
from alignflow.quality.schema import validate_judgments
from alignflow.quality.simulate import PoolSpec, simulate_pool


@pytest.fixture(scope="module")
def small():
    pool = [PoolSpec("expert", 2, 0.95), PoolSpec("regular", 4, 0.8), PoolSpec("spammer", 1)]
    sim = simulate_pool(pool, n_items=60, n_gold_items=10, tie_rate=0.15, seed=3)
    return validate_judgments(sim.judgments)


@pytest.mark.parametrize(
    "method,model",
    [
        ("majority_vote", MajorityVote()),
        ("dawid_skene", DawidSkene(n_iter=100, tol=1e-5)),
        ("glad", GLAD(n_iter=100, tol=1e-5)),
        ("mace", MACE(n_restarts=5, n_iter=50, random_state=0)),
    ],
)
def test_classification_parity(small, method, model):
    ours = aggregate(small, method).set_index("item_id")
    frame = to_classification_frame(small)
    ref_labels = model.fit_predict(frame)
    probas = model.probas_.fillna(0.0)
    assert (ours["label"] == ref_labels.reindex(ours.index)).all()
    p_a = probas.get("A", 0.0) + 0.5 * probas.get("tie", 0.0)
    np.testing.assert_allclose(
        ours["p_a"].to_numpy(float), p_a.reindex(ours.index).to_numpy(float), atol=1e-12
    )
    np.testing.assert_allclose(ours["margin"], np.abs(2 * ours["p_a"].astype(float) - 1))


def test_mace_with_one_restart_is_crowdkits_fit_with_five(small):
    # crowd-kit draws every restart's start from the same random_state: our one restart is its five.
    _, ours = fit(small, "mace")
    ref = MACE(n_restarts=5, n_iter=50, random_state=0).fit(to_classification_frame(small))
    assert ours.n_restarts == 1
    np.testing.assert_array_equal(ours.spamming_, ref.spamming_)
    np.testing.assert_array_equal(ours.thetas_, ref.thetas_)


@pytest.mark.parametrize("method", ["bradley_terry", "noisy_bt"])
def test_pairwise_parity(small, method):
    ours = aggregate(small, method).set_index("item_id")
    frame = to_pairwise_frame(small)
    if method == "bradley_terry":
        scores = BradleyTerry(n_iter=100, tol=1e-5).fit_predict(frame)
        p_a = scores[ours.index + "::A"].to_numpy() / (
            scores[ours.index + "::A"].to_numpy() + scores[ours.index + "::B"].to_numpy()
        )
    else:
        scores = NoisyBradleyTerry(n_iter=100, tol=1e-5, random_state=0).fit_predict(frame)
        logit = np.log(scores) - np.log1p(-scores)
        p_a = 1 / (1 + np.exp(-(logit[ours.index + "::A"].to_numpy() - logit[ours.index + "::B"].to_numpy())))
    np.testing.assert_allclose(ours["p_a"].to_numpy(float), p_a, atol=1e-12)


def test_ties_are_half_wins():
    df = validate_judgments(
        pd.DataFrame(
            {
                "item_id": ["i"] * 4,
                "annotator_id": list("abcd"),
                "label": ["A", "tie", "tie", "B"],
                "shown_swapped": [False, True, False, True],
            }
        )
    )
    frame = to_pairwise_frame(df)
    # decisive votes appear twice, a tie once for each side: A gets 2 + 1 + 1 wins, B gets 1 + 1 + 2.
    assert (frame["label"] == "i::A").sum() == 4 and (frame["label"] == "i::B").sum() == 4
    bt = aggregate(df, "bradley_terry")
    assert bt["p_a"].iat[0] == pytest.approx(0.5) and bt["label"].iat[0] == "tie"
    mv = aggregate(df, "majority_vote")
    # MV probabilities: A 1/4, tie 2/4, B 1/4 -> p_a = 0.25 + 0.5 * 0.5 = 0.5; the label is the tie class.
    assert mv["p_a"].iat[0] == pytest.approx(0.5) and mv["label"].iat[0] == "tie"
    assert list(mv.columns) == ["item_id", "dimension", "label", "p_a", "margin", "n_votes", "method"]
    assert mv["n_votes"].iat[0] == 4


def test_bt_chunking_matches_unchunked(small, monkeypatch):
    import alignflow.quality.aggregate as agg_mod

    full = aggregate(small, "bradley_terry")
    monkeypatch.setattr(agg_mod, "BT_CHUNK_ITEMS", 7)
    chunked = aggregate(small, "bradley_terry")
    np.testing.assert_allclose(full["p_a"].to_numpy(float), chunked["p_a"].to_numpy(float), atol=1e-9)


def test_mixed_dimensions_rejected(small):
    df = small.copy()
    df.loc[df.index[0], "dimension"] = "accuracy"
    with pytest.raises(ValueError, match="mix dimensions"):
        aggregate(df)
