"""Server-rendered pages (Jinja2, autoescaped; htmx for the live queue panel). Thin shells over `services`.

Every POST form carries the session's CSRF token (the login form a double-submit cookie token) and is
checked before anything is read from the database on the user's behalf.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.datastructures import FormData, UploadFile

from alignflow.feedback import auth, qc, services
from alignflow.feedback.deps import (
    DB,
    LOGIN_CSRF_COOKIE,
    MANAGERS,
    SESSION_COOKIE,
    HTTPProblem,
    page_user,
    secure_cookies,
    set_session_cookie,
)

router = APIRouter(include_in_schema=False)


def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    return request.app.state.templates.TemplateResponse(request, template, ctx, status_code=status)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "message.html", status=status, title=f"Error {status}", message=message, user=None)


async def _form(request: Request, p: auth.Principal) -> FormData:
    form = await request.form()
    if not auth.csrf_ok(p, str(form.get("csrf_token") or "")):
        raise HTTPProblem(403, "missing or wrong CSRF token; reload the page and try again")
    return form


# --------------------------------------------------------------------------------------------------- login


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, error: str = "") -> HTMLResponse:
    token = secrets.token_urlsafe(16)
    resp = render(request, "login.html", login_csrf=token, error=error, user=None)
    resp.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies(request)
    )
    return resp


@router.post("/login")
async def login_submit(request: Request, s: DB) -> Any:
    form = await request.form()
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not cookie or not secrets.compare_digest(cookie, str(form.get("login_csrf") or "")):
        raise HTTPProblem(403, "the login form expired; reload the page")
    try:
        _, token, _ = auth.login(
            s,
            str(form.get("username") or ""),
            str(form.get("password") or ""),
            request.client.host if request.client else "",
        )
        s.commit()
    except auth.AuthError as exc:
        s.commit()
        return render(
            request,
            "login.html",
            status=429 if exc.rate_limited else 401,
            login_csrf=cookie,
            error=str(exc),
            user=None,
        )
    resp = RedirectResponse("/", status_code=303)
    set_session_cookie(request, resp, token)
    resp.delete_cookie(LOGIN_CSRF_COOKIE)
    return resp


@router.post("/logout")
async def logout(request: Request, s: DB) -> Any:
    p = page_user(request, s)
    await _form(request, p)
    services.end_session(s, request.cookies.get(SESSION_COOKIE, ""))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(SESSION_COOKIE)
    return resp


@router.get("/")
def home(request: Request, s: DB) -> Any:
    p = page_user(request, s)
    target = {"reviewer": "/review", "annotator": "/annotate"}.get(p.user.role, "/admin")
    return RedirectResponse(target, status_code=303)


# ------------------------------------------------------------------------------------------------ annotate


@router.get("/annotate", response_class=HTMLResponse)
def annotate_page(request: Request, s: DB, project: str = "", error: str = "", done: bool = False) -> Any:
    p = page_user(request, s)
    if not project:
        return render(
            request,
            "projects.html",
            user=p.user,
            csrf=p.csrf_token,
            projects=services.list_projects(s),
            mode="annotate",
        )
    return _task_page(request, s, p, project, "annotate", error, done)


@router.get("/review", response_class=HTMLResponse)
def review_page(request: Request, s: DB, project: str = "", error: str = "", done: bool = False) -> Any:
    p = page_user(request, s, roles=("reviewer", "lead", "admin"))
    if not project:
        return render(
            request,
            "projects.html",
            user=p.user,
            csrf=p.csrf_token,
            projects=services.list_projects(s),
            mode="review",
        )
    return _task_page(request, s, p, project, "review", error, done)


def _task_page(
    request: Request, s: DB, p: auth.Principal, project: str, mode: str, error: str, done: bool
) -> Any:
    """Show the task the user already holds; never lease one (a GET must not change state): the page's
    "Start" button POSTs to /tasks/next, and each submit or skip POST leases the next task itself."""
    proj = services.get_project(s, project)
    task = services.current_task(s, p.user.id, proj)
    if task is not None and mode == "annotate" and task["kind"] == "review":
        return RedirectResponse(_task_url("review", proj.name), status_code=303)
    prog = services.progress(s, p.user.id, proj)
    guide = services.guideline(s, proj, task["guideline_version"] if task else None)
    return render(
        request,
        f"{mode}.html",
        user=p.user,
        csrf=p.csrf_token,
        project=proj,
        task=task,
        done=done,
        mode=mode,
        progress=prog,
        guideline=guide,
        client_id=uuid.uuid4().hex,
        error=error,
    )


def _task_url(mode: str, project: str, **params: str) -> str:
    query = "&".join(f"{k}={_q(v)}" for k, v in {"project": project, **params}.items())
    return f"/{'review' if mode == 'review' else 'annotate'}?{query}"


def _lease_next(s: DB, p: auth.Principal, project: str, mode: str) -> RedirectResponse:
    """Lease the user's next task (inside a POST) and send them to the page that shows it."""
    task = services.next_task(s, p.user.id, project)
    if task is None:
        return RedirectResponse(_task_url(mode, project, done="1"), status_code=303)
    return RedirectResponse(_task_url(task["kind"], project), status_code=303)


