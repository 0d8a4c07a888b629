"""Real human feedback (../shared/data): parity with reference implementations and sane ranges."""

from __future__ import annotations

from pathlib import Path

import krippendorff
import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa as sm_fleiss

from alignflow.quality import agreement as agr
from alignflow.quality.datasets import dices_tables, pandalm_tables

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")


def _codes(matrix):
    """Reliability matrix -> float codes with NaN for missing, as krippendorff expects."""
    values = sorted({v for v in matrix.to_numpy().ravel() if v is not None}, key=str)
    index = {v: i for i, v in enumerate(values)}
    return np.array([[np.nan if v is None else index[v] for v in row] for row in matrix.to_numpy()], float)


def test_pandalm_kappas():
    t = pandalm_tables(DATA / "pandalm" / "testset-v1.json")
    matrix = t["matrix"]
    assert matrix.shape == (3, 999)
    for row in t["kappa_pairs"].itertuples():
        ref = cohen_kappa_score(matrix.loc[row.rater_a].tolist(), matrix.loc[row.rater_b].tolist())
        assert row.kappa == pytest.approx(ref, abs=1e-9)
        assert 0.6 < row.kappa < 1.0
    table, _ = agr.fleiss_table(matrix.to_numpy(dtype=object))
    fleiss = t["summary"]["fleiss_kappa"].iat[0]
    assert fleiss == pytest.approx(sm_fleiss(table, method="fleiss"), abs=1e-9)
    # The authors filtered high-disagreement items and report about 0.86.
    assert 0.8 < fleiss < 0.92
    alpha = t["summary"]["alpha_nominal"].iat[0]
    assert alpha == pytest.approx(
        krippendorff.alpha(reliability_data=_codes(matrix), level_of_measurement="nominal"), abs=1e-9
    )


def test_dices_alpha_and_consensus_vs_expert():
    t = dices_tables(DATA / "dices" / "dices_350_crowdsourced.json", DATA / "dices" / "dices_350_expert.json")
    matrix = t["matrix"]
    assert matrix.shape == (123, 350)
    summary = t["summary"].iloc[0]
    codes = matrix.to_numpy(dtype=float)  # labels are already numeric codes No=0 < Unsure=1 < Yes=2
    for level in ("nominal", "ordinal"):
        ref = krippendorff.alpha(reliability_data=codes, level_of_measurement=level)
        assert summary[f"alpha_{level}"] == pytest.approx(ref, abs=1e-9)
    table, _ = agr.fleiss_table(matrix.to_numpy(dtype=object))
    assert summary["fleiss_kappa"] == pytest.approx(sm_fleiss(table, method="fleiss"), abs=1e-9)
    assert 0.05 < summary["alpha_nominal"] < 0.35  # README: low agreement, Fleiss about 0.16
    vs = t["vs_expert"].set_index("method")
    for method in ("majority_vote", "dawid_skene"):
        assert vs.loc[method, "n_items"] == 350
        assert (
            0.5 < vs.loc[method, "accuracy_vs_expert"] <= 1.0
        )  # better than chance on a balanced expert set
    raters = t["raters"]
    assert len(raters) == 123 and raters["ds_skill"].is_monotonic_decreasing
    # DS skill, estimated without the experts, should rank raters in the same direction as expert agreement.
    assert t["skill_vs_expert_spearman"] > 0.2
