"""Route x role matrix: every route of the app (API and pages, found through `app.routes`) against ONE declared
table of expected outcomes for each role. A route without a row in `MATRIX` fails `test_every_route_is_declared`.

Each route runs on a fresh copy of the same small world, built once per database (a project with items, one
submitted response and one open lease of the annotator, a QC action on them, an API token and a browser session
per user), and the roles call it in `ROLES` order. API routes are called with the role's bearer token, pages with its session cookie
and CSRF token; the anonymous role sends neither; the disabled user's token and session predate the disable.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, answer, copy_database, drop_pg, pair_items, pg_url_for
from sqlalchemy.engine import make_url

from alignflow.feedback import auth, services
from alignflow.feedback.app import create_app
from alignflow.feedback.deps import SESSION_COOKIE
from alignflow.feedback.models import Item
from alignflow.workspace import Workspace

ROLES = ("anonymous", "annotator", "reviewer", "lead", "lead_nopod", "admin", "disabled")
USERS = {  # role -> (username, role in the platform, pod)
    "annotator": ("ann", "annotator", "pod1"),
    "reviewer": ("rev", "reviewer", "pod1"),
    "lead": ("lead", "lead", "pod1"),
    "lead_nopod": ("loner", "lead", None),
    "admin": ("admin", "admin", None),
    "disabled": ("gone", "annotator", "pod1"),
}
TO_LOGIN = (303, "/login")  # a page's answer to a missing or dead session


def E(anon, annotator, reviewer, lead, lead_nopod, admin, disabled) -> dict[str, Any]:  # noqa: N802
    """Expected outcome per role, in `ROLES` order: a status, or (status, start of the Location header)."""
    return dict(zip(ROLES, (anon, annotator, reviewer, lead, lead_nopod, admin, disabled), strict=True))


def every(code: Any) -> dict[str, Any]:
    return dict.fromkeys(ROLES, code)


def api(signed_in: Any, anon: Any = 401) -> dict[str, Any]:
    """An authenticated API route every role may call: 401 without (or with a disabled user's) token."""
    return E(anon, signed_in, signed_in, signed_in, signed_in, signed_in, anon)


def managers(ok: Any, lead_nopod: Any = None) -> dict[str, Any]:
    """Leads and admins only (`MANAGERS`); annotators and reviewers 403."""
    return E(401, 403, 403, ok, ok if lead_nopod is None else lead_nopod, ok, 401)


def admin_only(ok: Any) -> dict[str, Any]:
    return E(401, 403, 403, 403, 403, ok, 401)


def pages(signed_in: Any) -> dict[str, Any]:
    return E(TO_LOGIN, signed_in, signed_in, signed_in, signed_in, signed_in, TO_LOGIN)


def page_managers(ok: Any, lead_nopod: Any = None) -> dict[str, Any]:
    return E(TO_LOGIN, 403, 403, ok, ok if lead_nopod is None else lead_nopod, ok, TO_LOGIN)


@dataclass
class Row:
    expect: dict[str, Any]
    # Request keyword arguments for httpx (json=, data=, params=), or a function of the role giving them.
    body: dict[str, Any] | Callable[[str], dict[str, Any]] = field(default_factory=dict)


def _items(role: str) -> dict[str, Any]:
    return {"json": {"items": pair_items(1, prefix=f"new-{role}-")}}


def _jsonl(role: str) -> dict[str, Any]:
    row = pair_items(1, prefix=f"form-{role}-")[0]
    import json

    return {"data": {"jsonl": json.dumps(row)}}


def _login(role: str) -> dict[str, Any]:
    return {"json": {"username": USERS.get(role, ("nobody",))[0], "password": PASSWORD}}


def _form_login(role: str) -> dict[str, Any]:
    return {"data": {"username": USERS.get(role, ("nobody",))[0], "password": PASSWORD}, "login_form": True}


DIMENSIONS = ("accuracy", "professionalism", "conciseness", "empathy")


def _answer_json(role: str) -> dict[str, Any]:
    task = {"schema_version": 1, "schema": {"dimensions": DIMENSIONS}}
    return {"json": {"client_id": f"api-{role}-1", "answer": answer(task)}}


def _answer_form(role: str) -> dict[str, Any]:
    dims = {f"dim_{d}": "left" for d in DIMENSIONS}
    data = {"project": "p", "mode": "annotate", "schema_version": "1", "client_id": f"form-{role}-1"}
    return {"data": {**data, "choice": "left", "strength": "2", **dims}}


V1 = "/api/v1"
MATRIX: dict[tuple[str, str], Row] = {
    ("GET", f"{V1}/openapi.json"): Row(every(200)),
    ("GET", "/static"): Row(every(200)),  # requested as /static/app.js
    ("GET", f"{V1}/health"): Row(every(200)),
    ("POST", f"{V1}/auth/login"): Row(api(200), _login),
    ("POST", f"{V1}/auth/logout"): Row(api(200)),
    ("GET", f"{V1}/me"): Row(api(200)),
    ("GET", f"{V1}/projects"): Row(api(200)),
    ("POST", f"{V1}/projects"): Row(admin_only(201), {"json": {"name": "new", "guideline": "# G"}}),
    ("GET", f"{V1}/projects/{{name}}"): Row(api(200)),
    ("GET", f"{V1}/projects/{{name}}/guideline"): Row(api(200)),
    ("POST", f"{V1}/projects/{{name}}/guidelines"): Row(managers(201), {"json": {"body_md": "# G2"}}),
    ("POST", f"{V1}/projects/{{name}}/schemas"): Row(admin_only(201), {"json": {"spec": {}}}),
    ("POST", f"{V1}/projects/{{name}}/items"): Row(managers(201), _items),
    ("GET", f"{V1}/projects/{{name}}/items/{{item_id}}/gold"): Row(managers(200)),
    ("POST", f"{V1}/items/{{item_pk}}/ambiguous"): Row(managers(200)),
    ("GET", f"{V1}/projects/{{name}}/queue"): Row(managers(200)),
    ("GET", f"{V1}/projects/{{name}}/throughput"): Row(managers(200)),
    ("GET", f"{V1}/projects/{{name}}/quality"): Row(managers(200)),
    ("POST", f"{V1}/projects/{{name}}/qc/evaluate"): Row(managers(200)),
    ("POST", f"{V1}/projects/{{name}}/export"): Row(admin_only(200), {"json": {"method": "majority_vote"}}),
    # The annotator resumes their lease; no QA item waits for the reviewer; leads and admins annotate too.
    ("POST", f"{V1}/projects/{{name}}/next"): Row(E(401, 200, 204, 200, 200, 200, 401)),
    # The open assignment is the annotator's: to everyone else it does not exist.
    ("POST", f"{V1}/assignments/{{assignment_id}}/submit"): Row(
        E(401, 201, 404, 404, 404, 404, 401),
        _answer_json,
    ),
    ("POST", f"{V1}/assignments/{{assignment_id}}/skip"): Row(
        E(401, 200, 404, 404, 404, 404, 401), {"json": {"reason": "not my language"}}
    ),
    ("GET", f"{V1}/projects/{{name}}/progress"): Row(api(200)),
    # The annotator's response: themselves, the lead of their pod, an admin; 404 (not 403) for the rest.
    ("GET", f"{V1}/responses/{{response_id}}"): Row(E(401, 200, 404, 200, 404, 200, 401)),
    ("GET", f"{V1}/users"): Row(managers(200)),
    ("POST", f"{V1}/users"): Row(
        admin_only(201), {"json": {"username": "newbie", "password": PASSWORD, "role": "annotator"}}
    ),
    ("POST", f"{V1}/users/{{username}}/disable"): Row(admin_only(200)),
    # Tokens for the annotator: themselves or an admin.
    ("POST", f"{V1}/users/{{username}}/tokens"): Row(
        E(401, 201, 403, 403, 403, 201, 401), {"json": {"name": "t", "scopes": ["read"]}}
    ),
    ("DELETE", f"{V1}/tokens/{{token_id}}"): Row(E(401, 200, 404, 404, 404, 200, 401)),
    # `can_manage`: the lead of the annotator's pod and admins; a lead without a pod manages no one.
    ("POST", f"{V1}/users/{{username}}/qc"): Row(
        managers(201, lead_nopod=403), {"json": {"action": "coach"}}
    ),
    ("POST", f"{V1}/qc/{{action_id}}/revert"): Row(managers(200, lead_nopod=403)),
    ("GET", f"{V1}/journal"): Row(admin_only(200)),
    # ---------------------------------------------------------------------------------------------- pages
    ("GET", "/login"): Row(every(200)),
    ("POST", "/login"): Row(E(401, 303, 303, 303, 303, 303, 401), _form_login),
    ("POST", "/logout"): Row(every(TO_LOGIN)),
    ("GET", "/"): Row(
        E(
            TO_LOGIN,
            (303, "/annotate"),
            (303, "/review"),
            (303, "/admin"),
            (303, "/admin"),
            (303, "/admin"),
            TO_LOGIN,
        )  # fmt: skip
    ),
    ("GET", "/annotate"): Row(pages(200), {"params": {"project": "p"}}),
    ("GET", "/review"): Row(E(TO_LOGIN, 403, 200, 200, 200, 200, TO_LOGIN), {"params": {"project": "p"}}),
    ("POST", "/tasks/next"): Row(
        E(
            TO_LOGIN,
            (303, "/annotate?project=p"),
            (303, "/annotate?project=p&done=1"),
            (303, "/annotate"),
            (303, "/annotate"),
            (303, "/annotate"),
            TO_LOGIN,
        ),  # fmt: skip
        {"data": {"project": "p", "mode": "annotate"}},
    ),
    ("POST", "/tasks/{assignment_id}/submit"): Row(
        E(TO_LOGIN, (303, "/annotate"), 404, 404, 404, 404, TO_LOGIN), _answer_form
    ),
    ("POST", "/tasks/{assignment_id}/skip"): Row(
        E(TO_LOGIN, (303, "/annotate"), 404, 404, 404, 404, TO_LOGIN),
        {"data": {"project": "p", "reason": "not my language"}},
    ),
    ("GET", "/admin"): Row(page_managers(200)),
    ("GET", "/runs"): Row(page_managers(200)),
    ("GET", "/runs/{run_id}"): Row(page_managers(200)),
    ("GET", "/favicon.ico"): Row(every(200)),
    ("POST", "/admin/projects"): Row(
        E(TO_LOGIN, 403, 403, 403, 403, (303, "/admin/projects/made"), TO_LOGIN),
        {"data": {"name": "made", "guideline": "# G"}},
    ),
    ("GET", "/admin/projects/{name}"): Row(page_managers(200)),
    ("GET", "/admin/projects/{name}/queue"): Row(page_managers(200)),
    ("POST", "/admin/projects/{name}/items"): Row(page_managers((303, "/admin/projects/p?notice=")), _jsonl),
    ("POST", "/admin/projects/{name}/qc-evaluate"): Row(page_managers((303, "/admin/projects/p?notice="))),
    ("POST", "/admin/qc/{action_id}/revert"): Row(page_managers((303, "/admin"), lead_nopod=403)),
}


def app_routes(app) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves (HEAD aside; a mount counts as GET on its prefix)."""
    out = set()
    for ctx in iter_route_contexts(app.routes):
        for method in ctx.methods or {"GET"}:
            if method != "HEAD":
                out.add((method, ctx.path))
    return out


@dataclass
class World:
    workspace: Workspace
    tokens: dict[str, str]
    sessions: dict[str, tuple[str, str]]  # role -> (session cookie, CSRF token)
    ids: dict[str, Any]


def build_world(workspace, s) -> World:
    for username, role, pod in USERS.values():
        services.add_user(s, username, PASSWORD, role, pod=pod)
    services.create_project(s, "p", "# Guide", overlap=3, gold_rate=0.0, qa_rate=0.0)
    services.import_items(s, "p", pair_items(3))
    first = services.next_task(s, "ann", "p")
    resp = services.submit(s, "ann", first["assignment_id"], answer(first), "world-client-1")
    open_task = services.next_task(s, "ann", "p")
    action = services.apply_qc(s, None, "ann", "coach", "world")
    tokens, sessions = {}, {}
    for role, (username, _, _) in USERS.items():
        row, raw = services.create_token(s, None, username, "matrix", list(auth.SCOPES))
        tokens[role] = raw
        if role == "annotator":
            ann_token_id = row.id
        _, cookie, csrf = auth.login(s, username, PASSWORD, "127.0.0.1")
        s.commit()
        sessions[role] = (cookie, csrf)
    services.set_disabled(s, "gone", True)
    from alignflow.store import Store

    store = Store.open(workspace)
    try:
        run_id = store.start_run("sft", config={"train": {"max_steps": 2}}, name="matrix-run")
        store.log_metrics(run_id, 1, {"loss": 1.0})
    finally:
        store.close()
    ids = {
        "run_id": run_id,
        "name": "p",
        "item_id": "i1",
        "item_pk": s.query(Item.id).filter(Item.external_id == "i2").scalar(),
        "assignment_id": open_task["assignment_id"],
        "response_id": resp.response_id,
        "username": "ann",
        "token_id": ann_token_id,
        "action_id": action.id,
    }
    return World(workspace, tokens, sessions, ids)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    """The world, built once per database (users, sessions and tokens are rows, so copies of it share them)."""
    root = tmp_path_factory.mktemp(f"world-{request.param}")
    if request.param == "sqlite":
        schema = f"sqlite:///{request.getfixturevalue('sqlite_template')}"
    else:
        schema = pg_url_for(request.getfixturevalue("pg_template"))
    url = copy_database(schema, root)
    ws = Workspace(home=root / "ws", db_url=url)
    ws.ensure_dirs()
    factory = services.connect(ws)
    with factory() as s:
        world = build_world(ws, s)
    factory.kw["bind"].dispose()  # a PostgreSQL template must have no connections
    yield world
    if not ws.is_sqlite:
        drop_pg(make_url(url).database)


@pytest.fixture
def world(world_template: World, tmp_path: Path) -> Iterator[World]:
    """A fresh copy of the world (its database and its workspace folder) for one test."""
    src = world_template.workspace
    home = tmp_path / "ws"
    shutil.copytree(src.home, home)
    url = copy_database(src.db_url, tmp_path)
    yield World(
        Workspace(home=home, db_url=url), world_template.tokens, world_template.sessions, world_template.ids
    )
    if not src.is_sqlite:
        drop_pg(make_url(url).database)


def call(world: World, app: Any, method: str, path: str, role: str, row: Row) -> Any:
    kwargs = dict(row.body(role) if callable(row.body) else row.body)
    url = "/static/app.js" if path == "/static" else path.format(**world.ids)
    client = TestClient(app, follow_redirects=False)
    is_page = not url.startswith("/api/")
    if kwargs.pop("login_form", False):
        import re

        page = client.get("/login").text
        kwargs["data"]["login_csrf"] = re.search(r'name="login_csrf" value="([^"]+)"', page).group(1)
    elif role != "anonymous" and is_page:
        cookie, csrf = world.sessions[role]
        client.cookies.set(SESSION_COOKIE, cookie)
        if method == "POST":
            kwargs["data"] = {**kwargs.get("data", {}), "csrf_token": csrf}
    elif role != "anonymous":
        client.headers["Authorization"] = f"Bearer {world.tokens[role]}"
    return client.request(method, url, **kwargs)


def test_every_route_is_declared(workspace):
    app = create_app(workspace)
    served = app_routes(app)
    undeclared = sorted(served - MATRIX.keys())
    stale = sorted(MATRIX.keys() - served)
    assert not undeclared, f"routes without a row in MATRIX: {undeclared}"
    assert not stale, f"rows in MATRIX for routes the app no longer serves: {stale}"
    assert len(served) * len(ROLES) >= 52 * 7  # 52 routes x 7 roles when this test was last extended


@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0]} {r[1]}")
def test_route_matches_the_matrix(route, world):
    method, path = route
    row = MATRIX[route]
    app = create_app(world.workspace)
    violations = []
    for role in ROLES:
        r = call(world, app, method, path, role, row)
        want = row.expect[role]
        status, where = want if isinstance(want, tuple) else (want, None)
        got_where = r.headers.get("location", "")
        if r.status_code != status or (where is not None and not got_where.startswith(where)):
            violations.append(f"{role}: expected {want}, got {r.status_code} {got_where or r.text[:120]}")
    assert not violations, "\n".join(violations)