@router.post("/tasks/next")
async def next_task_form(request: Request, s: DB) -> Any:
    """The "Start" button: lease a task (state changes only on POST), then show it."""
    p = page_user(request, s)
    form = await _form(request, p)
    mode = "review" if form.get("mode") == "review" else "annotate"
    project = services.get_project(s, str(form.get("project") or "")).name
    return _lease_next(s, p, project, mode)


def _answer_from_form(form: FormData, schema_version: int) -> dict[str, Any]:
    """Build an `Answer` dict from form fields: choice, strength, dim_<name>, tags_<pos>, rationale, ranking."""
    ans: dict[str, Any] = {"schema_version": schema_version}
    if form.get("choice"):
        ans["choice"] = str(form["choice"])
    if form.get("strength"):
        ans["strength"] = int(str(form["strength"]))
    if form.get("ranking"):
        ans["ranking"] = [int(x) for x in str(form["ranking"]).replace(" ", "").split(",") if x != ""]
    dims = {k[4:]: str(v) for k, v in form.items() if k.startswith("dim_") and v}
    if dims:
        ans["dimensions"] = dims
    tags: dict[str, list[str]] = {}
    for k in form:
        if k.startswith("tags_"):
            tags[k[5:]] = [str(v) for v in form.getlist(k)]
    if tags:
        ans["failure_tags"] = tags
    ans["rationale"] = str(form.get("rationale") or "")
    dur = form.get("duration_s")
    if dur:
        try:
            ans["duration_s"] = round(float(str(dur)), 3)
        except ValueError:
            pass
    return ans


@router.post("/tasks/{assignment_id}/submit")
async def submit_form(assignment_id: str, request: Request, s: DB) -> Any:
    p = page_user(request, s)
    form = await _form(request, p)
    mode = "review" if form.get("mode") == "review" else "annotate"
    project = str(form.get("project") or "")
    try:
        schema_version = int(str(form.get("schema_version") or "0"))
        answer = _answer_from_form(form, schema_version)
        if form.get("review_action"):
            answer["review_action"] = str(form["review_action"])
            if answer["review_action"] == "accept":
                answer = {"review_action": "accept", "duration_s": answer.get("duration_s")}
        services.submit(s, p.user.id, assignment_id, answer, str(form.get("client_id") or ""))
    except (services.Invalid, services.Conflict, ValueError) as exc:
        return RedirectResponse(_task_url(mode, project, error=str(exc)), status_code=303)
    return _lease_next(s, p, project, mode)


@router.post("/tasks/{assignment_id}/skip")
async def skip_form(assignment_id: str, request: Request, s: DB) -> Any:
    p = page_user(request, s)
    form = await _form(request, p)
    mode = "review" if form.get("mode") == "review" else "annotate"
    project = str(form.get("project") or "")
    try:
        services.skip(s, p.user.id, assignment_id, str(form.get("reason") or ""))
    except (services.Invalid, services.Conflict) as exc:
        return RedirectResponse(_task_url(mode, project, error=str(exc)), status_code=303)
    return _lease_next(s, p, project, mode)


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:300])


# --------------------------------------------------------------------------------------------- lead/admin


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, s: DB, error: str = "", notice: str = "") -> HTMLResponse:
    p = page_user(request, s, roles=MANAGERS)
    summaries = [services.queue_state(s, proj) for proj in services.list_projects(s)]
    return render(
        request, "admin.html", user=p.user, csrf=p.csrf_token, summaries=summaries, error=error, notice=notice
    )


