"""Agreement coefficients: hand-derived values, parity with krippendorff / statsmodels / scikit-learn, undefined cases."""

from __future__ import annotations

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

from alignflow.quality import agreement as agr
from alignflow.quality.schema import Undefined


def test_cohen_kappa_hand_derived():
    # 10 units, confusion [[4, 1], [2, 3]]: p_o = 0.7, p_e = (5*6 + 5*4) / 100 = 0.5, kappa = 0.2 / 0.5 = 0.4.
    a = ["A"] * 5 + ["B"] * 5
    b = ["A"] * 4 + ["B"] + ["A"] * 2 + ["B"] * 3
    assert agr.cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


def test_fleiss_hand_derived():
    # 2 units x 2 raters: unit 1 both "A" (P_1 = 1), unit 2 split (P_2 = 0); p = (3/4, 1/4), P_e = 10/16.
    table = np.array([[2, 0], [1, 1]])
    expected = (0.5 - 10 / 16) / (1 - 10 / 16)
    assert agr.fleiss_kappa(table) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_parity_sklearn(seed, weights):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, size=200)
    b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 4, size=200))
    ours = agr.cohen_kappa(a.tolist(), b.tolist(), weights=weights)
    assert ours == pytest.approx(cohen_kappa_score(a, b, weights=weights), abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_fleiss_parity_statsmodels(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, size=150)
    data = np.array([np.where(rng.random(150) < 0.5, truth, rng.integers(0, 3, size=150)) for _ in range(5)])
    table, _ = agr.fleiss_table(data.tolist())
    assert agr.fleiss_kappa(table) == pytest.approx(sm_fleiss(table, method="fleiss"), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("level", ["nominal", "ordinal", "interval"])
def test_alpha_parity_krippendorff_with_missing(seed, level):
    rng = np.random.default_rng(seed)
    truth = rng.integers(1, 6, size=80)
    data = np.array(
        [np.where(rng.random(80) < 0.6, truth, rng.integers(1, 6, size=80)) for _ in range(6)], float
    )
    data[rng.random(data.shape) < 0.3] = np.nan
    ours = agr.krippendorff_alpha(data.tolist(), level)
    ref = krippendorff.alpha(reliability_data=data, level_of_measurement=level)
    assert ours == pytest.approx(ref, abs=1e-9)


def test_percent_agreement_hand_derived():
    # unit 1: 3 raters all agree (3/3 pairs); unit 2: A, A, B -> 1 of 3 pairs; unit 3: a single value, skipped.
    data = [["A", "A", "x"], ["A", "A", None], ["A", "B", None]]
    assert agr.percent_agreement(data) == pytest.approx((1 + 1 / 3) / 2)


def test_kendall_tau_distance_and_ranking_alpha():
    assert agr.kendall_tau_distance(["a", "b", "c"], ["a", "b", "c"]) == 0.0
    assert agr.kendall_tau_distance(["a", "b", "c"], ["c", "b", "a"]) == 1.0
    assert agr.kendall_tau_distance(["a", "b", "c"], ["b", "a", "c"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="different ids"):
        agr.kendall_tau_distance(["a", "b"], ["a", "c"])
    same = [[["a", "b", "c"], ["c", "b", "a"]], [["a", "b", "c"], ["c", "b", "a"]]]
    assert agr.krippendorff_alpha(same, "ranking") == pytest.approx(1.0)
    # Ranking alpha with a metric equal to the nominal one on 2-item rankings must equal nominal alpha.
    two = [
        [["x", "y"], ["y", "x"], ["x", "y"]],
        [["x", "y"], ["x", "y"], None],
        [["y", "x"], ["y", "x"], ["x", "y"]],
    ]
    nominal = agr.krippendorff_alpha([[tuple(v) if v else None for v in row] for row in two], "nominal")
    assert agr.krippendorff_alpha(two, "ranking") == pytest.approx(nominal, abs=1e-12)


def test_undefined_never_nan():
    assert isinstance(agr.cohen_kappa(["A"] * 5, ["A"] * 5), Undefined)
    assert "chance agreement" in agr.cohen_kappa(["A"] * 5, ["A"] * 5).reason
    assert isinstance(agr.fleiss_kappa(np.array([[3, 0], [3, 0]])), Undefined)
    assert isinstance(agr.krippendorff_alpha([["A", "A"], ["A", "A"]]), Undefined)
    assert isinstance(agr.krippendorff_alpha([["A", "B"]]), Undefined)  # one rater: no pairable unit
    assert isinstance(agr.percent_agreement([["A", "B"]]), Undefined)
    with pytest.raises(ValueError, match="same number of ratings"):
        agr.fleiss_kappa(np.array([[2, 0], [1, 2]]))
