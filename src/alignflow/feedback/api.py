"""JSON API under /api/v1 (OpenAPI at /api/v1/openapi.json). Each route: authorise, call a service, shape JSON."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from alignflow.feedback import auth, fields, qc, services
from alignflow.feedback.deps import (
    DB,
    MANAGERS,
    SESSION_COOKIE,
    HTTPProblem,
    Who,
    require,
    set_session_cookie,
)
from alignflow.feedback.models import User


class Problem(BaseModel):
    """Every refusal: what went wrong, and the offending field when there is one."""

    detail: str
    field: str | None = None


_PROBLEMS = {
    400: "the request body is not valid JSON (or not the declared content type)",
    401: "not logged in, or an invalid, revoked or disabled token",
    403: "your role or token scope may not do this, or a missing CSRF token",
    404: "no such project, item, assignment, user, token or QC action (or not one you may see)",
    409: "conflicts with the current state (already exists, already answered, lease expired)",
    413: "request body larger than the server's limit",
    422: "the request does not fit its schema",
    429: "too many attempts; retry later",
}
router = APIRouter(
    responses={code: {"model": Problem, "description": text} for code, text in _PROBLEMS.items()}
)

# Path and query parameters: database ids are 32-bit on PostgreSQL; names carry no NUL (see `fields.py`).
ProjectName = Annotated[str, Path(min_length=1, max_length=fields.PROJECT_NAME_CHARS, pattern=fields.NO_NUL)]
Username = Annotated[str, Path(min_length=1, max_length=fields.USERNAME_CHARS, pattern=fields.NO_NUL)]
ItemId = Annotated[str, Path(min_length=1, max_length=fields.ITEM_ID_CHARS, pattern=fields.NO_NUL)]
AssignmentId = Annotated[str, Path(min_length=1, max_length=36, pattern=fields.NO_NUL)]
RowId = Annotated[int, Path(ge=1, le=fields.INT32_MAX)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(Strict):
    username: str = Field(max_length=fields.USERNAME_CHARS, pattern=fields.NO_NUL)
    password: str = Field(max_length=256, pattern=fields.NO_NUL)


class ProjectBody(Strict):
    name: str = Field(min_length=1, max_length=fields.PROJECT_NAME_CHARS, pattern=fields.NO_NUL)
    guideline: str = Field(min_length=1, pattern=fields.NO_NUL)
    question_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    overlap: int = Field(3, ge=1, le=50)
    gold_rate: float = Field(0.1, ge=0, le=1)
    qa_rate: float = Field(0.15, ge=0, le=1)
    lease_seconds: int = Field(900, ge=5, le=fields.MAX_LEASE_SECONDS)


class CandidateIn(Strict):
    id: str | None = Field(None, min_length=1, max_length=fields.CANDIDATE_ID_CHARS, pattern=fields.NO_NUL)
    text: str = Field(max_length=fields.MAX_CANDIDATE_CHARS, pattern=fields.NO_NUL)
    model: str | None = Field(None, min_length=1, max_length=fields.CANDIDATE_ID_CHARS, pattern=fields.NO_NUL)
    version: str | None = Field(
        None, min_length=1, max_length=fields.CANDIDATE_ID_CHARS, pattern=fields.NO_NUL
    )
    sampling: dict[str, Any] = Field(default_factory=dict)


class ItemIn(Strict):
    """One item: the same limits `services.import_items` checks for every caller."""

    id: str = Field(min_length=1, max_length=fields.ITEM_ID_CHARS, pattern=fields.NO_NUL)
    prompt: str = Field(min_length=1, max_length=fields.MAX_PROMPT_CHARS, pattern=fields.NO_NUL)
    candidates: list[
        Annotated[str, Field(max_length=fields.MAX_CANDIDATE_CHARS, pattern=fields.NO_NUL)] | CandidateIn
    ] = Field(min_length=2, max_length=10)
    priority: int = Field(0, ge=fields.INT32_MIN, le=fields.INT32_MAX)
    gold_label: (
        Literal["A", "B", "tie"]
        | list[
            Annotated[str, Field(min_length=1, max_length=fields.CANDIDATE_ID_CHARS, pattern=fields.NO_NUL)]
        ]
        | None
    ) = None
    ambiguous: bool = False


class ItemsBody(Strict):
    items: list[ItemIn] = Field(min_length=1)
    source: str = Field("", max_length=128, pattern=fields.NO_NUL)


class SubmitBody(Strict):
    client_id: str = Field(min_length=8, max_length=64, pattern=fields.NO_NUL)
    answer: dict[str, Any]


class SkipBody(Strict):
    reason: str = Field(min_length=1, max_length=2000, pattern=fields.NO_NUL)


class GuidelineBody(Strict):
    body_md: str = Field(min_length=1, pattern=fields.NO_NUL)


class SchemaBody(Strict):
    spec: dict[str, Any]


class UserBody(Strict):
    username: str = Field(min_length=1, max_length=fields.USERNAME_CHARS, pattern=r"^[A-Za-z0-9_-]+$")
    password: str = Field(min_length=8, max_length=256, pattern=fields.NO_NUL)
    role: Literal["admin", "lead", "reviewer", "annotator"]
    pod: str | None = Field(None, min_length=1, max_length=fields.POD_CHARS, pattern=fields.NO_NUL)
    tier: Literal["standard", "expert"] = "standard"


class TokenBody(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=fields.NO_NUL)
    scopes: list[Literal["annotate", "review", "manage", "read"]] = Field(min_length=1)


class QcBody(Strict):
    action: Literal["coach", "restrict", "recertify", "suspend"]
    reason: str = Field("", max_length=2000, pattern=fields.NO_NUL)


class ExportBody(Strict):
    method: Literal["majority_vote", "dawid_skene", "glad", "mace", "bradley_terry", "noisy_bt"] = (
        "dawid_skene"
    )


def _user_json(u: User) -> dict[str, Any]:
    return {
        "id": u.id,
        "username": u.username,
        "role": u.role,
        "pod": u.pod,
        "tier": u.tier,
        "qc_state": u.qc_state,
        "disabled": u.disabled,
    }


# ------------------------------------------------------------------------------------------------ session


@router.get("/health", tags=["auth"])
def health(s: DB) -> dict[str, str]:
    """Liveness: the server answers and its database is reachable (no authentication)."""
    s.execute(select(1))
    return {"status": "ok"}


@router.post("/auth/login", tags=["auth"])
def login(body: LoginBody, request: Request, response: Response, s: DB) -> dict[str, Any]:
    """Password login: sets an HttpOnly, SameSite=Lax session cookie and returns the CSRF token."""
    try:
        user, token, csrf = auth.login(
            s, body.username, body.password, request.client.host if request.client else ""
        )
        s.commit()
    except auth.AuthError as exc:
        s.commit()  # keep the failed-attempt record for the rate limit
        raise HTTPProblem(429 if exc.rate_limited else 401, str(exc)) from exc
    set_session_cookie(request, response, token)
    return {"user": _user_json(user), "csrf_token": csrf}


@router.post("/auth/logout", tags=["auth"])
def logout(request: Request, response: Response, p: Who, s: DB) -> dict[str, str]:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        services.end_session(s, cookie)
    response.delete_cookie(SESSION_COOKIE)
    return {"status": "logged out"}


@router.get("/me", tags=["auth"])
def me(p: Who) -> dict[str, Any]:
    """Who you are; `qc_state` as you are shown it (`services.own_qc_state`)."""
    own = {**_user_json(p.user), "qc_state": services.own_qc_state(p.user)}
    return {**own, "scopes": sorted(p.scopes), "via": p.via}


# ----------------------------------------------------------------------------------------------- projects


@router.get("/projects", tags=["projects"])
def list_projects(p: Who, s: DB) -> list[dict[str, Any]]:
    require(p, scope="read")
    return [
        {
            "id": x.id,
            "name": x.name,
            "guideline_version": x.guideline_version,
            "schema_version": x.schema_version,
        }
        for x in services.list_projects(s)
    ]


@router.post("/projects", status_code=201, tags=["projects"])
def create_project(body: ProjectBody, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=("admin",), scope="manage")
    proj = services.create_project(
        s,
        body.name,
        body.guideline,
        body.question_schema,
        overlap=body.overlap,
        gold_rate=body.gold_rate,
        qa_rate=body.qa_rate,
        lease_seconds=body.lease_seconds,
        actor=p.user.id,
    )
    return {"id": proj.id, "name": proj.name}


@router.get("/projects/{name}", tags=["projects"])
def get_project(name: ProjectName, p: Who, s: DB) -> dict[str, Any]:
    require(p, scope="read")
    proj = services.get_project(s, name)
    return {
        "id": proj.id,
        "name": proj.name,
        "overlap": proj.overlap,
        "gold_rate": proj.gold_rate,
        "qa_rate": proj.qa_rate,
        "lease_seconds": proj.lease_seconds,
        "guideline_version": proj.guideline_version,
        "schema_version": proj.schema_version,
        "schema": services.schema_spec(s, proj).model_dump(),
    }


@router.get("/projects/{name}/guideline", tags=["projects"])
def get_guideline(
    name: ProjectName, p: Who, s: DB, version: Annotated[int | None, Query(ge=1, le=fields.INT32_MAX)] = None
) -> dict[str, Any]:
    require(p, scope="read")
    g = services.guideline(s, services.get_project(s, name), version)
    return {"version": g.version, "body_md": g.body_md}


@router.post("/projects/{name}/guidelines", status_code=201, tags=["projects"])
def publish_guideline(name: ProjectName, body: GuidelineBody, p: Who, s: DB) -> dict[str, int]:
    require(p, roles=MANAGERS, scope="manage")
    return {"version": services.new_guideline_version(s, name, body.body_md, actor=p.user.id)}


@router.post("/projects/{name}/schemas", status_code=201, tags=["projects"])
def publish_schema(name: ProjectName, body: SchemaBody, p: Who, s: DB) -> dict[str, int]:
    require(p, roles=("admin",), scope="manage")
    return {"version": services.new_schema_version(s, name, body.spec, actor=p.user.id)}


@router.post("/projects/{name}/items", status_code=201, tags=["projects"])
def import_items(name: ProjectName, body: ItemsBody, p: Who, s: DB) -> dict[str, int]:
    require(p, roles=MANAGERS, scope="manage")
    rows = [item.model_dump(exclude_unset=True) for item in body.items]
    return {"imported": services.import_items(s, name, rows, source=body.source or "api", actor=p.user.id)}


@router.get("/projects/{name}/items/{item_id}/gold", tags=["projects"])
def gold_answer(name: ProjectName, item_id: ItemId, p: Who, s: DB) -> dict[str, Any]:
    """The known answer of a gold item: leads and admins only."""
    require(p, roles=MANAGERS, scope="manage")
    item = services.gold_answer(s, name, item_id)
    return {"item_id": item_id, "is_gold": item.is_gold, "gold_label": item.gold_label}


@router.post("/items/{item_pk}/ambiguous", tags=["projects"])
def mark_ambiguous(item_pk: RowId, p: Who, s: DB, ambiguous: bool = True) -> dict[str, Any]:
    require(p, roles=MANAGERS, scope="manage")
    services.mark_ambiguous(s, item_pk, p.user.id, ambiguous)
    return {"item": item_pk, "tier": "expert" if ambiguous else "standard"}


@router.get("/projects/{name}/queue", tags=["monitoring"])
def queue(name: ProjectName, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=MANAGERS, scope="read")
    return services.queue_state(s, name)


@router.get("/projects/{name}/throughput", tags=["monitoring"])
def throughput(name: ProjectName, p: Who, s: DB) -> list[dict[str, Any]]:
    require(p, roles=MANAGERS, scope="read")
    return services.throughput(s, name, viewer=p.user)


@router.get("/projects/{name}/quality", tags=["monitoring"])
def quality(name: ProjectName, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=MANAGERS, scope="read")
    return qc.quality_report(s, name, viewer=p.user)


@router.post("/projects/{name}/qc/evaluate", tags=["qc"])
def qc_evaluate(name: ProjectName, p: Who, s: DB) -> list[dict[str, Any]]:
    require(p, roles=MANAGERS, scope="manage")
    return qc.evaluate_and_apply(s, name, p.user.id)


@router.post("/projects/{name}/export", tags=["projects"])
def export(name: ProjectName, body: ExportBody, request: Request, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=("admin",), scope="manage")
    from alignflow.feedback.export import export_project
    from alignflow.store import Store

    store = Store.open(request.app.state.workspace)
    try:
        return export_project(s, store, name, body.method, actor=p.user.id)
    finally:
        store.close()


# -------------------------------------------------------------------------------------------------- tasks


@router.post(
    "/projects/{name}/next", tags=["tasks"], responses={204: {"description": "no task left for you"}}
)
def next_task(name: ProjectName, p: Who, s: DB) -> Any:
    """Lease (or resume) your next task: an annotation, or a QA review for reviewers."""
    require(p, scope="review" if p.user.role == "reviewer" else "annotate")
    task = services.next_task(s, p.user.id, name)
    if task is None:
        return Response(status_code=204)
    return task


@router.post("/assignments/{assignment_id}/submit", tags=["tasks"])
def submit(
    assignment_id: AssignmentId, body: SubmitBody, response: Response, p: Who, s: DB
) -> dict[str, Any]:
    """Submit an answer; the same `client_id` again returns the stored response (200) instead of 201."""
    require(p, scope="review" if p.user.role == "reviewer" else "annotate")
    res = services.submit(s, p.user.id, assignment_id, body.answer, body.client_id)
    response.status_code = 201 if res.created else 200
    return {"response_id": res.response_id, "created": res.created}


@router.post("/assignments/{assignment_id}/skip", tags=["tasks"])
def skip(assignment_id: AssignmentId, body: SkipBody, p: Who, s: DB) -> dict[str, str]:
    require(p, scope="review" if p.user.role == "reviewer" else "annotate")
    services.skip(s, p.user.id, assignment_id, body.reason)
    return {"status": "skipped"}


@router.get("/projects/{name}/progress", tags=["tasks"])
def progress(name: ProjectName, p: Who, s: DB) -> dict[str, int]:
    require(p, scope="read")
    return services.progress(s, p.user.id, name)


@router.get("/responses/{response_id}", tags=["tasks"])
def get_response(response_id: RowId, p: Who, s: DB) -> dict[str, Any]:
    """A stored response: its author, the author's lead, a reviewer holding its QA task, or an admin."""
    require(p, scope="read")
    return services.response_view(s, p.user, response_id)


