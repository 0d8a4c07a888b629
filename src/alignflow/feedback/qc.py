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
from alignflow.feedback.models import Assignment, JournalEntry, User

MIN_HUMAN_VOTES = 2
CONSENSUS_NOTE = (
    "human consensus: the unique most frequent label among at least 2 human judgments of a non-gold item "
    "(a majority 'tie' counts as the label 'tie'); items with a split vote or fewer votes are excluded. "
    "Accuracy counts a judge's tie as one half; kappa treats 'tie' as a category"
)


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
    annotators) and every AI judge's; the project-wide figures are aggregates over everyone and name no one.
    `judges`: one row per AI judge account (`judge_agreement`): kappa and accuracy against the human
    consensus (`CONSENSUS_NOTE`), order-consistency and drops.
    """
    from alignflow.quality import aggregate, agreement, annotators

    df = validated_overall(s, project)
    if df.empty:
        return {
            "n_judgments": 0,
            "annotators": [],
            "agreement": {},
            "aggregated_items": 0,
            "judges": [],
            "judges_note": CONSENSUS_NOTE,
        }
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
    ai = _ai_accounts(s, project)
    # AI judges are platform accounts, not people in a pod: everyone who may read the report sees them.
    rows = [
        {**{k: _clean(v) for k, v in row.items()}, "kind": "ai" if row["annotator_id"] in ai else "human"}
        for row in table[keep].to_dict(orient="records")
        if visible is None or row["annotator_id"] in visible or row["annotator_id"] in ai
    ]
    judges = judge_agreement(df, ai, _verdicts(s, project, ai))
    return {
        "n_judgments": len(df),
        "annotators": rows,
        "agreement": {k: _clean(v) for k, v in summary.items()},
        "aggregated_items": len(agg),
        "judges": judges,
        "judges_note": CONSENSUS_NOTE,
    }


def _ai_accounts(s: Session, project: Any) -> dict[str, User]:
    """The AI judges that took tasks in `project` (also those that only dropped or gave tasks back)."""
    p = services.get_project(s, project)
    took = select(Assignment.user_id).where(Assignment.project_id == p.id)
    users = s.scalars(select(User).where(User.kind == "ai", User.id.in_(took)).order_by(User.username))
    return {u.username: u for u in users}


def _verdicts(s: Session, project: Any, ai: dict[str, User]) -> dict[str, list[dict[str, Any]]]:
    """Each ai account's journaled both-order outcomes in `project`, one per assignment (the latest)."""
    if not ai:
        return {}
    p = services.get_project(s, project)
    by_id = {u.id: name for name, u in ai.items()}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    rows = s.execute(
        select(JournalEntry.actor_id, JournalEntry.entity_id, JournalEntry.data)
        .where(JournalEntry.action == "judge.verdict", JournalEntry.actor_id.in_(sorted(by_id)))
        .order_by(JournalEntry.id)
    )
    for actor_id, assignment_id, data in rows:
        if data.get("project_id") == p.id:
            latest[(by_id[actor_id], assignment_id)] = data
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in ai}
    for (name, _), data in latest.items():
        out[name].append(data)
    return out


def human_consensus(
    judgments: pd.DataFrame, humans: set[str], min_votes: int = MIN_HUMAN_VOTES
) -> dict[Any, Any]:
    """item_id -> the humans' consensus label on non-gold items (see `CONSENSUS_NOTE`)."""
    from collections import Counter

    from alignflow.quality.agreement import _key

    part = judgments[judgments["annotator_id"].isin(humans) & ~judgments["is_gold"]]
    out = {}
    for item, labels in part.groupby("item_id")["label"]:
        counts = Counter(_key(v) for v in labels)
        if sum(counts.values()) < min_votes:
            continue
        (top, n), *rest = counts.most_common()
        if not rest or rest[0][1] < n:
            out[item] = top
    return out


def judge_agreement(
    judgments: pd.DataFrame, ai: dict[str, User], verdicts: dict[str, list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """Per ai annotator: agreement with the human consensus (`CONSENSUS_NOTE`) on the non-gold items both
    labeled, by `alignflow.quality.judges.judge_human_agreement` (accuracy with the judge's ties counting one
    half and a Wilson 95% CI; Cohen's kappa with ties a category of their own and a bootstrap 95% CI over
    items), and the order-consistency of its journaled both-order verdicts (drops included: they have no
    response, so they are read from the journal).

    Columns: judge, spec, n_items, kappa, kappa_ci_low, kappa_ci_high, accuracy, accuracy_ci_low,
    accuracy_ci_high, tie_rate, n_both_orders, order_consistency, n_inconsistent, n_inconsistent_ties,
    n_dropped.
    """
    from alignflow.quality.agreement import _key
    from alignflow.quality.judges import judge_human_agreement

    humans = set(judgments["annotator_id"]) - set(ai)
    consensus = human_consensus(judgments, humans)
    rows = []
    for name in sorted(ai):
        mine = judgments[(judgments["annotator_id"] == name) & ~judgments["is_gold"]]
        pairs = [
            (_key(lab), consensus[it])
            for it, lab in zip(mine["item_id"], mine["label"], strict=True)
            if it in consensus
        ]
        fig = judge_human_agreement([p[0] for p in pairs], [p[1] for p in pairs])
        both = [v for v in verdicts.get(name, []) if v.get("consistent") is not None]
        inconsistent = [v for v in both if v["consistent"] is False]
        rows.append(
            {
                "judge": name,
                "spec": ai[name].judge_spec,
                "n_items": fig["n"],
                "kappa": fig["kappa"],
                "kappa_ci_low": fig["kappa_ci"][0],
                "kappa_ci_high": fig["kappa_ci"][1],
                "accuracy": fig["accuracy"],
                "accuracy_ci_low": fig["accuracy_ci"][0],
                "accuracy_ci_high": fig["accuracy_ci"][1],
                "tie_rate": fig["tie_rate"],
                "n_both_orders": len(both),
                "order_consistency": (len(both) - len(inconsistent)) / len(both) if both else None,
                "n_inconsistent": len(inconsistent),
                "n_inconsistent_ties": sum(1 for v in inconsistent if not v.get("dropped")),
                "n_dropped": sum(1 for v in inconsistent if v.get("dropped")),
            }
        )
    return rows


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
            if user.kind == "ai" and act.rule == "speed":
                continue  # the speed rule asks whether a person read the responses; a judge is fast by design
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
