"""Read-only views: one response, a user's progress, queue counts, throughput, judgments for the quality library."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignflow.feedback.auth import aware, now
from alignflow.feedback.fields import INT32_MAX
from alignflow.feedback.models import Assignment, Item, JournalEntry, Project, QcAction, Response, User
from alignflow.feedback.services.errors import NotFound
from alignflow.feedback.services.projects import get_project
from alignflow.feedback.services.users import can_manage, can_see, get_user, list_users

JOURNAL_MAX = 1000


def visible_usernames(s: Session, viewer: User | None) -> set[str] | None:
    """Usernames `viewer` may see in reports (`can_see`); None means everyone (admins, the CLI)."""
    if viewer is None or viewer.role == "admin":
        return None
    return {u.username for u in list_users(s, viewer)}


def response_view(s: Session, viewer: User, response_id: int) -> dict[str, Any]:
    """One stored response, if `viewer` may see it: its author, a reviewer holding its QA task, or anyone who
    `can_manage` the author.

    A response the viewer may not read is reported exactly like a missing one (NotFound), so ids cannot be
    probed for existence.
    """
    r = s.get(Response, response_id) if 1 <= response_id <= INT32_MAX else None
    owner = s.get(User, r.user_id) if r is not None else None
    allowed = owner is not None and (r.user_id == viewer.id or can_manage(viewer, owner))
    if owner is not None and not allowed and viewer.role == "reviewer":
        allowed = (
            s.scalar(
                select(func.count())
                .select_from(Assignment)
                .where(
                    Assignment.user_id == viewer.id, Assignment.review_of == r.id, Assignment.kind == "review"
                )
            )
            > 0
        )
    if not allowed:
        raise NotFound(f"no response {response_id} that you may read")
    return {
        "id": r.id,
        "assignment_id": r.assignment_id,
        "user": owner.username,
        "kind": r.kind,
        "label": r.label,
        "dimension_labels": r.dimension_labels,
        "payload": r.payload,
        "guideline_version": r.guideline_version,
        "schema_version": r.schema_version,
        "duration_s": r.duration_s,
        "created_at": aware(r.created_at).isoformat(),
    }


def progress(s: Session, user: User | int | str, project: Project | int | str) -> dict[str, int]:
    u = get_user(s, user)
    p = get_project(s, project)
    done = s.scalar(
        select(func.count())
        .select_from(Response)
        .where(Response.user_id == u.id, Response.project_id == p.id)
    )
    skipped = s.scalar(
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.user_id == u.id, Assignment.project_id == p.id, Assignment.status == "skipped")
    )
    return {"done": int(done), "skipped": int(skipped)}


def queue_state(s: Session, project: Project | int | str) -> dict[str, Any]:
    """Counts for the lead/admin pages: items, slots filled and leased, QA backlog."""
    p = get_project(s, project)
    items = s.execute(
        select(Item.is_gold, func.count(), func.coalesce(func.sum(Item.slots_taken), 0))
        .where(Item.project_id == p.id)
        .group_by(Item.is_gold)
    ).all()
    by_gold = {bool(g): (int(n), int(t)) for g, n, t in items}
    n_items, taken = by_gold.get(False, (0, 0))
    status = dict(
        s.execute(
            select(Assignment.status, func.count())
            .where(Assignment.project_id == p.id, Assignment.kind == "annotate")
            .group_by(Assignment.status)
        ).all()
    )
    qa = dict(
        s.execute(
            select(Response.qa_status, func.count())
            .where(Response.project_id == p.id)
            .group_by(Response.qa_status)
        ).all()
    )
    complete = s.scalar(
        select(func.count())
        .select_from(Item)
        .where(
            Item.project_id == p.id,
            ~Item.is_gold,
            select(func.count())
            .select_from(Response)
            .where(Response.item_id == Item.id, Response.kind == "annotate")
            .scalar_subquery()
            >= p.overlap,
        )
    )
    return {
        "project": p.name,
        "items": n_items,
        "gold_items": by_gold.get(True, (0, 0))[0],
        "overlap": p.overlap,
        "slots_total": n_items * p.overlap,
        "slots_taken": taken,
        "items_complete": int(complete),
        "leased": int(status.get("leased", 0)),
        "submitted": int(status.get("submitted", 0)),
        "skipped": int(status.get("skipped", 0)),
        "expired": int(status.get("expired", 0)),
        "qa_pending": int(qa.get("pending", 0)) + int(qa.get("leased", 0)),
        "qa_done": int(qa.get("done", 0)),
    }


def throughput(
    s: Session, project: Project | int | str, window_hours: float = 1.0, viewer: User | None = None
) -> list[dict[str, Any]]:
    """Per-annotator counts: responses in total and in the last `window_hours`, median seconds per task, skips.

    Only annotators `viewer` may see (`can_see`; everyone when `viewer` is None).
    """
    p = get_project(s, project)
    visible = visible_usernames(s, viewer)
    since = now() - timedelta(hours=window_hours)
    rows = s.execute(
        select(User.username, User.pod, User.qc_state, Response.duration_s, Response.created_at)
        .join(Response, Response.user_id == User.id)
        .where(Response.project_id == p.id, Response.kind == "annotate")
    ).all()
    skips = dict(
        s.execute(
            select(User.username, func.count())
            .join(Assignment, Assignment.user_id == User.id)
            .where(Assignment.project_id == p.id, Assignment.status == "skipped")
            .group_by(User.username)
        ).all()
    )
    out: dict[str, dict[str, Any]] = {}
    durations: dict[str, list[float]] = {}
    for name, pod, qc, dur, created in rows:
        if visible is not None and name not in visible:
            continue
        row = out.setdefault(name, {"annotator": name, "pod": pod, "qc_state": qc, "total": 0, "recent": 0})
        row["total"] += 1
        row["recent"] += int(aware(created) >= since)
        if dur is not None:
            durations.setdefault(name, []).append(float(dur))
    for name, row in out.items():
        d = sorted(durations.get(name, []))
        row["median_s"] = d[len(d) // 2] if d else None
        row["skips"] = int(skips.get(name, 0))
    return sorted(out.values(), key=lambda r: r["annotator"])


def load_judgments(s: Session, project: Project | int | str) -> pd.DataFrame:
    """Every annotation of `project` in the quality library's judgment format (see `alignflow.quality.schema`).

    One row per response and dimension ("overall" plus each schema dimension). Columns: item_id, annotator_id,
    label ("A"/"B"/"tie" in the item's canonical order, or a ranking of candidate ids), dimension,
    shown_swapped, is_gold, gold_label, duration_s, created_at, pod, reviewer_label; plus guideline_version,
    schema_version, response_id.
    """
    p = get_project(s, project)
    resp = s.execute(
        select(Response, Item.external_id, Item.is_gold, Item.gold_label, User.username, User.pod)
        .join(Item, Item.id == Response.item_id)
        .join(User, User.id == Response.user_id)
        .where(Response.project_id == p.id, Response.kind == "annotate")
        .order_by(Response.id)
    ).all()
    reviews = {
        r.review_of: r
        for r in s.scalars(
            select(Response)
            .where(Response.project_id == p.id, Response.kind == "review")
            .order_by(Response.id)
        )
    }
    rows = []
    for r, ext_id, is_gold, gold_label, username, pod in resp:
        rv = reviews.get(r.id)
        base = {
            "item_id": ext_id,
            "annotator_id": username,
            "shown_swapped": bool(r.shown_swapped),
            "duration_s": r.duration_s,
            "created_at": pd.Timestamp(aware(r.created_at)),
            "pod": pod,
            "guideline_version": r.guideline_version,
            "schema_version": r.schema_version,
            "response_id": r.id,
        }
        rows.append(
            {
                **base,
                "label": r.label,
                "dimension": "overall",
                "is_gold": bool(is_gold),
                "gold_label": gold_label if is_gold else None,
                "reviewer_label": rv.label if rv else None,
            }
        )
        for dim, lab in (r.dimension_labels or {}).items():
            rows.append(
                {
                    **base,
                    "label": lab,
                    "dimension": dim,
                    "is_gold": False,
                    "gold_label": None,
                    "reviewer_label": (rv.dimension_labels or {}).get(dim) if rv else None,
                }
            )
    columns = [
        "item_id",
        "annotator_id",
        "label",
        "dimension",
        "shown_swapped",
        "is_gold",
        "gold_label",
        "duration_s",
        "created_at",
        "pod",
        "reviewer_label",
        "guideline_version",
        "schema_version",
        "response_id",
    ]
    return pd.DataFrame(rows, columns=columns)


def qc_actions(s: Session, viewer: User | None, limit: int = 100) -> list[tuple[QcAction, str]]:
    """The latest QC actions on users `viewer` may see, newest first, with the target's username."""
    rows = s.execute(
        select(QcAction, User).join(User, User.id == QcAction.user_id).order_by(QcAction.id.desc())
    )
    out = []
    for action, user in rows:
        if can_see(viewer, user):
            out.append((action, user.username))
            if len(out) == limit:
                break
    return out


def journal(s: Session, limit: int = 100, action: str | None = None) -> list[dict[str, Any]]:
    """The newest `limit` journal entries (at most `JOURNAL_MAX`), optionally of one action, as JSON rows."""
    q = select(JournalEntry).order_by(JournalEntry.id.desc()).limit(max(0, min(limit, JOURNAL_MAX)))
    if action:
        q = q.where(JournalEntry.action == action)
    return [
        {
            "id": j.id,
            "at": aware(j.at).isoformat(),
            "actor_id": j.actor_id,
            "action": j.action,
            "entity": j.entity,
            "entity_id": j.entity_id,
            "data": j.data,
        }
        for j in s.scalars(q)
    ]