# -------------------------------------------------------------------------------------------------- users


@router.get("/users", tags=["users"])
def list_users(p: Who, s: DB) -> list[dict[str, Any]]:
    """Admins see everyone; a lead sees themselves and the annotators they manage."""
    require(p, roles=MANAGERS, scope="read")
    return [_user_json(u) for u in services.list_users(s, p.user)]


@router.post("/users", status_code=201, tags=["users"])
def add_user(body: UserBody, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=("admin",), scope="manage")
    u = services.add_user(s, body.username, body.password, body.role, body.pod, body.tier, actor=p.user.id)
    return _user_json(u)


@router.post("/users/{username}/disable", tags=["users"])
def disable_user(username: Username, p: Who, s: DB, disabled: bool = True) -> dict[str, Any]:
    require(p, roles=("admin",), scope="manage")
    return _user_json(services.set_disabled(s, username, disabled, actor=p.user.id))


@router.post("/users/{username}/tokens", status_code=201, tags=["users"])
def create_token(username: Username, body: TokenBody, p: Who, s: DB) -> dict[str, Any]:
    """Issue an API token (shown once). Admins for anyone; everyone else for themselves, within their role."""
    row, raw = services.create_token(s, p.user, username, body.name, body.scopes)
    return {"id": row.id, "token": raw, "scopes": row.scopes}


@router.delete("/tokens/{token_id}", tags=["users"])
def revoke_token(token_id: RowId, p: Who, s: DB) -> dict[str, str]:
    services.revoke_token(s, p.user, token_id)
    return {"status": "revoked"}


@router.post("/users/{username}/qc", status_code=201, tags=["qc"])
def qc_action(username: Username, body: QcBody, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=MANAGERS, scope="manage")
    row = services.apply_qc(s, p.user, username, body.action, body.reason)
    return {"id": row.id, "user": username, "action": row.action}


@router.post("/qc/{action_id}/revert", tags=["qc"])
def qc_revert(action_id: RowId, p: Who, s: DB) -> dict[str, Any]:
    require(p, roles=MANAGERS, scope="manage")
    target = services.revert_qc(s, p.user, action_id)
    return {"id": action_id, "user_qc_state": target.qc_state}


@router.get("/journal", tags=["admin"])
def journal(
    p: Who,
    s: DB,
    limit: Annotated[int, Query(ge=1, le=services.JOURNAL_MAX)] = 100,
    action: Annotated[str | None, Query(max_length=64, pattern=fields.NO_NUL)] = None,
) -> list[dict[str, Any]]:
    require(p, roles=("admin",), scope="read")
    return services.journal(s, limit, action)
