"""Annotator reliability against references: gold answers and a consensus label, and how well a QC pass
finds the annotators known to be unreliable (in a simulation, or after an audit).

`annotator_reliability` gives two estimates per annotator on one dimension:
    gold_accuracy          share of the annotator's gold judgments equal to the gold label
                           (with a Wilson interval, from `annotators.gold_accuracy`);
    consensus_agreement    share of the annotator's regular (non-gold) judgments equal to the consensus label
                           of the item, e.g. the aggregated label an export wrote. The consensus includes the
                           annotator's own vote, so with few votes per item it flatters everyone a little; use
                           `annotators.loo_agreement` for the leave-one-out figure.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import pandas as pd

from alignflow.quality.agreement import _key
from alignflow.quality.annotators import gold_accuracy
from alignflow.quality.schema import nan_to_none


def annotator_reliability(
    judgments: pd.DataFrame, consensus: Mapping[str, Any], dimension: str = "overall"
) -> pd.DataFrame:
    """Gold accuracy and agreement with `consensus` (item_id -> label) per annotator, on `dimension`.

    `judgments` has the judgments columns of `alignflow.quality.schema` (item_id, annotator_id, label,
    dimension, is_gold, gold_label, created_at). Items missing from `consensus` are not compared.
    Columns: annotator_id, n_gold, gold_accuracy, gold_ci_low, gold_ci_high, n_compared,
    consensus_agreement; a figure without data is None.
    """
    part = judgments[judgments["dimension"] == dimension]
    if part.empty:
        raise ValueError(f"annotator_reliability: no judgments on dimension {dimension!r}")
    gold = gold_accuracy(part)[["annotator_id", "n_gold", "gold_accuracy", "gold_ci_low", "gold_ci_high"]]
    wanted = {item: _key(label) for item, label in consensus.items()}
    rows = []
    for ann, mine in part[~part["is_gold"].astype(bool)].groupby("annotator_id", sort=True):
        agree = [
            wanted[i] == _key(lab)
            for i, lab in zip(mine["item_id"], mine["label"], strict=True)
            if i in wanted
        ]
        rows.append(
            {
                "annotator_id": ann,
                "n_compared": len(agree),
                "consensus_agreement": sum(agree) / len(agree) if agree else None,
            }
        )
    agreement = pd.DataFrame(rows, columns=["annotator_id", "n_compared", "consensus_agreement"])
    out = gold.merge(agreement, on="annotator_id", how="left")
    out["n_compared"] = out["n_compared"].fillna(0).astype(int)
    return nan_to_none(out)


def detection_precision_recall(flagged: Collection[str], unreliable: Collection[str]) -> tuple[float, float]:
    """How well a QC pass found the unreliable annotators: (precision, recall) of `flagged` against
    `unreliable`. Flagging nobody has precision 1; with nobody unreliable, recall is 1."""
    flagged, unreliable = set(flagged), set(unreliable)
    hits = len(flagged & unreliable)
    precision = hits / len(flagged) if flagged else 1.0
    recall = hits / len(unreliable) if unreliable else 1.0
    return precision, recall
