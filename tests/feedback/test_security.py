"""Issue 18's findings in the web service, each through the HTTP API or the pages, on SQLite and PostgreSQL."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, make_users, pair_items
from sqlalchemy import func, select

from alignflow.feedback import services
from alignflow.feedback.app import Settings, create_app
from alignflow.feedback.models import Item, JournalEntry, Project, QcAction, User

USERS = {
    "admin": ("admin", None),
    "lead1": ("lead", "pod1"),
    "lead1b": ("lead", "pod1"),
    "loner": ("lead", None),
    "ann1": ("annotator", "pod1"),
    "ann2": ("annotator", "pod2"),
    "stray": ("annotator", None),
    "rev1": ("reviewer", "pod1"),
}


@pytest.fixture
def app(workspace, s):
    make_users(s, USERS)
    return create_app(workspace, Settings(max_body_bytes=50_000))


def api_login(app, name: str) -> TestClient:
    c = TestClient(app)
    r = c.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return c


def page_login(app, name: str) -> tuple[TestClient, str]:
    c = TestClient(app, follow_redirects=False)
    token = re.search(r'name="login_csrf" value="([^"]+)"', c.get("/login").text).group(1)
    assert (
        c.post("/login", data={"username": name, "password": PASSWORD, "login_csrf": token}).status_code
        == 303
    )
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/annotate").text).group(1)
    return c, csrf


def _qc(s, username: str, action: str = "restrict") -> int:
    return services.apply_qc(s, None, username, action, "test").id


def test_qc_revert_page_form_uses_the_one_lead_rule(app, s):
    """High: the page form checked only `target.pod != lead.pod`; it now refuses what the API refuses."""
    on_lead = _qc(s, "lead1b")  # another lead of the same pod
    on_stray = _qc(s, "stray")  # a pod-less annotator
    on_admin = _qc(s, "admin")
    on_ann1 = _qc(s, "ann1")
    lead, csrf = page_login(app, "lead1")
    loner, loner_csrf = page_login(app, "loner")
    assert lead.post(f"/admin/qc/{on_lead}/revert", data={"csrf_token": csrf}).status_code == 403
    assert loner.post(f"/admin/qc/{on_stray}/revert", data={"csrf_token": loner_csrf}).status_code == 403
    assert loner.post(f"/admin/qc/{on_admin}/revert", data={"csrf_token": loner_csrf}).status_code == 403
    s.expire_all()
    assert s.scalar(select(func.count()).select_from(QcAction).where(QcAction.reverted_at.is_not(None))) == 0
    assert lead.post(f"/admin/qc/{on_ann1}/revert", data={"csrf_token": csrf}).status_code == 303
    s.expire_all()
    assert s.get(User, s.scalar(select(QcAction.user_id).where(QcAction.id == on_ann1))).qc_state == "active"
    # The API route answers the same three cases the same way.
    api_lead, api_loner = api_login(app, "lead1"), api_login(app, "loner")
    assert api_lead.post(f"/api/v1/qc/{on_lead}/revert").status_code == 403
    assert api_loner.post(f"/api/v1/qc/{on_stray}/revert").status_code == 403
    assert api_loner.post(f"/api/v1/qc/{on_admin}/revert").status_code == 403
    assert api_loner.post("/api/v1/users/stray/qc", json={"action": "coach"}).status_code == 403


def test_lead_without_pod_lists_only_themselves(app):
    """Medium: `pod IS NULL` matched the admins and every other pod-less account."""
    assert [u["username"] for u in api_login(app, "loner").get("/api/v1/users").json()] == ["loner"]
    assert [u["username"] for u in api_login(app, "lead1").get("/api/v1/users").json()] == ["lead1", "ann1"]
    assert len(api_login(app, "admin").get("/api/v1/users").json()) == len(USERS)


def test_lead_quality_page_is_pod_scoped(app, s):
    """Medium: /admin/projects/{p} listed annotators of other pods in the quality table."""
    services.create_project(s, "qp", "# G", overlap=3, gold_rate=0.0, qa_rate=0.0)
    services.import_items(s, "qp", pair_items(2))
    from fb_helpers import answer

    for name in ("ann1", "ann2", "stray"):
        t = services.next_task(s, name, "qp")
        services.submit(s, name, t["assignment_id"], answer(t), f"{name}-client-1")
    lead, _ = page_login(app, "lead1")
    quality = lead.get("/admin/projects/qp").text.split('id="quality"', 1)[1]
    assert "ann1" in quality and "ann2" not in quality and "stray" not in quality
    loner, _ = page_login(app, "loner")
    quality = loner.get("/admin/projects/qp").text.split('id="quality"', 1)[1]
    assert not {"ann1", "ann2", "stray"} & set(re.findall(r"ann\d|stray", quality))
    report = api_login(app, "loner").get("/api/v1/projects/qp/quality").json()
    assert report["n_judgments"] == 3 and report["annotators"] == []


def test_digit_project_names_are_names_not_ids(app, s):
    """Medium: `get_project` read "1" as id 1, so items meant for project "1" landed in project id 1."""
    admin = api_login(app, "admin")
    for name in ("alpha", "1"):
        assert admin.post("/api/v1/projects", json={"name": name, "guideline": "# G"}).status_code == 201
    assert admin.post("/api/v1/projects/1/items", json={"items": pair_items(2)}).status_code == 201
    counts = dict(
        s.execute(select(Project.name, func.count(Item.id)).join(Item).group_by(Project.name)).all()
    )
    assert counts == {"1": 2}
    assert admin.get("/api/v1/projects/1").json()["name"] == "1"
    assert admin.get("/api/v1/projects/2").status_code == 404  # id 2 is project "1", but ids are not names


BIG = 2**63


def _bad_requests(item: dict) -> list[tuple[str, str, dict]]:
    """(method, path, kwargs) that used to answer 500 or store bad data; each must now be a 4xx."""
    rank_item = {"id": "r1", "prompt": "rank", "candidates": ["x", "y"]}
    return [
        ("GET", f"/api/v1/responses/{BIG}", {}),
        ("DELETE", f"/api/v1/tokens/{BIG}", {}),
        ("POST", f"/api/v1/items/{BIG}/ambiguous", {}),
        ("POST", f"/api/v1/qc/{BIG}/revert", {}),
        ("GET", "/api/v1/projects/p/guideline?version=" + str(BIG), {}),
        ("POST", "/api/v1/projects/p/items", {"json": {"items": [{**item, "priority": 10**20}]}}),
        ("POST", "/api/v1/projects", {"json": {"name": "big", "guideline": "g", "lease_seconds": 2**70}}),
        ("POST", "/api/v1/projects", {"json": {"name": "big", "guideline": "g", "lease_seconds": 10**18}}),
        ("POST", "/api/v1/projects/rank/items", {"json": {"items": [{**rank_item, "gold_label": 1}]}}),
        ("POST", "/api/v1/projects/rank/items", {"json": {"items": [{**rank_item, "gold_label": "yx"}]}}),
        (
            "POST",
            "/api/v1/projects/p/items",
            {"json": {"items": [{**item, "candidates": [{"text": "a", "sampling": "hot"}, "b"]}]}},
        ),  # fmt: skip
        (
            "POST",
            "/api/v1/projects/p/items",
            {"content": '{"items": [{"id": "s", "prompt": "\\ud800", "candidates": ["a", "b"]}]}'},
        ),  # fmt: skip
        ("POST", "/api/v1/projects/p/items", {"json": {"items": [{**item, "prompt": "a\x00b"}]}}),
        ("POST", "/api/v1/projects/p/items", {"json": {"items": [{**item, "id": "x" * 129}]}}),
        ("POST", "/api/v1/projects/p/items", {"json": {"items": [{**item, "id": "x" * 200}]}}),
        (
            "POST",
            "/api/v1/users",
            {"json": {"username": "u1", "password": PASSWORD, "role": "annotator", "pod": "p" * 65}},
        ),  # fmt: skip
        ("GET", "/api/v1/journal?limit=-1", {}),
        ("GET", "/api/v1/journal?action=a%00b", {}),
        ("GET", "/api/v1/projects/a%00b", {}),
        ("GET", "/api/v1/projects/p/items/a%00b/gold", {}),
        ("POST", "/api/v1/users/a%00b/disable", {}),
    ]


def test_bad_input_is_a_4xx_and_writes_nothing(app, s):
    """Medium/Low: each of these was a 500 (or, on SQLite, silently accepted); now a 4xx, same on both databases."""
    admin = api_login(app, "admin")
    admin.post("/api/v1/projects", json={"name": "p", "guideline": "# G"})
    spec = {"kind": "ranking", "max_candidates": 2, "dimensions": []}
    admin.post("/api/v1/projects", json={"name": "rank", "guideline": "# G", "schema": spec})
    before = s.scalar(select(func.count()).select_from(JournalEntry))
    for method, path, kwargs in _bad_requests(pair_items(1)[0]):
        r = admin.request(method, path, **kwargs)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
    s.expire_all()
    assert s.scalar(select(func.count()).select_from(JournalEntry)) == before
    assert s.scalar(select(func.count()).select_from(Item)) == 0
    # Without logging in: a NUL in the login username, by API and by form.
    anon = TestClient(app, follow_redirects=False)
    r = anon.post("/api/v1/auth/login", json={"username": "a\x00b", "password": PASSWORD})
    assert 400 <= r.status_code < 500
    token = re.search(r'name="login_csrf" value="([^"]+)"', anon.get("/login").text).group(1)
    r = anon.post("/login", data={"username": "a\x00b", "password": PASSWORD, "login_csrf": token})
    assert r.status_code == 401


def test_bad_task_input_is_a_4xx(app, s):
    """NUL in a skip reason and a client_id, a "²" failure-tag key, a lone surrogate in an answer."""
    services.create_project(s, "t", "# G", overlap=1, gold_rate=0.0, qa_rate=0.0)
    services.import_items(s, "t", pair_items(1))
    ann = api_login(app, "ann1")
    task = ann.post("/api/v1/projects/t/next").json()
    from fb_helpers import answer

    url = f"/api/v1/assignments/{task['assignment_id']}"
    good = answer(task)
    cases = [
        (f"{url}/skip", {"json": {"reason": "a\x00b"}}),
        (f"{url}/submit", {"json": {"client_id": "abc\x00defgh", "answer": good}}),
        (f"{url}/submit", {"json": {"client_id": "abcdefgh", "answer": {**good, "failure_tags": {"²": []}}}}),
        (f"{url}/submit", {"json": {"client_id": "abcdefgh", "answer": {**good, "rationale": "a\x00b"}}}),
        (f"{url}/submit", {"content": '{"client_id": "abcdefgh", "answer": {"rationale": "\\udc00"}}'}),
        ("/api/v1/assignments/a%00b/skip", {"json": {"reason": "nope"}}),
    ]
    for path, kwargs in cases:
        if "content" in kwargs:
            kwargs = {**kwargs, "headers": {"content-type": "application/json"}}
        r = ann.post(path, **kwargs)
        assert r.status_code in (404, 422), (path, r.status_code, r.text)
    assert services.progress(s, "ann1", "t") == {"done": 0, "skipped": 0}


def test_secure_cookies_and_hsts(workspace, s):
    make_users(s, {"ann": "annotator"})
    plain = TestClient(create_app(workspace))
    assert "strict-transport-security" not in plain.get("/login").headers
    secure = TestClient(create_app(workspace, Settings(secure_cookies=True)), base_url="https://testserver")
    page = secure.get("/login")
    assert page.headers["strict-transport-security"].startswith("max-age=")
    assert "secure" in page.headers["set-cookie"].lower()  # the login-CSRF cookie too
    r = secure.post("/api/v1/auth/login", json={"username": "ann", "password": PASSWORD})
    assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()


def test_recertify_is_not_announced_to_the_annotator(app, s):
    """Low: a user under `recertify` gets only gold items; /me and the page header used to say so."""
    _qc(s, "ann1", "recertify")
    ann = api_login(app, "ann1")
    assert ann.get("/api/v1/me").json()["qc_state"] == "restrict"
    page, _ = page_login(app, "ann1")
    assert "recertify" not in page.get("/annotate").text
    lead_view = {u["username"]: u for u in api_login(app, "lead1").get("/api/v1/users").json()}
    assert lead_view["ann1"]["qc_state"] == "recertify"  # the lead still sees the real state
