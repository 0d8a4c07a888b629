"""Readers that turn the real human-feedback extracts in `shared/data` into judgments tables.

PandaLM test set (WeOpenML/PandaLM, Apache-2.0): 999 items, annotator1..3 with 0 = tie, 1 = response1 better,
2 = response2 better; response1 is canonical "A".
DICES-350 (Aroyo et al. 2023, CC-BY-4.0): 350 conversations x 123 raters answering "is the response safe?"
with Yes/No/Unsure; a rater's identity is their position in `individual_human_scores`. Labels become
ratings No = 0, Unsure = 1, Yes = 2 so that they fit the judgments contract; aggregation treats them as classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from alignflow.quality.schema import JudgmentError, validate_judgments

PANDALM_LABELS = {0: "tie", 1: "A", 2: "B"}
DICES_CODES = {"No": 0, "Unsure": 1, "Yes": 2}


def load_pandalm(path: str | Path) -> pd.DataFrame:
    """PandaLM `testset-v1.json` as a validated pairwise judgments table (3 judgments per item)."""
    path = Path(path)
    records = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for n, rec in enumerate(records):
        for a in ("annotator1", "annotator2", "annotator3"):
            if rec.get(a) not in PANDALM_LABELS:
                raise JudgmentError(
                    f"{path}: record {n}, field {a!r}: expected 0, 1 or 2, got {rec.get(a)!r}"
                )
            rows.append(
                {
                    "item_id": str(rec["idx"]),
                    "annotator_id": a,
                    "label": PANDALM_LABELS[rec[a]],
                    "kind": "pairwise",
                    "dimension": "overall",
                }
            )
    return validate_judgments(pd.DataFrame(rows), source=str(path))


def load_dices(path: str | Path) -> pd.DataFrame:
    """DICES-350 crowdsourced safety ratings as a validated rating table (123 raters x 350 items)."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for n, inst in enumerate(data["instances"]):
        scores = inst["annotations"]["safety"]["individual_human_scores"]
        for pos, label in enumerate(scores):
            if label not in DICES_CODES:
                raise JudgmentError(f"{path}: instance {n}, rater {pos}: unknown label {label!r}")
            rows.append(
                {
                    "item_id": str(inst["id"]),
                    "annotator_id": f"rater{pos:03d}",
                    "label": DICES_CODES[label],
                    "kind": "rating",
                    "dimension": "safety",
                }
            )
    return validate_judgments(pd.DataFrame(rows), source=str(path))


def load_dices_expert(path: str | Path) -> pd.Series:
    """DICES-350 expert labels: Series item_id -> code (No = 0, Yes = 2)."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    out = {}
    for n, inst in enumerate(data["instances"]):
        scores = inst["annotations"]["safety"]["individual_human_scores"]
        if len(scores) != 1 or scores[0] not in DICES_CODES:
            raise JudgmentError(f"{path}: instance {n}: expected one expert label, got {scores!r}")
        out[str(inst["id"])] = DICES_CODES[scores[0]]
    return pd.Series(out, name="expert")


def pandalm_tables(path: str | Path) -> dict[str, pd.DataFrame]:
    """Agreement on PandaLM: a one-row summary (percent agreement, Fleiss' kappa, nominal alpha) and Cohen's
    kappa for each annotator pair."""
    from alignflow.quality import agreement as agr

    judgments = load_pandalm(path)
    matrix = agr.reliability_matrix(judgments)
    data = matrix.to_numpy(dtype=object)
    table, _ = agr.fleiss_table(data)
    summary = {
        "n_items": matrix.shape[1],
        "n_annotators": matrix.shape[0],
        "percent_agreement": agr.percent_agreement(data),
        "fleiss_kappa": agr.fleiss_kappa(table),
        "alpha_nominal": agr.krippendorff_alpha(data, "nominal"),
        "share_ties": float((judgments["label"] == "tie").mean()),
    }
    return {
        "summary": pd.DataFrame([summary]),
        "kappa_pairs": agr.cohen_kappa_matrix(matrix),
        "matrix": matrix,
    }


def dices_tables(crowd_path: str | Path, expert_path: str | Path) -> dict[str, object]:
    """DICES-350: agreement summary, majority vote vs Dawid-Skene against the expert labels, and raters ranked
    by Dawid-Skene skill next to their own agreement with the experts."""
    from scipy import stats

    from alignflow.quality import agreement as agr
    from alignflow.quality.aggregate import aggregate
    from alignflow.quality.annotators import skill_estimates

    judgments = load_dices(crowd_path)
    expert = load_dices_expert(expert_path)
    matrix = agr.reliability_matrix(judgments)
    data = matrix.to_numpy(dtype=object)
    table, _ = agr.fleiss_table(data)
    summary = pd.DataFrame(
        [
            {
                "n_items": matrix.shape[1],
                "n_raters": matrix.shape[0],
                "percent_agreement": agr.percent_agreement(data),
                "fleiss_kappa": agr.fleiss_kappa(table),
                "alpha_nominal": agr.krippendorff_alpha(data, "nominal"),
                "alpha_ordinal": agr.krippendorff_alpha(data, "ordinal"),
                "share_unsure": float((judgments["label"] == DICES_CODES["Unsure"]).mean()),
            }
        ]
    )
    rows = []
    consensus = {}
    for method in ("majority_vote", "dawid_skene"):
        res = aggregate(judgments, method).set_index("item_id")["label"].astype(int)
        consensus[method] = res
        common = expert.index.intersection(res.index)
        rows.append(
            {
                "method": method,
                "n_items": len(common),
                "accuracy_vs_expert": float((res[common] == expert[common]).mean()),
                "share_unsafe": float((res[common] == DICES_CODES["No"]).mean()),
            }
        )
    rows.append(
        {
            "method": "expert",
            "n_items": len(expert),
            "accuracy_vs_expert": 1.0,
            "share_unsafe": float((expert == DICES_CODES["No"]).mean()),
        }
    )
    skills = skill_estimates(judgments, ("dawid_skene",)).set_index("annotator_id")
    with_expert = judgments.join(expert, on="item_id")
    rater_acc = (with_expert["label"] == with_expert["expert"]).groupby(with_expert["annotator_id"]).mean()
    raters = (
        skills.assign(agreement_with_expert=rater_acc).sort_values("ds_skill", ascending=False).reset_index()
    )
    rho = float(stats.spearmanr(raters["ds_skill"], raters["agreement_with_expert"]).statistic)
    return {
        "summary": summary,
        "vs_expert": pd.DataFrame(rows),
        "raters": raters,
        "skill_vs_expert_spearman": rho,
        "matrix": matrix,
        "consensus": consensus,
        "expert": expert,
    }
