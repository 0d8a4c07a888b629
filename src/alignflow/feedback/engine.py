"""The assignment engine: who gets which item slot next, leases, gold mixing, QA routing, tiers and QC.

Correctness under concurrency rests on three database facts, true on SQLite and PostgreSQL:
1. a slot is taken by `UPDATE fb_items SET slots_taken = slots_taken + 1 WHERE id = :id AND slots_taken <
   :overlap`; only a rowcount of 1 wins, so no item ever exceeds its overlap however many workers race;
2. `UNIQUE (item_id, user_id, kind)` on assignments: an annotator can never hold the same item twice;
3. write transactions serialise: on SQLite `BEGIN IMMEDIATE` takes the write lock up front (a deferred
   transaction that reads and then writes can fail with SQLITE_BUSY instead of waiting); on PostgreSQL the
   candidate rows are read with `FOR UPDATE SKIP LOCKED` so concurrent annotators pick different items
   instead of queueing on the same row.
Every function here runs inside the caller's transaction and never commits.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from datetime import timedelta

from sqlalchemy import and_, exists, select, update
from sqlalchemy.orm import Session

from alignflow.feedback.auth import now
from alignflow.feedback.journal import record
from alignflow.feedback.models import Assignment, Item, Project, QcAction, Response, User

QC_ACTIONS = ("coach", "restrict", "recertify", "suspend")
ANNOTATING_ROLES = ("annotator", "lead", "admin")
LOW_IMPACT_PRIORITY = 0  # restricted annotators only get items at or below this priority (or gold)
RESTRICTED_GOLD_RATE = 0.5
CANDIDATE_BATCH = 16


def begin_write(s: Session) -> None:
    """Start the transaction as a writer. Call first in a transaction that will write."""
    if s.get_bind().dialect.name == "sqlite":
        conn = s.connection()
        # pysqlite opens transactions lazily, before the first write; a SELECT alone leaves none open.
        if not conn.connection.dbapi_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _is_pg(s: Session) -> bool:
    return s.get_bind().dialect.name == "postgresql"


def expire_leases(s: Session, project_id: int | None = None) -> int:
    """Return abandoned slots to the queue; returns how many leases expired.

    Each lease is flipped with a conditional UPDATE (status still 'leased') so two workers expiring at once
    free each slot exactly once.
    """
    q = select(
        Assignment.id, Assignment.item_id, Assignment.kind, Assignment.review_of, Assignment.holds_slot
    ).where(Assignment.status == "leased", Assignment.lease_expires_at < now())
    if project_id is not None:
        q = q.where(Assignment.project_id == project_id)
    n = 0
    for aid, item_id, kind, review_of, holds_slot in s.execute(q.limit(500)).all():
        res = s.execute(
            update(Assignment)
            .where(Assignment.id == aid, Assignment.status == "leased")
            .values(status="expired", holds_slot=False)
        )
        if res.rowcount != 1:
            continue
        n += 1
        if kind == "annotate" and holds_slot:
            s.execute(update(Item).where(Item.id == item_id).values(slots_taken=Item.slots_taken - 1))
        elif kind == "review" and review_of is not None:
            s.execute(
                update(Response)
                .where(Response.id == review_of, Response.qa_status == "leased")
                .values(qa_status="pending")
            )
        record(s, None, "assignment.expire", "assignment", aid, {"item_id": item_id, "kind": kind})
    return n


def active_lease(s: Session, user: User, project: Project) -> Assignment | None:
    return s.scalar(
        select(Assignment)
        .where(
            Assignment.user_id == user.id,
            Assignment.project_id == project.id,
            Assignment.status == "leased",
            Assignment.lease_expires_at >= now(),
        )
        .order_by(Assignment.leased_at)
        .limit(1)
    )


class NoWork(Exception):
    """Nothing to hand out; the message says why (queue empty, suspended, wrong role)."""


def lease(s: Session, user: User, project: Project, rng: random.Random | None = None) -> Assignment:
    """Lease the next task to `user` (or return the lease they already hold in this project).

    Raises:
        NoWork: the user is disabled or suspended, or no eligible slot is left.
    """
    rng = rng or random.Random()
    if user.disabled:
        raise NoWork("this account is disabled")
    if user.qc_state == "suspend":
        raise NoWork("your annotation access is suspended by QC; ask your lead")
    expire_leases(s, project.id)
    current = active_lease(s, user, project)
    if current is not None:
        return current
    if user.role == "reviewer":
        a = _lease_review(s, user, project, rng)
        if a is None:
            raise NoWork("no QA items are waiting for review")
        return a
    if user.role not in ANNOTATING_ROLES:
        raise NoWork(f"role {user.role!r} does not annotate")

    restricted = user.qc_state in ("restrict", "recertify")
    if user.qc_state == "recertify":
        order = [True]  # gold only, until a lead lifts the action
    else:
        gold_rate = RESTRICTED_GOLD_RATE if restricted else project.gold_rate
        order = [True, False] if rng.random() < gold_rate else [False]
    for gold in order:
        a = _lease_item(s, user, project, gold=gold, low_impact_only=restricted, rng=rng)
        if a is not None:
            return a
    raise NoWork("no tasks are left for you in this project")


def _lease_item(
    s: Session, user: User, project: Project, *, gold: bool, low_impact_only: bool, rng: random.Random
) -> Assignment | None:
    seen = exists().where(
        and_(Assignment.item_id == Item.id, Assignment.user_id == user.id, Assignment.kind == "annotate")
    )
    # Only ids: decoding every candidate's JSON here would cost more than the whole rest of the lease.
    q = select(Item.id).where(Item.project_id == project.id, Item.is_gold == gold, ~seen)
    if not gold:
        q = q.where(Item.slots_taken < project.overlap)
    if user.tier != "expert":
        q = q.where(Item.tier == "standard")
    if low_impact_only and not gold:
        q = q.where(Item.priority <= LOW_IMPACT_PRIORITY)
    q = q.order_by(Item.priority.desc(), Item.id).limit(CANDIDATE_BATCH)
    rows = s.execute(q.with_for_update(skip_locked=True, of=Item)).all() if _is_pg(s) else []
    if not rows:
        # SKIP LOCKED hides rows other annotators are leasing right now; without it, the conditional UPDATE
        # below waits for their commit and re-checks `slots_taken` (READ COMMITTED), so the result is exact.
        rows = s.execute(q).all()
    if gold:
        rng.shuffle(rows)  # so gold cannot be spotted by its place in the sequence
    for (item_id,) in rows:
        if not gold:
            won = s.execute(
                update(Item)
                .where(Item.id == item_id, Item.slots_taken < project.overlap)
                .values(slots_taken=Item.slots_taken + 1)
            ).rowcount
            if won != 1:
                continue
        order = list(range(len(s.get(Item, item_id).candidates)))
        rng.shuffle(order)
        a = Assignment(
            id=str(uuid.uuid4()),
            project_id=project.id,
            item_id=item_id,
            user_id=user.id,
            kind="annotate",
            display_order=order,
            guideline_version=project.guideline_version,
            schema_version=project.schema_version,
            holds_slot=not gold,
            lease_expires_at=now() + timedelta(seconds=project.lease_seconds),
        )
        s.add(a)
        s.flush()
        record(s, user.id, "assignment.lease", "assignment", a.id, {"item_id": item_id, "order": order})
        return a
    return None


def _lease_review(s: Session, user: User, project: Project, rng: random.Random) -> Assignment | None:
    reviewed = exists().where(
        and_(
            Assignment.item_id == Response.item_id, Assignment.user_id == user.id, Assignment.kind == "review"
        )
    )
    q = (
        select(Response.id, Response.item_id)
        .where(
            Response.project_id == project.id,
            Response.qa_status == "pending",
            Response.user_id != user.id,
            ~reviewed,
        )
        .order_by(Response.id)
        .limit(CANDIDATE_BATCH)
    )
    rows = s.execute(q.with_for_update(skip_locked=True, of=Response)).all() if _is_pg(s) else []
    for rid, item_id in rows or s.execute(q).all():
        won = s.execute(
            update(Response)
            .where(Response.id == rid, Response.qa_status == "pending")
            .values(qa_status="leased")
        ).rowcount
        if won != 1:
            continue
        original = s.get(Assignment, s.scalar(select(Response.assignment_id).where(Response.id == rid)))
        a = Assignment(
            id=str(uuid.uuid4()),
            project_id=project.id,
            item_id=item_id,
            user_id=user.id,
            kind="review",
            review_of=rid,
            # The reviewer sees the original annotator's display order, so their answers line up.
            display_order=list(original.display_order),
            guideline_version=project.guideline_version,
            schema_version=original.schema_version,
            holds_slot=False,
            lease_expires_at=now() + timedelta(seconds=project.lease_seconds),
        )
        s.add(a)
        s.flush()
        record(s, user.id, "assignment.lease", "assignment", a.id, {"item_id": item_id, "review_of": rid})
        return a
    return None


def retake_expired(s: Session, a: Assignment, project: Project) -> bool:
    """Whether a late submission on an expired lease may still be stored.

    Annotations: never. The expired slot went back to the queue, and accepting a late answer only while the
    slot is still free would treat gold items (which hold no slot) differently from normal ones, so an
    annotator could tell gold apart by letting a lease lapse. Reviews: yes, if nobody took the QA item since.
    """
    if a.kind != "review":
        return False
    won = s.execute(
        update(Response)
        .where(Response.id == a.review_of, Response.qa_status == "pending")
        .values(qa_status="leased")
    ).rowcount
    return won == 1


def release(s: Session, a: Assignment) -> None:
    """Give a leased slot back (skip): the item returns to the queue for others."""
    if a.kind == "annotate" and a.holds_slot:
        s.execute(update(Item).where(Item.id == a.item_id).values(slots_taken=Item.slots_taken - 1))
        a.holds_slot = False
    elif a.kind == "review" and a.review_of is not None:
        s.execute(update(Response).where(Response.id == a.review_of).values(qa_status="pending"))


def qa_sampled(assignment_id: str, qa_rate: float) -> bool:
    """Deterministic QA sample: hash the assignment id to [0, 1) and compare with the rate."""
    u = int(hashlib.sha256(assignment_id.encode()).hexdigest()[:8], 16) / 2**32
    return u < qa_rate


def apply_qc_action(s: Session, user: User, action: str, reason: str, actor_id: int | None) -> QcAction:
    """Record and enforce a QC action; the most recent unreverted action is the user's `qc_state`."""
    if action not in QC_ACTIONS:
        raise ValueError(f"action: must be one of {QC_ACTIONS}, got {action!r}")
    row = QcAction(user_id=user.id, action=action, reason=reason, created_by=actor_id)
    s.add(row)
    s.flush()
    user.qc_state = action
    record(s, actor_id, f"qc.{action}", "user", user.id, {"qc_action_id": row.id, "reason": reason})
    return row


def revert_qc_action(s: Session, action_id: int, actor_id: int | None) -> QcAction:
    row = s.get(QcAction, action_id)
    if row is None:
        raise ValueError(f"qc action: no action with id {action_id}")
    if row.reverted_at is None:
        row.reverted_at = now()
        row.reverted_by = actor_id
        s.flush()
        latest = s.scalar(
            select(QcAction)
            .where(QcAction.user_id == row.user_id, QcAction.reverted_at.is_(None))
            .order_by(QcAction.id.desc())
            .limit(1)
        )
        s.get(User, row.user_id).qc_state = latest.action if latest else "active"
        record(s, actor_id, "qc.revert", "user", row.user_id, {"qc_action_id": row.id, "action": row.action})
    return row
