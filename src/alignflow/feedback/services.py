"""Library entry points of the annotation platform; the web routes and the CLI are thin shells over these.

Each write function runs ONE transaction on the session it is given: it takes the write lock
(`engine.begin_write`), changes rows, appends journal entries and commits, or rolls everything back and
raises. No FastAPI imports here, so the quickstart can simulate annotators through the same code path.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from alignflow.errors import AlignflowError
from alignflow.feedback import engine
from alignflow.feedback.auth import aware, now
from alignflow.feedback.journal import record
from alignflow.feedback.models import Assignment, Guideline, Item, Project, QuestionSchema, Response, User
from alignflow.feedback.schema import AnswerError, SchemaSpec, canonical_label, canonical_tags, parse_answer
from alignflow.store import db
from alignflow.workspace import Workspace

MAX_CANDIDATE_CHARS = 100_000


class ServiceError(AlignflowError):
    """A request the platform refuses; `status` is the HTTP status the API maps it to."""

    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ServiceError):
    status = 404


class Forbidden(ServiceError):
    status = 403


class Conflict(ServiceError):
    status = 409


class Invalid(ServiceError):
    status = 422


def connect(workspace: Workspace | None = None) -> sessionmaker[Session]:
    """Open the workspace database (creating or checking its schema) and return a session factory."""
    ws = workspace or Workspace.from_env()
    if ws.is_sqlite:
        ws.ensure_dirs()
    eng = db.make_engine(ws.db_url)
    db.ensure_schema(eng)
    return db.session_factory(eng)


def _user(s: Session, user: User | int | str) -> User:
    if isinstance(user, User):
        row = s.get(User, user.id)
    elif isinstance(user, int):
        row = s.get(User, user)
    else:
        row = s.scalar(select(User).where(User.username == user))
    if row is None:
        raise NotFound(f"no user {user!r}")
    return row


def get_project(s: Session, project: Project | int | str) -> Project:
    if isinstance(project, Project):
        row = s.get(Project, project.id)
    elif isinstance(project, int) or (isinstance(project, str) and project.isdigit()):
        row = s.get(Project, int(project))
    else:
        row = s.scalar(select(Project).where(Project.name == project))
    if row is None:
        raise NotFound(f"no project {project!r}")
    return row


_SPEC_CACHE: dict[tuple[str, int, str, int], SchemaSpec] = {}


def schema_spec(s: Session, project: Project, version: int | None = None) -> SchemaSpec:
    """The question schema of `project` at `version` (default: current). Versions are immutable once published,
    so parsed specs are cached per database, project (id and creation time, in case a database is recreated
    at the same URL) and version."""
    version = version or project.schema_version
    key = (str(s.get_bind().url), project.id, str(project.created_at), version)
    spec = _SPEC_CACHE.get(key)
    if spec is None:
        row = s.get(QuestionSchema, (project.id, version))
        if row is None:
            raise NotFound(f"project {project.name!r} has no schema version {version}")
        spec = _SPEC_CACHE.setdefault(key, SchemaSpec.model_validate(row.spec))
    return spec


def guideline(s: Session, project: Project, version: int | None = None) -> Guideline:
    row = s.get(Guideline, (project.id, version or project.guideline_version))
    if row is None:
        raise NotFound(f"project {project.name!r} has no guideline version {version}")
    return row


def add_user(
    s: Session, username: str, password: str, role: str, pod: str | None = None, tier: str = "standard"
) -> User:
    """Create a user (argon2-hashed password). Commits.

    Raises:
        Invalid: bad role, username or password; Conflict: the username exists.
    """
    from alignflow.feedback import auth

    engine.begin_write(s)
    try:
        user = auth.create_user(s, username, password, role, pod=pod, tier=tier)
        s.commit()
        return user
    except ValueError as exc:
        s.rollback()
        raise (Conflict if "already exists" in str(exc) else Invalid)(str(exc)) from exc
    except Exception:
        s.rollback()
        raise


# ---------------------------------------------------------------------------------------------- projects


def create_project(
    s: Session,
    name: str,
    guideline_md: str,
    schema: SchemaSpec | dict[str, Any] | None = None,
    *,
    overlap: int = 3,
    gold_rate: float = 0.1,
    qa_rate: float = 0.15,
    lease_seconds: int = 900,
    actor: User | int | str | None = None,
) -> Project:
    """Create a project with guideline version 1 and schema version 1. Commits."""
    try:
        spec = schema if isinstance(schema, SchemaSpec) else SchemaSpec.model_validate(schema or {})
    except ValueError as exc:
        raise Invalid(f"schema: {exc}", "schema") from exc
    if not name or len(name) > 128:
        raise Invalid("name: 1-128 characters required", "name")
    if not 1 <= overlap <= 50:
        raise Invalid(f"overlap: must be 1..50, got {overlap}", "overlap")
    for field, rate in (("gold_rate", gold_rate), ("qa_rate", qa_rate)):
        if not 0 <= rate <= 1:
            raise Invalid(f"{field}: must be in [0, 1], got {rate}", field)
    if lease_seconds < 5:
        raise Invalid(f"lease_seconds: at least 5, got {lease_seconds}", "lease_seconds")
    engine.begin_write(s)
    try:
        actor_id = _user(s, actor).id if actor is not None else None
        if s.scalar(select(Project).where(Project.name == name)) is not None:
            raise Conflict(f"name: project {name!r} already exists", "name")
        p = Project(
            name=name, overlap=overlap, gold_rate=gold_rate, qa_rate=qa_rate, lease_seconds=lease_seconds
        )
        s.add(p)
        s.flush()
        s.add(Guideline(project_id=p.id, version=1, body_md=guideline_md))
        s.add(QuestionSchema(project_id=p.id, version=1, spec=spec.model_dump()))
        record(s, actor_id, "project.create", "project", p.id, {"name": name, "schema": spec.model_dump()})
        s.commit()
        return p
    except Exception:
        s.rollback()
        raise


def new_guideline_version(
    s: Session, project: Project | str, body_md: str, actor: User | int | str | None = None
) -> int:
    """Publish a new guideline version; later leases show it and later responses record it. Commits."""
    engine.begin_write(s)
    try:
        p = get_project(s, project)
        p.guideline_version += 1
        s.add(Guideline(project_id=p.id, version=p.guideline_version, body_md=body_md))
        actor_id = _user(s, actor).id if actor is not None else None
        record(s, actor_id, "guideline.publish", "project", p.id, {"version": p.guideline_version})
        s.commit()
        return p.guideline_version
    except Exception:
        s.rollback()
        raise


def new_schema_version(
    s: Session,
    project: Project | str,
    spec: SchemaSpec | dict[str, Any],
    actor: User | int | str | None = None,
) -> int:
    """Publish a new question schema version. Commits."""
    try:
        spec = spec if isinstance(spec, SchemaSpec) else SchemaSpec.model_validate(spec)
    except ValueError as exc:
        raise Invalid(f"schema: {exc}", "schema") from exc
    engine.begin_write(s)
    try:
        p = get_project(s, project)
        p.schema_version += 1
        s.add(QuestionSchema(project_id=p.id, version=p.schema_version, spec=spec.model_dump()))
        actor_id = _user(s, actor).id if actor is not None else None
        record(s, actor_id, "schema.publish", "project", p.id, {"version": p.schema_version})
        s.commit()
        return p.schema_version
    except Exception:
        s.rollback()
        raise


# ------------------------------------------------------------------------------------------------- items


def _normalise_item(raw: Any, where: str, spec: SchemaSpec) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise Invalid(f"{where}: expected a JSON object, got {type(raw).__name__}")
    allowed = {"id", "prompt", "candidates", "priority", "gold_label", "ambiguous"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise Invalid(f"{where}: unknown field(s) {extra}; allowed {sorted(allowed)}")
    for key in ("id", "prompt"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise Invalid(f"{where}: field '{key}' must be a non-empty string")
    cands = raw.get("candidates")
    if not isinstance(cands, list) or not 2 <= len(cands) <= spec.max_candidates:
        raise Invalid(f"{where}: field 'candidates' must be a list of 2..{spec.max_candidates} responses")
    out = []
    for j, c in enumerate(cands):
        if isinstance(c, str):
            c = {"text": c}
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise Invalid(f"{where}: candidates[{j}] must be a string or an object with a 'text' string")
        if len(c["text"]) > MAX_CANDIDATE_CHARS:
            raise Invalid(f"{where}: candidates[{j}].text longer than {MAX_CANDIDATE_CHARS} characters")
        out.append(
            {
                "id": str(c.get("id") or f"c{j}"),
                "text": c["text"],
                "model": c.get("model"),
                "version": c.get("version"),
                "sampling": c.get("sampling") or {},
            }
        )
    if len({c["id"] for c in out}) != len(out):
        raise Invalid(f"{where}: candidate ids repeat")
    gold = raw.get("gold_label")
    if gold is not None:
        ok = (
            gold in ("A", "B", "tie")
            if spec.kind == "pairwise"
            else sorted(map(str, gold)) == sorted(c["id"] for c in out)
        )
        if not ok:
            expect = "'A', 'B' or 'tie'" if spec.kind == "pairwise" else "a ranking of all candidate ids"
            raise Invalid(f"{where}: field 'gold_label' must be {expect}, got {gold!r}")
    priority = raw.get("priority", 0)
    if not isinstance(priority, int):
        raise Invalid(f"{where}: field 'priority' must be an integer")
    return {
        "external_id": raw["id"],
        "prompt": raw["prompt"],
        "candidates": out,
        "priority": priority,
        "is_gold": gold is not None,
        "gold_label": gold,
        "tier": "expert" if raw.get("ambiguous") else "standard",
    }


def import_items(
    s: Session,
    project: Project | str,
    rows: Iterable[Any],
    source: str = "",
    actor: User | int | str | None = None,
) -> int:
    """Add items; every row is checked before anything is written. Returns how many were added. Commits.

    A row: `{"id", "prompt", "candidates": [{"id", "text", "model", "version", "sampling"}, ...],
    "priority"?, "gold_label"? ("A"/"B"/"tie" or a ranking), "ambiguous"?}`. Candidates may be plain strings.
    """
    p = get_project(s, project)
    spec = schema_spec(s, p)
    # Validate before taking the write lock, so a large import does not stall annotators while it is checked.
    items = [_normalise_item(r, f"{source or 'items'} row {i + 1}", spec) for i, r in enumerate(rows)]
    ids = [it["external_id"] for it in items]
    dup = sorted(x for x, n in Counter(ids).items() if n > 1)
    if dup:
        raise Invalid(f"{source or 'items'}: item id(s) repeat: {dup[:5]}")
    s.rollback()
    engine.begin_write(s)
    try:
        existing: set[str] = set()
        for start in range(0, len(ids), 500):  # bounded IN lists (SQLite caps bound parameters)
            chunk = ids[start : start + 500]
            existing |= set(
                s.scalars(
                    select(Item.external_id).where(Item.project_id == p.id, Item.external_id.in_(chunk))
                )
            )
        if existing:
            raise Conflict(
                f"{source or 'items'}: item id(s) already in project {p.name!r}: {sorted(existing)[:5]}"
            )
        for it in items:
            s.add(Item(project_id=p.id, source=source[:128] or None, **it))
        actor_id = _user(s, actor).id if actor is not None else None
        record(s, actor_id, "items.import", "project", p.id, {"count": len(items), "source": source})
        s.commit()
        return len(items)
    except Exception:
        s.rollback()
        raise


def read_items_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read an items JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise Invalid(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    return rows


def items_from_generation(table: Any) -> list[dict[str, Any]]:
    """Turn a generation dataset (pyarrow/pandas; one row per prompt x response) into item rows.

    Columns: `prompt`, `response` (or `completion`), optional `prompt_id`, `model`, `model_version`, `sampling`
    (dict or JSON string). Rows are grouped by prompt in first-seen order.
    """
    df = table.to_pandas() if hasattr(table, "to_pandas") else pd.DataFrame(table)
    text_col = (
        "response" if "response" in df.columns else "completion" if "completion" in df.columns else None
    )
    if "prompt" not in df.columns or text_col is None:
        raise Invalid(f"generation dataset: needs columns 'prompt' and 'response'; has {list(df.columns)}")
    groups: dict[str, dict[str, Any]] = {}
    for r in df.to_dict(orient="records"):
        key = str(r.get("prompt_id") or r["prompt"])
        g = groups.setdefault(
            key,
            {"id": key if "prompt_id" in r else f"p{len(groups)}", "prompt": r["prompt"], "candidates": []},
        )
        sampling = r.get("sampling")
        if isinstance(sampling, str):
            sampling = json.loads(sampling)
        g["candidates"].append(
            {
                "id": f"c{len(g['candidates'])}",
                "text": r[text_col],
                "model": r.get("model"),
                "version": r.get("model_version"),
                "sampling": sampling or {},
            }
        )
    return list(groups.values())


def mark_ambiguous(s: Session, item_id: int, actor: User | int | str, ambiguous: bool = True) -> None:
    """Route an item to expert-tier annotators only (or back). Commits."""
    engine.begin_write(s)
    try:
        item = s.get(Item, item_id)
        if item is None:
            raise NotFound(f"no item {item_id}")
        item.tier = "expert" if ambiguous else "standard"
        record(s, _user(s, actor).id, "item.tier", "item", item_id, {"tier": item.tier})
        s.commit()
    except Exception:
        s.rollback()
        raise


# ------------------------------------------------------------------------------------------------- tasks


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
        u = _user(s, user)
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
    if not isinstance(payload, dict):
        raise Invalid("body: expected a JSON object", "body")
    try:
        return _submit(s, user, assignment_id, dict(payload), client_id)
    except IntegrityError:
        # Two identical retries raced past the lookup; the unique (user, client_id) kept one. Report it.
        s.rollback()
        u = _user(s, user)
        prior = s.scalar(select(Response).where(Response.user_id == u.id, Response.client_id == client_id))
        if prior is not None and prior.assignment_id == assignment_id:
            return SubmitResult(prior.id, False, prior.qa_status != "none")
        raise Conflict(f"assignment {assignment_id} was already answered") from None


def _submit(
    s: Session, user: User | int | str, assignment_id: str, payload: dict[str, Any], client_id: str
) -> SubmitResult:
    engine.begin_write(s)
    try:
        u = _user(s, user)
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
        a = s.get(Assignment, assignment_id)
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
    engine.begin_write(s)
    try:
        u = _user(s, user)
        a = s.get(Assignment, assignment_id)
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


# --------------------------------------------------------------------------------------- reading results


def response_view(s: Session, viewer: User, response_id: int) -> dict[str, Any]:
    """One stored response, if `viewer` may see it (owner, a reviewer holding its QA task, the owner's lead, admin)."""
    r = s.get(Response, response_id)
    if r is None:
        raise NotFound(f"no response {response_id}")
    owner = s.get(User, r.user_id)
    allowed = viewer.role == "admin" or r.user_id == viewer.id
    if viewer.role == "lead":
        allowed = allowed or (viewer.pod is not None and owner.pod == viewer.pod)
    if viewer.role == "reviewer":
        allowed = (
            allowed
            or s.scalar(
                select(func.count())
                .select_from(Assignment)
                .where(
                    Assignment.user_id == viewer.id, Assignment.review_of == r.id, Assignment.kind == "review"
                )
            )
            > 0
        )
    if not allowed:
        raise Forbidden(f"you may not read response {response_id}")
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
    u = _user(s, user)
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


def throughput(s: Session, project: Project | int | str, window_hours: float = 1.0) -> list[dict[str, Any]]:
    """Per-annotator counts: responses in total and in the last `window_hours`, median seconds per task, skips."""
    p = get_project(s, project)
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