@router.post("/admin/projects")
async def create_project_form(request: Request, s: DB) -> Any:
    p = page_user(request, s, roles=("admin",))
    form = await _form(request, p)
    try:
        spec: dict[str, Any] = {"kind": str(form.get("kind") or "pairwise")}
        dims = [d.strip() for d in str(form.get("dimensions") or "").split(",") if d.strip()]
        if dims:
            spec["dimensions"] = dims
        if spec["kind"] == "ranking":
            spec["max_candidates"] = int(str(form.get("max_candidates") or 4))
            spec["dimensions"] = []
        spec["rationale_min_chars"] = int(str(form.get("rationale_min_chars") or 0))
        proj = services.create_project(
            s,
            str(form.get("name") or "").strip(),
            str(form.get("guideline") or ""),
            spec,
            overlap=int(str(form.get("overlap") or 3)),
            gold_rate=float(str(form.get("gold_rate") or 0.1)),
            qa_rate=float(str(form.get("qa_rate") or 0.15)),
            actor=p.user.id,
        )
    except (services.ServiceError, ValueError) as exc:
        return RedirectResponse(f"/admin?error={_q(str(exc))}", status_code=303)
    return RedirectResponse(f"/admin/projects/{proj.name}?notice={_q('project created')}", status_code=303)


@router.get("/admin/projects/{name}", response_class=HTMLResponse)
def project_page(name: str, request: Request, s: DB, error: str = "", notice: str = "") -> HTMLResponse:
    p = page_user(request, s, roles=MANAGERS)
    proj = services.get_project(s, name)
    rows = services.throughput(s, proj, viewer=p.user)
    try:
        report = qc.quality_report(s, proj, viewer=p.user)
        quality_error = ""
    except Exception as exc:  # noqa: BLE001 - the page still shows the queue when a figure cannot be computed
        report, quality_error = (
            {"annotators": [], "agreement": {}, "judges": []},
            f"quality figures unavailable: {exc}",
        )
    actions = services.qc_actions(s, p.user)
    return render(
        request,
        "project.html",
        user=p.user,
        csrf=p.csrf_token,
        project=proj,
        queue=services.queue_state(s, proj),
        throughput=rows,
        quality=report,
        quality_error=quality_error,
        actions=actions,
        error=error,
        notice=notice,
        guideline=services.guideline(s, proj),
    )


@router.get("/admin/projects/{name}/queue", response_class=HTMLResponse)
def queue_partial(name: str, request: Request, s: DB) -> HTMLResponse:
    page_user(request, s, roles=MANAGERS)
    return render(request, "_queue.html", queue=services.queue_state(s, name))


@router.post("/admin/projects/{name}/items")
async def import_items_form(name: str, request: Request, s: DB) -> Any:
    p = page_user(request, s, roles=MANAGERS)
    form = await _form(request, p)
    text = str(form.get("jsonl") or "")
    upload = form.get("file")
    source = "web form"
    if isinstance(upload, UploadFile) and upload.filename:
        text = (await upload.read()).decode("utf-8", errors="replace")
        source = upload.filename
    import json

    rows = []
    try:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise services.Invalid(f"{source}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not rows:
            raise services.Invalid("no items given: paste JSONL or choose a file")
        n = services.import_items(s, name, rows, source=source, actor=p.user.id)
    except services.ServiceError as exc:
        return RedirectResponse(f"/admin/projects/{name}?error={_q(str(exc))}", status_code=303)
    return RedirectResponse(f"/admin/projects/{name}?notice={_q(f'imported {n} items')}", status_code=303)


@router.post("/admin/projects/{name}/qc-evaluate")
async def qc_evaluate_form(name: str, request: Request, s: DB) -> Any:
    p = page_user(request, s, roles=MANAGERS)
    await _form(request, p)
    applied = qc.evaluate_and_apply(s, name, p.user.id)
    return RedirectResponse(
        f"/admin/projects/{name}?notice={_q(f'{len(applied)} QC action(s) applied')}", status_code=303
    )


@router.post("/admin/qc/{action_id}/revert")
async def qc_revert_form(action_id: int, request: Request, s: DB) -> Any:
    p = page_user(request, s, roles=MANAGERS)
    form = await _form(request, p)
    services.revert_qc(s, p.user, action_id)
    back = str(form.get("back") or "/admin")
    return RedirectResponse(back if back.startswith("/admin") else "/admin", status_code=303)
