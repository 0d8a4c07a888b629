"""Every /api/v1 route, authorization included, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, answer, make_users, pair_items
from sqlalchemy import func, select

from alignflow.feedback import services
from alignflow.feedback.app import Settings, create_app
from alignflow.feedback.models import JournalEntry, Response

USERS = {
    "admin": ("admin", None),
    "lead": ("lead", "pod1"),
    "ann1": ("annotator", "pod1"),
    "ann2": ("annotator", "pod2"),
    "rev": ("reviewer", None),
}


@pytest.fixture
def app(workspace, s):
    make_users(s, USERS)
    return create_app(workspace, Settings(max_body_bytes=20_000))


def login(app, name: str) -> TestClient:
    c = TestClient(app)
    r = c.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return c


def _project(c: TestClient, name="p1", n=3, **kw) -> None:
    body = {
        "name": name,
        "guideline": "# Rules\nBe accurate.",
        "overlap": 2,
        "gold_rate": 0.0,
        "qa_rate": 0.0,
        **kw,
    }
    assert c.post("/api/v1/projects", json=body).status_code == 201
    r = c.post(f"/api/v1/projects/{name}/items", json={"items": pair_items(n, gold=1)})
    assert r.status_code == 201 and r.json() == {"imported": n + 1}


def _do_task(c: TestClient, project="p1", choice="left") -> tuple[dict, dict]:
    task = c.post(f"/api/v1/projects/{project}/next").json()
    r = c.post(
        f"/api/v1/assignments/{task['assignment_id']}/submit",
        json={"client_id": f"cid-{task['assignment_id']}", "answer": answer(task, choice)},
    )
    assert r.status_code == 201, r.text
    return task, r.json()


def test_login_cookie_flags_rate_limit_and_csrf(app):
    c = TestClient(app)
    r = c.post("/api/v1/auth/login", json={"username": "ann1", "password": PASSWORD})
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    assert c.get("/api/v1/me").json()["username"] == "ann1"
    # A cookie-authenticated write without the CSRF header is refused.
    assert c.post("/api/v1/projects/x/next").status_code == 403
    assert c.post("/api/v1/auth/logout", headers={"X-CSRF-Token": r.json()["csrf_token"]}).status_code == 200
    assert c.get("/api/v1/me").status_code == 401
    bad = TestClient(app)
    codes = [
        bad.post("/api/v1/auth/login", json={"username": "ann2", "password": "wrong-password"}).status_code
        for _ in range(6)
    ]
    assert codes == [401] * 5 + [429]
    # Even the right password is refused while rate limited.
    assert bad.post("/api/v1/auth/login", json={"username": "ann2", "password": PASSWORD}).status_code == 429
    assert (
        bad.post("/api/v1/auth/login", json={"username": "nobody", "password": PASSWORD}).status_code == 401
    )


def test_project_routes_and_roles(app):
    admin, lead, ann = login(app, "admin"), login(app, "lead"), login(app, "ann1")
    assert ann.post("/api/v1/projects", json={"name": "x", "guideline": "g"}).status_code == 403
    _project(admin)
    assert admin.post("/api/v1/projects", json={"name": "p1", "guideline": "g"}).status_code == 409
    assert [p["name"] for p in ann.get("/api/v1/projects").json()] == ["p1"]
    info = ann.get("/api/v1/projects/p1").json()
    assert info["schema"]["dimensions"] == ["accuracy", "professionalism", "conciseness", "empathy"]
    assert ann.get("/api/v1/projects/nope").status_code == 404
    assert ann.get("/api/v1/projects/p1/guideline").json()["version"] == 1
    assert ann.post("/api/v1/projects/p1/guidelines", json={"body_md": "v2"}).status_code == 403
    assert lead.post("/api/v1/projects/p1/guidelines", json={"body_md": "# v2"}).json() == {"version": 2}
    assert ann.get("/api/v1/projects/p1/guideline").json()["body_md"] == "# v2"
    assert lead.post("/api/v1/projects/p1/schemas", json={"spec": {}}).status_code == 403
    assert admin.post("/api/v1/projects/p1/schemas", json={"spec": {"dimensions": ["accuracy"]}}).json() == {
        "version": 2
    }
    assert ann.post("/api/v1/projects/p1/items", json={"items": pair_items(1, "z")}).status_code == 403
    # Gold answers: hidden from annotators, visible to leads.
    assert ann.get("/api/v1/projects/p1/items/igold0/gold").status_code == 403
    assert lead.get("/api/v1/projects/p1/items/igold0/gold").json()["gold_label"] == "A"
    assert ann.post("/api/v1/items/1/ambiguous").status_code == 403
    assert lead.post("/api/v1/items/1/ambiguous").json()["tier"] == "expert"
    spec = admin.get("/api/v1/openapi.json").json()
    assert "/api/v1/assignments/{assignment_id}/submit" in spec["paths"]


def test_task_flow_idempotency_and_progress(app):
    admin, ann = login(app, "admin"), login(app, "ann1")
    _project(admin, schema={"dimensions": ["accuracy"]})
    task = ann.post("/api/v1/projects/p1/next").json()
    assert ann.post("/api/v1/projects/p1/next").json()["assignment_id"] == task["assignment_id"]  # resumes
    assert "gold" not in str(task).lower() and "model" not in {k for c in task["candidates"] for k in c}
    body = {"client_id": "client-0001", "answer": answer(task)}
    r1 = ann.post(f"/api/v1/assignments/{task['assignment_id']}/submit", json=body)
    r2 = ann.post(f"/api/v1/assignments/{task['assignment_id']}/submit", json=body)
    assert (r1.status_code, r2.status_code) == (201, 200) and r1.json()["response_id"] == r2.json()[
        "response_id"
    ]
    t2 = ann.post("/api/v1/projects/p1/next").json()
    assert ann.post(f"/api/v1/assignments/{t2['assignment_id']}/skip", json={"reason": ""}).status_code == 422
    assert (
        ann.post(f"/api/v1/assignments/{t2['assignment_id']}/skip", json={"reason": "unclear"}).status_code
        == 200
    )
    assert ann.get("/api/v1/projects/p1/progress").json() == {"done": 1, "skipped": 1}
    while (r := ann.post("/api/v1/projects/p1/next")).status_code == 200:
        t = r.json()
        ann.post(
            f"/api/v1/assignments/{t['assignment_id']}/submit",
            json={"client_id": f"c-{t['assignment_id']}", "answer": answer(t)},
        )
    assert r.status_code == 204


def test_response_visibility(app):
    admin, lead, ann1, ann2, rev = (login(app, n) for n in ("admin", "lead", "ann1", "ann2", "rev"))
    _project(admin, qa_rate=1.0)
    _, mine = _do_task(ann1)
    rid = mine["response_id"]
    assert ann1.get(f"/api/v1/responses/{rid}").status_code == 200
    # Another annotator's answer reads as missing (404, like an id that does not exist), so ids cannot be probed.
    assert ann2.get(f"/api/v1/responses/{rid}").status_code == 404
    assert ann2.get(f"/api/v1/responses/{rid + 1000}").status_code == 404
    assert lead.get(f"/api/v1/responses/{rid}").status_code == 200  # the lead of ann1's pod
    assert rev.get(f"/api/v1/responses/{rid}").status_code == 404  # not (yet) a QA task of this reviewer
    assert admin.get(f"/api/v1/responses/{rid}").status_code == 200
    rt = rev.post("/api/v1/projects/p1/next").json()
    assert rt["kind"] == "review" and rt["original"]["response_id"] == rid  # reviewers get QA items only
    assert rev.get(f"/api/v1/responses/{rid}").status_code == 200
    r = rev.post(
        f"/api/v1/assignments/{rt['assignment_id']}/submit",
        json={"client_id": "rev-000001", "answer": {"review_action": "accept"}},
    )
    assert r.status_code == 201
    assert rev.post("/api/v1/projects/p1/next").status_code == 204  # nothing else sampled yet


def test_monitoring_qc_and_journal(app):
    admin, lead, ann1, ann2 = (login(app, n) for n in ("admin", "lead", "ann1", "ann2"))
    _project(admin)
    _do_task(ann1)
    _do_task(ann2)
    for path in ("queue", "throughput", "quality"):
        assert ann1.get(f"/api/v1/projects/p1/{path}").status_code == 403
    q = lead.get("/api/v1/projects/p1/queue").json()
    assert q["submitted"] == 2 and q["items"] == 3
    assert [r["annotator"] for r in lead.get("/api/v1/projects/p1/throughput").json()] == ["ann1"]  # own pod
    assert len(admin.get("/api/v1/projects/p1/throughput").json()) == 2
    # Quality, like throughput, names only the lead's own pod (issue 18: it used to list ann2 of pod2).
    quality = lead.get("/api/v1/projects/p1/quality").json()
    assert quality["n_judgments"] == 2 and [a["annotator_id"] for a in quality["annotators"]] == ["ann1"]
    everyone = admin.get("/api/v1/projects/p1/quality").json()["annotators"]
    assert {a["annotator_id"] for a in everyone} == {"ann1", "ann2"}
    assert lead.post("/api/v1/projects/p1/qc/evaluate").status_code == 200
    assert lead.post("/api/v1/users/ann2/qc", json={"action": "suspend"}).status_code == 403  # other pod
    act = lead.post("/api/v1/users/ann1/qc", json={"action": "suspend", "reason": "test"}).json()
    assert ann1.post("/api/v1/projects/p1/next").status_code == 403
    assert lead.post(f"/api/v1/qc/{act['id']}/revert").json()["user_qc_state"] == "active"
    assert ann1.post("/api/v1/projects/p1/next").status_code == 200
    assert lead.get("/api/v1/journal").status_code == 403
    actions = [j["action"] for j in admin.get("/api/v1/journal?limit=500").json()]
    assert {"qc.suspend", "qc.revert", "response.submit", "project.create", "items.import"} <= set(actions)


def test_users_tokens_and_disable(app, s):
    admin, lead, ann = login(app, "admin"), login(app, "lead"), login(app, "ann1")
    _project(admin)
    assert {u["username"] for u in lead.get("/api/v1/users").json()} == {"lead", "ann1"}
    assert ann.get("/api/v1/users").status_code == 403
    new = {"username": "ann3", "password": PASSWORD, "role": "annotator", "pod": "pod1"}
    assert lead.post("/api/v1/users", json=new).status_code == 403
    assert admin.post("/api/v1/users", json=new).status_code == 201
    assert admin.post("/api/v1/users", json={**new, "role": "boss"}).status_code == 422
    # Scoped tokens: a read-only token cannot annotate.
    ro = ann.post("/api/v1/users/ann1/tokens", json={"name": "ro", "scopes": ["read"]}).json()
    assert ann.post("/api/v1/users/lead/tokens", json={"name": "x", "scopes": ["read"]}).status_code == 403
    assert ann.post("/api/v1/users/ann1/tokens", json={"name": "m", "scopes": ["manage"]}).status_code == 403
    full = ann.post("/api/v1/users/ann1/tokens", json={"name": "bot", "scopes": ["annotate", "read"]}).json()
    bearer = TestClient(app)
    h_ro, h_full = {"Authorization": f"Bearer {ro['token']}"}, {"Authorization": f"Bearer {full['token']}"}
    assert bearer.get("/api/v1/me", headers=h_ro).json()["via"] == "token"
    assert bearer.post("/api/v1/projects/p1/next", headers=h_ro).status_code == 403
    assert bearer.post("/api/v1/projects/p1/next", headers=h_full).status_code == 200  # no CSRF for bearer
    # Tokens are stored hashed.
    from alignflow.feedback.models import ApiToken

    assert full["token"] not in {t.token_hash for t in s.scalars(select(ApiToken))}
    assert ann.delete(f"/api/v1/tokens/{ro['id']}").status_code == 200
    assert bearer.get("/api/v1/me", headers=h_ro).status_code == 401  # revoked at once
    # Disabling stops the live session and every token on the next request.
    assert ann.get("/api/v1/me").status_code == 200
    assert admin.post("/api/v1/users/ann1/disable").json()["disabled"] is True
    assert ann.get("/api/v1/me").status_code == 401
    assert bearer.get("/api/v1/me", headers=h_full).status_code == 401
    assert (
        TestClient(app)
        .post("/api/v1/auth/login", json={"username": "ann1", "password": PASSWORD})
        .status_code
        == 401
    )


def test_bad_input_is_4xx_and_writes_nothing(app, s):
    admin, ann1, ann2 = login(app, "admin"), login(app, "ann1"), login(app, "ann2")
    _project(admin, schema={"rationale_min_chars": 10})
    task = ann1.post("/api/v1/projects/p1/next").json()
    other = ann2.post("/api/v1/projects/p1/next").json()
    url = f"/api/v1/assignments/{task['assignment_id']}/submit"
    good = answer(task)

    def n_written() -> tuple[int, int]:
        s.expire_all()
        s.rollback()
        return (
            s.scalar(select(func.count()).select_from(Response)),
            s.scalar(
                select(func.count()).select_from(JournalEntry).where(JournalEntry.action == "response.submit")
            ),
        )

    cases = [
        (
            "malformed JSON",
            dict(
                content=b'{"client_id": "abcdefgh", "answer": {', headers={"Content-Type": "application/json"}
            ),
            422,
            "json",
        ),
        (
            "unknown top-level field",
            dict(json={"client_id": "abcdefgh", "answer": good, "extra": 1}),
            422,
            "extra",
        ),
        (
            "unknown answer field",
            dict(json={"client_id": "abcdefgh", "answer": {**good, "colour": "red"}}),
            422,
            "colour",
        ),
        (
            "wrong schema version",
            dict(json={"client_id": "abcdefgh", "answer": {**good, "schema_version": 7}}),
            422,
            "schema version 1",
        ),
        (
            "missing dimension",
            dict(json={"client_id": "abcdefgh", "answer": {**good, "dimensions": {}}}),
            422,
            "dimensions.accuracy",
        ),
        (
            "short rationale",
            dict(json={"client_id": "abcdefgh", "answer": {**good, "rationale": "meh"}}),
            422,
            "rationale",
        ),
        (
            "unknown failure tag",
            dict(json={"client_id": "abcdefgh", "answer": {**good, "failure_tags": {"0": ["rude"]}}}),
            422,
            "rude",
        ),
        (
            "oversized payload",
            dict(json={"client_id": "abcdefgh", "answer": {**good, "rationale": "x" * 30_000}}),
            413,
            "larger than 20000",
        ),
    ]
    for name, kwargs, status, needle in cases:
        r = ann1.post(url, **kwargs)
        assert r.status_code == status, (name, r.text)
        assert needle.lower() in r.text.lower(), (name, r.text)
        assert n_written() == (0, 0), name
    # A response for an item assigned to someone else.
    r = ann1.post(
        f"/api/v1/assignments/{other['assignment_id']}/submit", json={"client_id": "abcdefgh", "answer": good}
    )
    assert r.status_code == 404 and "not assigned to you" in r.json()["detail"]
    r = ann1.post("/api/v1/assignments/does-not-exist/submit", json={"client_id": "abcdefgh", "answer": good})
    assert r.status_code == 404
    assert n_written() == (0, 0)
    assert ann1.post(url, json={"client_id": "abcdefgh", "answer": good}).status_code == 201
    assert n_written() == (1, 1)


def test_services_refuse_bad_items(s):
    p = services.create_project(s, "p", "g")
    with pytest.raises(services.Invalid, match="row 2: field 'candidates'"):
        services.import_items(
            s, p, [pair_items(1)[0], {"id": "x", "prompt": "p", "candidates": ["only one"]}]
        )
    with pytest.raises(services.Invalid, match="unknown field"):
        services.import_items(s, p, [{**pair_items(1)[0], "colour": 1}])
    assert services.queue_state(s, p)["items"] == 0


def test_health_export_and_enable_routes(app):
    anon = TestClient(app)
    assert anon.get("/api/v1/health").json() == {"status": "ok"}
    admin, lead, ann1, ann2 = (login(app, n) for n in ("admin", "lead", "ann1", "ann2"))
    _project(admin)
    assert admin.post("/api/v1/projects/p1/export", json={}).status_code == 409  # nothing annotated yet
    _do_task(ann1)
    _do_task(ann2, choice="right")
    assert lead.post("/api/v1/projects/p1/export", json={}).status_code == 403
    assert admin.post("/api/v1/projects/p1/export", json={"method": "nonsense"}).status_code == 422
    out = admin.post("/api/v1/projects/p1/export", json={"method": "majority_vote"}).json()
    assert out["n_judgments"] == 2 and out["n_pairs"] >= 1 and len(out["preferences"]) == 64
    assert admin.post("/api/v1/users/ann2/disable").json()["disabled"] is True
    assert admin.post("/api/v1/users/ann2/disable?disabled=false").json()["disabled"] is False
    assert ann2.get("/api/v1/me").status_code == 401  # the old session stays ended
    assert login(app, "ann2").get("/api/v1/me").status_code == 200
