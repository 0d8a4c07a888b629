"""The task flow: lease the next task, submit an answer exactly once, skip."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from alignflow.feedback import engine
from alignflow.feedback.auth import aware, now
from alignflow.feedback.fields import first_text_problem, text_problem
from alignflow.feedback.journal import record
from alignflow.feedback.models import Assignment, Item, Project, Response, User
from alignflow.feedback.schema import AnswerError, canonical_label, canonical_tags, parse_answer
from alignflow.feedback.services.errors import Conflict, Forbidden, Invalid, NotFound
from alignflow.feedback.services.projects import get_project, schema_spec
from alignflow.feedback.services.users import get_user


def _assignment(s: Session, assignment_id: str) -> Assignment | None:
    # Assignment ids are UUIDs; anything else cannot match (and a NUL would make PostgreSQL refuse the query).
    if not isinstance(assignment_id, str) or len(assignment_id) > 36 or text_problem(assignment_id):
        return None
    return s.get(Assignment, assignment_id)


def task_view(s: Session, a: Assignment) -> dict[str, Any]:
    """What the annotator sees: candidates in display order, no model names, no gold flag."""
    item = s.get(Item, a.item_id)
    p = s.get(Project, a.project_id)
    spec = schema_spec(s, p, a.schema_version)
    view: dict[str, Any] = {
        "assignment_id": a.id,
        "kind": a.kind,
        "project": p.name,
        "prompt": item.prompt,
        "candidates": [
            {"position": pos, "text": item.candidates[c]["text"]} for pos, c in enumerate(a.display_order)
        ],
        "schema_version": a.schema_version,
        "guideline_version": a.guideline_version,
        "schema": spec.model_dump(),
        "lease_expires_at": aware(a.lease_expires_at).isoformat(),
    }
    if a.kind == "review":
        orig = s.get(Response, a.review_of)
        view["original"] = {"response_id": orig.id, "answer": orig.payload}
    return view


def next_task(
    s: Session, user: User | int | str, project: Project | int | str, rng: random.Random | None = None
) -> dict | None:
    """Lease (or resume) the user's next task in `project`; None when there is nothing for them. Commits.

    Raises:
        Forbidden: the user is disabled or suspended.
    """
    engine.begin_write(s)
    try:
        u = get_user(s, user)
        p = get_project(s, project)
        try:
            a = engine.lease(s, u, p, rng)
        except engine.NoWork as exc:
            s.commit()  # keep the lease expiries done on the way
            if u.disabled or u.qc_state == "suspend":
                raise Forbidden(str(exc)) from exc
            return None
        view = task_view(s, a)
        s.commit()
        return view
    except Exception:
        s.rollback()
        raise


def current_task(s: Session, user: User | int | str, project: Project | int | str) -> dict | None:
    """The task `user` already holds in `project` (an unexpired lease), or None. Reads only: pages show it on
    GET, and only a POST (`next_task`) leases, so a cross-site link cannot take a task on someone's behalf."""
    u = get_user(s, user)
    p = get_project(s, project)
    a = engine.active_lease(s, u, p)
    return task_view(s, a) if a is not None else None


@dataclass(frozen=True)
class SubmitResult:
    response_id: int
    created: bool  # False when this client_id was already stored (an idempotent retry)
    qa_sampled: bool


def submit(
    s: Session, user: User | int | str, assignment_id: str, payload: dict[str, Any], client_id: str
) -> SubmitResult:
    """Store an answer exactly once, validated against the schema version the task was shown with. Commits.

    `payload` is an `Answer` (display terms); for a review assignment it also has `review_action`
    ("accept" keeps the original answer, "correct" replaces it with this payload's answer).
    Retrying with the same `client_id` returns the stored response instead of writing again.

    Raises:
        Invalid (422): the payload does not fit the schema; NotFound (404): no such assignment for this user;
        Conflict (409): already answered, skipped, or the lease expired and the slot went to someone else.
    """
    if not isinstance(client_id, str) or not 8 <= len(client_id) <= 64:
        raise Invalid("client_id: 8-64 characters required", "client_id")
    if text_problem(client_id):
        raise Invalid(f"client_id: {text_problem(client_id)}", "client_id")
    if not isinstance(payload, dict):
        raise Invalid("body: expected a JSON object", "body")
    bad = first_text_problem(payload)
    if bad:
        raise Invalid(f"field '{bad[0]}': {bad[1]}", bad[0] or "answer")
    try:
        return _submit(s, user, assignment_id, dict(payload), client_id)
    except IntegrityError:
        # Two identical retries raced past the lookup; the unique (user, client_id) kept one. Report it.
        s.rollback()
        u = get_user(s, user)
        prior = s.scalar(select(Response).where(Response.user_id == u.id, Response.client_id == client_id))
        if prior is not None and prior.assignment_id == assignment_id:
            return SubmitResult(prior.id, False, prior.qa_status != "none")
        raise Conflict(f"assignment {assignment_id} was already answered") from None


