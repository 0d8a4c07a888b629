"""Projects: lookup, creation, guideline and question-schema versions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from alignflow.feedback import engine
from alignflow.feedback.fields import (
    INT32_MAX,
    INT32_MIN,
    MAX_LEASE_SECONDS,
    PROJECT_NAME_CHARS,
    text_problem,
)
from alignflow.feedback.journal import record
from alignflow.feedback.models import Guideline, Project, QuestionSchema, User
from alignflow.feedback.schema import SchemaSpec
from alignflow.feedback.services.errors import Conflict, Invalid, NotFound
from alignflow.feedback.services.users import get_user


def get_project(s: Session, project: Project | int | str) -> Project:
    """A project by row, by id (a Python `int`) or by name (a `str`, always, even "1").

    A string is never read as an id: URLs and commands name projects, and a project may be called "2024";
    reading digit strings as ids let `POST /projects/1/items` write into whichever project had id 1.
    """
    if isinstance(project, Project):
        row = s.get(Project, project.id)
    elif isinstance(project, int):
        row = s.get(Project, project) if INT32_MIN <= project <= INT32_MAX else None
    elif text_problem(project) or len(project) > PROJECT_NAME_CHARS:
        row = None  # no stored name can match, and PostgreSQL would refuse the query
    else:
        row = s.scalar(select(Project).where(Project.name == project))
    if row is None:
        raise NotFound(f"no project {project!r}")
    return row


def list_projects(s: Session) -> list[Project]:
    return list(s.scalars(select(Project).order_by(Project.id)))


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
    if not name or len(name) > PROJECT_NAME_CHARS:
        raise Invalid(f"name: 1-{PROJECT_NAME_CHARS} characters required", "name")
    for field, value in (("name", name), ("guideline", guideline_md)):
        if text_problem(value):
            raise Invalid(f"{field}: {text_problem(value)}", field)
    if not 1 <= overlap <= 50:
        raise Invalid(f"overlap: must be 1..50, got {overlap}", "overlap")
    for field, rate in (("gold_rate", gold_rate), ("qa_rate", qa_rate)):
        if not 0 <= rate <= 1:
            raise Invalid(f"{field}: must be in [0, 1], got {rate}", field)
    if not 5 <= lease_seconds <= MAX_LEASE_SECONDS:
        raise Invalid(f"lease_seconds: must be 5..{MAX_LEASE_SECONDS}, got {lease_seconds}", "lease_seconds")
    engine.begin_write(s)
    try:
        actor_id = get_user(s, actor).id if actor is not None else None
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
    if text_problem(body_md):
        raise Invalid(f"body_md: {text_problem(body_md)}", "body_md")
    engine.begin_write(s)
    try:
        p = get_project(s, project)
        p.guideline_version += 1
        s.add(Guideline(project_id=p.id, version=p.guideline_version, body_md=body_md))
        actor_id = get_user(s, actor).id if actor is not None else None
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
        actor_id = get_user(s, actor).id if actor is not None else None
        record(s, actor_id, "schema.publish", "project", p.id, {"version": p.schema_version})
        s.commit()
        return p.schema_version
    except Exception:
        s.rollback()
        raise
