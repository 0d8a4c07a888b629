"""Quality figures and QC actions for a project, computed by `alignflow.quality` on the platform's judgments.

The quality library decides (`evaluate_policy`); this module persists the decisions as QC actions (journaled,
enforced by the assignment engine, reversible by a lead).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignflow.feedback import engine, services
from alignflow.feedback.models import User


def validated_overall(s: Session, project: Any) -> pd.DataFrame:
    """The project's "overall" judgments, validated by `alignflow.quality.schema` (empty frame if none)."""
    from alignflow.quality.schema import validate_judgments

    df = services.load_judgments(s, project)
    df = df[df["dimension"] == "overall"].reset_index(drop=True)
    if df.empty:
        return df
    return validate_judgments(df)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v


def quality_report(s: Session, project: Any, viewer: User | None = None) -> dict[str, Any]:
    """Per-annotator gold accuracy, agreement, position bias and reviewer discrepancy, plus project agreement
    and how many items the consensus (majority vote) decides.

    The per-annotator rows are those `viewer` may see (`services.can_see`: a lead, their own pod's
    annotators); the project-wide figures are aggregates over everyone and name no one.
    """
    from alignflow.quality import aggregate, agreement, annotators

    df = validated_overall(s, project)
    if df.empty:
        return {"n_judgments": 0, "annotators": [], "agreement": {}, "aggregated_items": 0}
    table = annotators.annotator_table(df, skills=False)
    regular = df[~df["is_gold"]]
    summary = agreement.agreement_summary(regular) if not regular.empty else {}
    agg = aggregate.aggregate(regular, "majority_vote") if not regular.empty else pd.DataFrame()
    keep = [
        c
        for c in (
            "annotator_id",
            "pod",
            "n_judgments",
            "n_gold",
            "gold_accuracy",
            "loo_agreement",
            "left_rate",
            "discrepancy_rate",
            "gold_note",
        )
        if c in table.columns
    ]
    visible = services.visible_usernames(s, viewer)
    rows = [
        {k: _clean(v) for k, v in row.items()}
        for row in table[keep].to_dict(orient="records")
        if visible is None or row["annotator_id"] in visible
    ]
    return {
        "n_judgments": len(df),
        "annotators": rows,
        "agreement": {k: _clean(v) for k, v in summary.items()},
        "aggregated_items": len(agg),
    }


def evaluate_and_apply(
    s: Session, project: Any, actor: User | int | str | None, policy: Any = None
) -> list[dict]:
    """Run `alignflow.quality.policy.evaluate_policy` and persist new actions; returns the actions applied.

    An action is skipped when the annotator's current QC state already equals it, so re-running is harmless,
    and when `actor` may not manage the annotator (`services.can_manage`: a lead acts on their own pod only).
    Commits.
    """
    from alignflow.quality.policy import evaluate_policy

    df = validated_overall(s, project)
    if df.empty:
        return []
    actions = evaluate_policy(df, policy)
    engine.begin_write(s)
    try:
        viewer = services.get_user(s, actor) if actor is not None else None
        applied = []
        for act in actions:
            user = s.scalar(select(User).where(User.username == act.annotator_id))
            if user is None or user.qc_state == act.action or not services.can_manage(viewer, user):
                continue
            row = engine.apply_qc_action(
                s, user, act.action, f"{act.rule}: {act.reason}", viewer.id if viewer else None
            )
            applied.append(
                {"id": row.id, "annotator": user.username, "action": act.action, "reason": row.reason}
            )
        s.commit()
        return applied
    except Exception:
        s.rollback()
        raise
