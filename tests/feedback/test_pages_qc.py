"""HTML pages' authorization and CSRF, the QC policy loop, generation-artifact import, migration in sync."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, answer, make_users, pair_items
from sqlalchemy import select

from alignflow.feedback import qc, services
from alignflow.feedback.app import create_app
from alignflow.feedback.models import JournalEntry, User
from alignflow.store import Store


def browser_login(app, name: str) -> tuple[TestClient, str]:
    c = TestClient(app, follow_redirects=False)
    page = c.get("/login").text
    token = re.search(r'name="login_csrf" value="([^"]+)"', page).group(1)
    r = c.post("/login", data={"username": name, "password": PASSWORD, "login_csrf": token})
    assert r.status_code == 303, r.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/annotate").text).group(1)
    return c, csrf


def test_pages_require_login_role_and_csrf(workspace, s):
    make_users(s, {"ann": "annotator", "lead": "lead", "rev": "reviewer"})
    services.create_project(s, "pg", "# Guide", overlap=1, gold_rate=0.0, qa_rate=0.0)
    services.import_items(s, "pg", pair_items(2))
    app = create_app(workspace)
    anon = TestClient(app, follow_redirects=False)
    assert anon.get("/annotate").headers["location"] == "/login"
    assert (
        anon.post("/login", data={"username": "ann", "password": PASSWORD}).status_code == 403
    )  # no login token
    ann, csrf = browser_login(app, "ann")
    assert ann.get("/").headers["location"] == "/annotate"
    assert ann.get("/admin").status_code == 403
    assert ann.get("/review").status_code == 403
    # A GET never leases (issue 18: it was a state change reachable cross-site); the Start form POSTs.
    page = ann.get("/annotate?project=pg")
    assert page.status_code == 200 and 'id="start"' in page.text and "/submit" not in page.text
    assert services.current_task(s, "ann", "pg") is None
    assert ann.post("/tasks/next", data={"project": "pg", "mode": "annotate"}).status_code == 403  # no CSRF
    assert services.current_task(s, "ann", "pg") is None
    r = ann.post("/tasks/next", data={"project": "pg", "mode": "annotate", "csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/annotate?project=pg"
    page = ann.get("/annotate?project=pg")
    assert page.status_code == 200 and "prompt" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    aid = re.search(r'action="/tasks/([^/]+)/submit"', page.text).group(1)
    form = {"project": "pg", "mode": "annotate", "schema_version": "1", "client_id": "form-client-1", "choice": "left",
            "strength": "2", **{f"dim_{d}": "left" for d in ("accuracy", "professionalism", "conciseness", "empathy")}}  # fmt: skip
    assert ann.post(f"/tasks/{aid}/submit", data=form).status_code == 403  # no CSRF token
    assert services.progress(s, "ann", "pg")["done"] == 0
    r = ann.post(f"/tasks/{aid}/submit", data={**form, "csrf_token": csrf})
    assert r.status_code == 303 and "error" not in r.headers["location"]
    assert services.progress(s, "ann", "pg")["done"] == 1
    # A form error comes back as a message on the page, nothing stored.
    page = ann.get("/annotate?project=pg").text
    aid2 = re.search(r'action="/tasks/([^/]+)/submit"', page).group(1)
    r = ann.post(
        f"/tasks/{aid2}/submit", data={**form, "client_id": "form-client-2", "choice": "", "csrf_token": csrf}
    )
    assert "error=" in r.headers["location"] and "choice" in r.headers["location"]
    assert services.progress(s, "ann", "pg")["done"] == 1
    lead, _ = browser_login(app, "lead")
    proj_page = lead.get("/admin/projects/pg")
    assert proj_page.status_code == 200 and 'id="quality"' in proj_page.text and "ann" in proj_page.text
    assert lead.get("/admin/projects/pg/queue").status_code == 200
    rev, rev_csrf = browser_login(app, "rev")
    r = rev.post("/tasks/next", data={"project": "pg", "mode": "annotate", "csrf_token": rev_csrf})
    assert r.headers["location"] == "/annotate?project=pg&done=1"  # nothing sampled for QA: no task at all
    assert "No tasks left" in rev.get(r.headers["location"]).text
    assert services.progress(s, "rev", "pg")["done"] == 0


def _wrong_choice(task: dict) -> str:
    """Display side of the response that is NOT the gold answer (gold is canonical A = "answer A...")."""
    left = task["candidates"][0]["text"]
    return "left" if left.startswith("answer B") else "right"


def test_qc_policy_actions_are_journaled_enforced_and_reversible(s):
    make_users(s, {"good": "annotator", "bad": "annotator", "lead": "lead"})
    services.create_project(s, "qcp", "# Guide", overlap=2, gold_rate=1.0, qa_rate=0.0)
    services.import_items(
        s, "qcp", [{**r, "priority": 0 if "gold_label" in r else 5} for r in pair_items(3, gold=6)]
    )
    for name in ("good", "bad"):
        for _ in range(6):  # gold first (rate 1.0)
            t = services.next_task(s, name, "qcp")
            choice = (
                _wrong_choice(t) if name == "bad" else ("right" if _wrong_choice(t) == "left" else "left")
            )
            services.submit(s, name, t["assignment_id"], answer(t, choice), f"{name}-{t['assignment_id']}")
    report = qc.quality_report(s, "qcp")
    acc = {a["annotator_id"]: a["gold_accuracy"] for a in report["annotators"]}
    assert acc == {"good": 1.0, "bad": 0.0}
    from alignflow.quality.policy import QCPolicy

    policy = QCPolicy.model_validate({"gold": {"min_items": 5}})
    applied = qc.evaluate_and_apply(s, "qcp", "lead", policy)
    assert {a["annotator"] for a in applied} == {"bad"}
    assert {a["action"] for a in applied} >= {"restrict"}
    bad = s.scalar(select(User).where(User.username == "bad"))
    assert bad.qc_state in ("restrict", "recertify", "suspend")
    # Enforced: a restricted/recertifying annotator only gets gold (all used up here) or low-impact work, and
    # every regular item here is high-impact (priority 5); the good annotator still gets one.
    assert services.next_task(s, "bad", "qcp") is None
    assert services.next_task(s, "good", "qcp") is not None
    journal = s.scalars(select(JournalEntry.action).where(JournalEntry.entity == "user")).all()
    assert any(a.startswith("qc.") for a in journal)
    from alignflow.feedback import engine

    for a in applied:
        engine.revert_qc_action(s, a["id"], None)
    s.commit()
    s.expire_all()
    assert s.get(User, bad.id).qc_state == "active"


def test_import_items_from_a_generation_artifact(workspace, sessions, monkeypatch):
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    store = Store.open(workspace)
    rows = [
        {"prompt_id": f"p{k}", "prompt": f"prompt {k}", "response": f"resp {k}-{j}", "model": "policy", "model_version": "v0",
         "sampling": '{"temperature": 0.8}'}
        for k in range(3) for j in range(2)
    ]  # fmt: skip
    aid = store.put_dataset(rows, kind="generations", name="gen-run")
    store.close()
    with sessions() as s:
        services.create_project(s, "gen", "# Guide")
    monkeypatch.setenv("ALIGNFLOW_DB_URL", workspace.db_url)
    r = CliRunner().invoke(
        app, ["annotate", "import-items", "gen", "--artifact", aid, "--home", str(workspace.home)]
    )
    assert r.exit_code == 0, r.output
    with sessions() as s:
        from alignflow.feedback.models import Item

        items = s.scalars(select(Item).order_by(Item.id)).all()
        assert [i.external_id for i in items] == ["p0", "p1", "p2"]
        assert items[0].candidates[1] == {"id": "c1", "text": "resp 0-1", "model": "policy", "version": "v0",
                                          "sampling": {"temperature": 0.8}}  # fmt: skip
        assert items[0].source == aid


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_migration_matches_models(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from alignflow.store import db
    from alignflow.store.models import Base

    eng = db.make_engine(db_url)
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    eng.dispose()
    assert [d for d in diff if "fb_" in str(d)] == []