def _submit(
    s: Session, user: User | int | str, assignment_id: str, payload: dict[str, Any], client_id: str
) -> SubmitResult:
    engine.begin_write(s)
    try:
        u = get_user(s, user)
        if u.disabled:
            raise Forbidden("this account is disabled")
        prior = s.scalar(select(Response).where(Response.user_id == u.id, Response.client_id == client_id))
        if prior is not None:
            s.rollback()
            if prior.assignment_id != assignment_id:
                raise Conflict(
                    f"client_id {client_id!r} was already used for another assignment", "client_id"
                )
            return SubmitResult(prior.id, False, prior.qa_status != "none")
        a = _assignment(s, assignment_id)
        if a is None or a.user_id != u.id:
            raise NotFound(f"assignment {assignment_id!r} is not assigned to you", "assignment_id")
        p = s.get(Project, a.project_id)
        review_action = payload.pop("review_action", None) if a.kind == "review" else None
        if a.kind == "review" and review_action not in ("accept", "correct"):
            raise Invalid("review_action: must be 'accept' or 'correct'", "review_action")
        if a.status in ("submitted", "skipped"):
            raise Conflict(f"assignment {assignment_id} is already {a.status}")
        item = s.get(Item, a.item_id)
        spec = schema_spec(s, p, a.schema_version)
        cand_ids = [c["id"] for c in item.candidates]
        original = s.get(Response, a.review_of) if a.kind == "review" else None
        if review_action == "accept":
            answer_payload = dict(original.payload)
            label, dims, swapped = original.label, dict(original.dimension_labels), original.shown_swapped
            duration = payload.get("duration_s")
            if set(payload) - {"duration_s", "schema_version"}:
                raise Invalid(
                    f"unknown field(s) {sorted(set(payload) - {'duration_s', 'schema_version'})} for accept"
                )
        else:
            try:
                answer = parse_answer(payload)
                if answer.schema_version != a.schema_version:
                    raise AnswerError(
                        "schema_version",
                        f"this task was shown with schema version {a.schema_version}, got {answer.schema_version}",
                    )
                label, dims, swapped = canonical_label(answer, spec, list(a.display_order), cand_ids)
            except AnswerError as exc:
                raise Invalid(str(exc), exc.field) from exc
            answer_payload = answer.model_dump()
            answer_payload["failure_tags_by_candidate"] = canonical_tags(
                answer, list(a.display_order), cand_ids
            )
            duration = answer.duration_s
        if a.status == "expired" and not engine.retake_expired(s, a, p):
            raise Conflict(
                f"the lease on assignment {assignment_id} expired and the task went to someone else"
            )
        t = now()
        server_duration = (t - aware(a.leased_at)).total_seconds()
        answer_payload["server_duration_s"] = round(server_duration, 3)
        sampled = a.kind == "annotate" and not item.is_gold and engine.qa_sampled(a.id, p.qa_rate)
        resp = Response(
            assignment_id=a.id,
            client_id=client_id,
            project_id=p.id,
            item_id=a.item_id,
            user_id=u.id,
            kind=a.kind,
            review_of=a.review_of,
            review_action=review_action,
            guideline_version=a.guideline_version,
            schema_version=a.schema_version,
            payload=answer_payload,
            label=label,
            dimension_labels=dims,
            shown_swapped=swapped,
            duration_s=float(duration) if duration is not None else server_duration,
            qa_status="pending" if sampled else "none",
            created_at=t,
        )
        s.add(resp)
        a.status = "submitted"
        a.finished_at = t
        if original is not None:
            original.qa_status = "done"
        s.flush()
        record(
            s,
            u.id,
            "response.submit",
            "response",
            resp.id,
            {"assignment_id": a.id, "item_id": a.item_id, "kind": a.kind, "review_action": review_action},
        )
        s.commit()
        return SubmitResult(resp.id, True, sampled)
    except IntegrityError:
        raise
    except Exception:
        s.rollback()
        raise


def skip(s: Session, user: User | int | str, assignment_id: str, reason: str) -> None:
    """Give a task back with a reason; the slot returns to the queue and this user will not see it again."""
    reason = (reason or "").strip()
    if not reason:
        raise Invalid("reason: a reason is required to skip", "reason")
    if text_problem(reason):
        raise Invalid(f"reason: {text_problem(reason)}", "reason")
    engine.begin_write(s)
    try:
        u = get_user(s, user)
        a = _assignment(s, assignment_id)
        if a is None or a.user_id != u.id:
            raise NotFound(f"assignment {assignment_id!r} is not assigned to you", "assignment_id")
        if a.status != "leased":
            raise Conflict(f"assignment {assignment_id} is {a.status}, not leased")
        engine.release(s, a)
        a.status = "skipped"
        a.skip_reason = reason[:2000]
        a.finished_at = now()
        record(
            s, u.id, "assignment.skip", "assignment", a.id, {"item_id": a.item_id, "reason": a.skip_reason}
        )
        s.commit()
    except Exception:
        s.rollback()
        raise
