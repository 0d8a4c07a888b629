"""Production logs and feedback: `POST /v1/feedback`, retention, and feedback back into annotation.

The round trip runs through the public interfaces only: the gateway (`make_app`, real uvicorn) driven by the
official `openai` client, `POST /v1/feedback` over httpx, `alignflow deploy feedback-to-annotation`,
the annotation HTTP API (`/api/v1/...`), `alignflow annotate export --as pairs` and `alignflow lineage`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from alignflow.feedback import auth, services
from alignflow.feedback.models import Item, JournalEntry
from alignflow.judges.testing import serve_app
from alignflow.serving import logs
from alignflow.serving.feedback import feedback_to_annotation
from alignflow.serving.models import ServingApiKey, ServingFeedback, ServingResponse
from alignflow.store import Store
from alignflow.store.models import utcnow
from alignflow.workspace import Workspace

PASSWORD = "correct-horse-battery"
auth.set_password_cost(time_cost=1, memory_cost_kib=1024)  # the tests check the logic, not the hash cost


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def ws(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A workspace on the parametrised database (SQLite, and PostgreSQL when ALIGNFLOW_TEST_PG_URL is set)."""
    w = Workspace(home=tmp_path / "ws", db_url=db_url)
    w.ensure_dirs()
    monkeypatch.setenv("ALIGNFLOW_HOME", str(w.home))
    monkeypatch.setenv("ALIGNFLOW_DB_URL", w.db_url)
    return w


@pytest.fixture
def store(ws: Workspace) -> Iterator[Store]:
    st = Store.open(ws)
    yield st
    st.close()


@pytest.fixture
def sessions(ws: Workspace):
    factory = services.connect(ws)
    yield factory
    factory.kw["bind"].dispose()


def cli(*args: object, ok: bool = True):  # noqa: ANN201
    from alignflow.cli.main import app

    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=not ok)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def _log(s, rid: str, prompt: str, response: str, version: str = "v-a", arm: str | None = "a", **kw) -> str:
    return logs.record_response(
        s, request_id=rid, model=kw.pop("model", arm or "m"), version=version, arm=arm, experiment="exp",
        user=kw.pop("user", "u1"), prompt=prompt, messages=kw.pop("messages", None), response=response,
        prompt_tokens=3, completion_tokens=5, latency_ms=12.5, key_id=None, **kw,
    )  # fmt: skip


def _project(s, name: str = "prod", n_regular: int = 3) -> None:
    services.create_project(s, name, "# Compare the replies", None, overlap=1, gold_rate=0.0, qa_rate=0.0)
    rows = [
        {"id": f"old{k}", "prompt": f"old prompt {k}", "candidates": [f"x{k}", f"y{k}"], "priority": 500}
        for k in range(n_regular)
    ]
    services.import_items(s, name, rows, source="seed")


# ------------------------------------------------------------------------------------ library level


def test_record_and_validate_feedback(sessions):
    with sessions() as s:
        assert _log(s, "chatcmpl-1", "hi", "hello") == "chatcmpl-1"  # the OpenAI id is the row's id
        with pytest.raises(services.Conflict):
            _log(s, "chatcmpl-1", "hi", "again")
        fid = logs.record_feedback(s, "chatcmpl-1", {"type": "rating", "rating": 2, "text": "meh"}, None)
        fb = s.get(ServingFeedback, fid)
        assert (fb.kind, fb.rating, fb.text, fb.processed_at) == ("rating", 2, "meh", None)
        assert s.get(ServingResponse, "chatcmpl-1").prompt_sha256 == logs.prompt_hash("hi")
        bad = [
            ({"type": "love"}, "type"),
            ({"type": "rating"}, "rating"),
            ({"type": "rating", "rating": 6}, "rating"),
            ({"type": "rating", "rating": True}, "rating"),
            ({"type": "thumbs_up", "rating": 3}, "rating"),
            ({"type": "correction"}, "correction"),
            ({"type": "correction", "correction": "   "}, "correction"),
            ({"type": "thumbs_down", "correction": "x"}, "correction"),
            ({"type": "text"}, "text"),
            ({"type": "text", "text": "a\x00b"}, "text"),
            ({"type": "thumbs_up", "colour": "red"}, "colour"),
        ]
        for body, field in bad:
            with pytest.raises(services.Invalid) as exc:
                logs.record_feedback(s, "chatcmpl-1", body, None)
            assert exc.value.field == field, body
        with pytest.raises(services.NotFound, match="no logged response 'nope'"):
            logs.record_feedback(s, "nope", {"type": "thumbs_up"}, None)
        assert s.scalar(select(func.count()).select_from(ServingFeedback)) == 1


def test_purge_expired_deletes_old_responses_and_their_feedback_and_journals_it(sessions):
    with sessions() as s:
        _log(s, "old-1", "p", "r1")
        _log(s, "old-2", "p", "r2")
        _log(s, "new-1", "p", "r3")
        logs.record_feedback(s, "old-1", {"type": "thumbs_down"}, None)
        logs.record_feedback(s, "new-1", {"type": "thumbs_up"}, None)
        ten_days_ago = utcnow() - timedelta(days=10)
        for rid in ("old-1", "old-2"):
            s.get(ServingResponse, rid).created_at = ten_days_ago
        s.commit()
        assert logs.purge_expired(s, retention_days=30) == 0
        assert logs.purge_expired(s, retention_days=7) == 2
        assert [r.id for r in logs.responses(s)] == ["new-1"]
        assert [f.response_id for f in s.scalars(select(ServingFeedback))] == ["new-1"]
        entry = s.scalars(select(JournalEntry).where(JournalEntry.action == "serving.purge")).all()[-1]
        assert (
            entry.data["responses"] == 2 and entry.data["feedback"] == 1 and entry.data["retention_days"] == 7
        )
        # `now` moves the clock: two days on, a 1-day retention purges the rest.
        assert logs.purge_expired(s, 1, now=utcnow() + timedelta(days=2)) == 1
        with pytest.raises(services.Invalid):
            logs.purge_expired(s, -1)
        with pytest.raises(logs.NotFound):
            logs.record_feedback(s, "old-1", {"type": "thumbs_up"}, None)  # purged ids are gone for feedback


def test_purge_logs_command(sessions, ws):
    with sessions() as s:
        _log(s, "old", "p", "r1")
        _log(s, "new", "p", "r2")
        s.get(ServingResponse, "old").created_at = utcnow() - timedelta(days=3)
        s.commit()
    r = cli("deploy", "purge-logs", "--retention-days", "2")
    assert "purged 1 logged response(s) older than 2 day(s)" in r.output
    cfg = ws.home / "deploy.yaml"
    cfg.write_text("models:\n  - {name: a, engine: upstream, url: 'http://127.0.0.1:9/v1', upstream_model: m}\n"
                   "logging: {enabled: true, retention_days: 0.5}\n")  # fmt: skip
    with sessions() as s:
        s.get(ServingResponse, "new").created_at = utcnow() - timedelta(days=1)
        s.commit()
    assert "purged 1 logged" in cli("deploy", "purge-logs", "--config", cfg).output
    bad = cli("deploy", "purge-logs", ok=False)
    assert bad.exit_code != 0 and "exactly one of --retention-days" in str(bad.exception)


def test_feedback_to_annotation_pairs_the_other_arm_and_is_idempotent(sessions, store):
    with sessions() as s:
        _project(s)
        _log(s, "r-a1", "How do I reset my password?", "No idea.", version="v-a", arm="a", user="u1")
        _log(s, "r-b1", "How do I reset my password?", "Open Settings > Security.", version="v-b", arm="b",
             user="u2")  # fmt: skip
        _log(s, "r-a2", "Cancel my order", "Cannot.", version="v-a", arm="a", user="u3")
        _log(s, "r-a3", "Where is my parcel?", "Somewhere.", version="v-a", arm="a", user="u1")
        f_down = logs.record_feedback(s, "r-a1", {"type": "thumbs_down"}, None)
        f_down2 = logs.record_feedback(s, "r-a1", {"type": "regenerate"}, None)  # same reply: one item
        f_up = logs.record_feedback(s, "r-b1", {"type": "thumbs_up"}, None)
        f_good = logs.record_feedback(s, "r-a3", {"type": "rating", "rating": 4}, None)
        f_corr = logs.record_feedback(
            s, "r-a2", {"type": "correction", "correction": "Go to Orders and press Cancel."}, None
        )
        f_alone = logs.record_feedback(s, "r-a3", {"type": "abandon"}, None)  # no other arm answered it

        res = feedback_to_annotation(s, store, "prod")
        assert res.items == ["prod-neg-r-a1", "prod-corr-" + str(f_corr)]
        assert res.processed == sorted([f_down, f_down2, f_corr]) and res.no_alternative == [f_alone]
        items = {i.external_id: i for i in s.scalars(select(Item).where(Item.project_id == 1))}
        neg, corr = items["prod-neg-r-a1"], items[f"prod-corr-{f_corr}"]
        assert [c["text"] for c in neg.candidates] == ["No idea.", "Open Settings > Security."]
        assert [c["version"] for c in neg.candidates] == ["v-a", "v-b"]
        assert [c["text"] for c in corr.candidates] == ["Cannot.", "Go to Orders and press Cancel."]
        # Above every earlier item, oldest feedback first; the batch artifact is the items' source.
        assert neg.priority == 502 and corr.priority == 501
        assert neg.source == corr.source == res.artifact
        assert neg.meta["production"] == {"response_id": "r-a1", "feedback_id": f_down, "kind": "thumbs_down",
                                          "version": "v-a", "arm": "a"}  # fmt: skip
        doc = json.loads(store.path(res.artifact).read_text())
        assert sorted(r["id"] for r in doc["responses"]) == ["r-a1", "r-a2", "r-b1"]
        assert doc["alternatives"] == {"r-a1": "r-b1"}
        assert store.get(res.artifact).meta["responses"] == ["r-a1", "r-a2", "r-b1"]
        sft = store.read_dataset(res.sft).to_pylist()
        pairs = store.read_dataset(res.pairs).to_pylist()
        assert [(r["prompt"], r["completion"]) for r in sft] == [
            ("Cancel my order", "Go to Orders and press Cancel.")
        ]
        assert [(r["chosen"], r["rejected"], r["weight"]) for r in pairs] == [
            ("Go to Orders and press Cancel.", "Cannot.", 1.0)
        ]
        for ds in (res.sft, res.pairs):
            assert [(p, role) for p, _c, role in store.lineage(ds, max_depth=1).edges] == [
                (res.artifact, "production_feedback")
            ]
        marked = {f.id: f for f in s.scalars(select(ServingFeedback))}
        assert marked[f_down].item_ids == marked[f_down2].item_ids == [neg.id]
        assert marked[f_up].processed_at is None and marked[f_good].processed_at is None  # not negative

        # Idempotent: nothing is turned twice; a later thumbs-down on the same reply links to its item.
        again = feedback_to_annotation(s, store, "prod")
        assert again.items == [] and again.processed == [] and again.no_alternative == [f_alone]
        f_late = logs.record_feedback(s, "r-a1", {"type": "thumbs_down"}, None)
        late = feedback_to_annotation(s, store, "prod")
        assert late.items == [] and late.linked == [f_late] and late.artifact is None
        assert s.get(ServingFeedback, f_late).item_ids == [neg.id]
        # With a sampler, the lone abandon becomes an item against a fresh sample.
        sampled = feedback_to_annotation(s, store, "prod", sample_fn=lambda p: f"fresh answer to {p}",
                                         sample_source="policy-c")  # fmt: skip
        assert sampled.items == ["prod-neg-r-a3"] and sampled.priority == 503
        item = s.scalar(select(Item).where(Item.external_id == "prod-neg-r-a3"))
        assert item.candidates[1]["text"] == "fresh answer to Where is my parcel?"
        assert item.candidates[1]["version"] == "policy-c"
        assert s.scalar(select(func.count()).select_from(Item)) == 3 + 3
        with pytest.raises(services.Invalid, match="not negative feedback kinds"):
            feedback_to_annotation(s, store, "prod", negative_kinds=["thumbs_up"])


def test_since_limit_and_chat_corrections(sessions, store):
    with sessions() as s:
        _project(s, n_regular=0)
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        _log(s, "c1", "Hi", "Go away.", messages=msgs)
        _log(s, "c2", "Bye", "Whatever.")
        f1 = logs.record_feedback(
            s, "c1", {"type": "correction", "correction": "Hello! How can I help?"}, None
        )
        f2 = logs.record_feedback(s, "c2", {"type": "correction", "correction": "Goodbye, take care."}, None)
        _log(s, "c0", "Alone", "No other arm answered this.")
        f0 = logs.record_feedback(s, "c0", {"type": "thumbs_down"}, None)
        s.get(ServingFeedback, f0).created_at = utcnow() - timedelta(days=3)
        s.get(ServingFeedback, f1).created_at = utcnow() - timedelta(days=2)
        s.commit()
        res = feedback_to_annotation(s, store, "prod", since=utcnow() - timedelta(days=1))
        assert res.processed == [f2]
        res = feedback_to_annotation(s, store, "prod", limit=1)  # the waiting thumbs-down does not count
        assert res.processed == [f1] and res.no_alternative == [f0]
        sft = store.read_dataset(res.sft).to_pylist()
        assert sft[0]["prompt"] is None and sft[0]["messages"] == [*msgs, {"role": "assistant",
                                                                         "content": "Hello! How can I help?"}]  # fmt: skip


def test_nul_replies_are_logged_sanitized_and_unshowable_ones_give_no_item(sessions, store):
    with sessions() as s:
        _project(s, n_regular=0)
        # A NUL from a byte-level model: PostgreSQL cannot store it, so both databases keep U+FFFD instead.
        _log(s, "z1", "Q0", "nul\x00here", messages=[{"role": "user", "content": "Q\x000"}])
        assert s.get(ServingResponse, "z1").response == "nul\ufffdhere"
        assert s.get(ServingResponse, "z1").messages == [{"role": "user", "content": "Q\ufffd0"}]
        huge = "x" * (services.MAX_CANDIDATE_CHARS + 1)  # more than the platform shows
        _log(s, "n1", "Q", huge, version="v-a", arm="a")
        _log(s, "n2", "Q", "fine reply", version="v-b", arm="b")
        _log(s, "n3", "Q", huge + "y", version="v-c", arm="c")  # the newest alternative, but not showable
        _log(s, "n4", "Q", "mine", version="v-d", arm="d")
        f_bad = logs.record_feedback(s, "n1", {"type": "thumbs_down"}, None)
        f_corr = logs.record_feedback(s, "n1", {"type": "correction", "correction": "a good reply"}, None)
        f_ok = logs.record_feedback(s, "n4", {"type": "thumbs_down"}, None)
        res = feedback_to_annotation(s, store, "prod")
        assert res.unshowable == [f_bad, f_corr] and res.processed == sorted([f_bad, f_corr, f_ok])
        assert res.items == ["prod-neg-n4"]
        item = s.scalar(select(Item).where(Item.external_id == "prod-neg-n4"))
        assert item.candidates[1]["text"] == "fine reply"  # the newest showable other-arm answer
        # The correction still gives its SFT row and pair (datasets take any length); nothing is retried.
        assert store.read_dataset(res.pairs).to_pylist()[0]["rejected"] == huge
        assert s.get(ServingFeedback, f_bad).item_ids == [] and s.get(ServingFeedback, f_bad).processed_at
        assert feedback_to_annotation(s, store, "prod").processed == []


def test_migration_0006_matches_the_models_and_downgrades(db_url):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from alignflow.store import db
    from alignflow.store.models import Base

    eng = db.make_engine(db_url)
    db.ensure_schema(eng)
    assert db.current_revision(eng) == db.head_revision()
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diff if "serving_" in str(d)] == []
    cfg = db.alembic_config(str(eng.url.render_as_string(hide_password=False)))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    from sqlalchemy import inspect

    assert not [t for t in inspect(eng).get_table_names() if t.startswith("serving_")]
    db.upgrade(eng)
    assert {"serving_api_keys", "serving_responses", "serving_feedback"} <= set(
        inspect(eng).get_table_names()
    )
    eng.dispose()


# --------------------------------------------------------------------------------- HTTP: /v1/feedback


def _feedback_client(store: Store, s) -> tuple[TestClient, str]:  # noqa: ANN001
    """The gateway (`make_app`, logging on, one upstream model that is never called) and one API key."""
    from alignflow.serving import keys
    from alignflow.serving.app import make_app
    from alignflow.serving.config import validate_deploy

    cfg = validate_deploy({
        "models": [{"name": "a", "engine": "upstream", "url": "http://127.0.0.1:9/v1", "upstream_model": "m"}],
        "logging": {"enabled": True},
    })  # fmt: skip
    _key, raw = keys.create_key(s, "feedback-test")
    return TestClient(make_app(cfg, store)), raw


def test_post_feedback_http(sessions, store):
    with sessions() as s:
        _log(s, "chatcmpl-9", "hi", "hello")
        client, raw = _feedback_client(store, s)
    auth_h = {"Authorization": f"Bearer {raw}"}
    r = client.post("/v1/feedback", json={"response_id": "chatcmpl-9", "type": "thumbs_down"}, headers=auth_h)
    assert r.status_code == 201, r.text
    assert r.json()["object"] == "feedback" and r.json()["response_id"] == "chatcmpl-9"
    r = client.post("/v1/feedback", json={"response_id": "chatcmpl-9", "type": "correction",
                                          "correction": "Hello, how can I help?"}, headers=auth_h)  # fmt: skip
    assert r.status_code == 201
    with sessions() as s:
        rows = s.scalars(select(ServingFeedback).order_by(ServingFeedback.id)).all()
        key_id = s.scalar(select(ServingApiKey.id))
        assert [(f.kind, f.correction, f.key_id) for f in rows] == [
            ("thumbs_down", None, key_id), ("correction", "Hello, how can I help?", key_id)
        ]  # fmt: skip
    r = client.post(
        "/v1/feedback", json={"response_id": "chatcmpl-nope", "type": "thumbs_up"}, headers=auth_h
    )
    assert r.status_code == 404
    err = r.json()["error"]
    assert (
        err["code"] == "response_not_found"
        and err["param"] == "response_id"
        and "chatcmpl-nope" in err["message"]
    )
    assert err["type"] == "invalid_request_error"
    for body in (
        {"response_id": "chatcmpl-9", "type": "love"},
        {"response_id": "chatcmpl-9", "type": "rating", "rating": 9},
        {"response_id": "chatcmpl-9", "type": "rating"},
        {"response_id": "chatcmpl-9", "type": "thumbs_up", "correction": "x"},
        {"response_id": "chatcmpl-9", "type": "thumbs_up", "extra": 1},
        {"type": "thumbs_up"},
        {"response_id": "", "type": "thumbs_up"},
    ):
        r = client.post("/v1/feedback", json=body, headers=auth_h)
        assert r.status_code in (400, 422), (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, body
    r = client.post(
        "/v1/feedback", content=b"{not json", headers={**auth_h, "content-type": "application/json"}
    )
    assert r.status_code in (400, 422) and "error" in r.json()
    assert (
        client.post("/v1/feedback", json={"response_id": "chatcmpl-9", "type": "thumbs_up"}).status_code
        == 401
    )
    bad_key = {"Authorization": "Bearer afk-wrong"}
    assert client.post("/v1/feedback", json={"response_id": "chatcmpl-9", "type": "thumbs_up"},
                       headers=bad_key).status_code == 401  # fmt: skip
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ServingFeedback)) == 2


# ------------------------------------------------------------------------- the round trip, end to end


@contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    """Run `app` with uvicorn on a free port in a thread; yields its base URL."""
    with serve_app(app) as base:
        yield base


def _two_policies(store: Store, root: Path) -> tuple[str, str]:
    """Two tiny Llama policies (one tokenizer, different weights) stored as checkpoints; their artifact ids."""
    from alignflow.models import make_tiny_model_dir

    ids = []
    for name, seed in (("policy-a", 0), ("policy-b", 7)):
        path = make_tiny_model_dir(root / name, vocab_size=300, hidden_size=32, num_layers=1, seed=seed)
        ids.append(store.put_directory(path, kind="checkpoint", name=name))
    return ids[0], ids[1]


def _login(app: FastAPI, name: str) -> TestClient:
    c = TestClient(app)
    r = c.post("/api/v1/auth/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    c.headers["X-CSRF-Token"] = r.json()["csrf_token"]
    return c


def _answer(task: dict, position: int) -> dict:
    choice = "left" if position == 0 else "right"
    return {
        "schema_version": task["schema_version"],
        "choice": choice,
        "strength": 2,
        "dimensions": {d: choice for d in task["schema"]["dimensions"]},
        "rationale": "this one answers the question",
        "duration_s": 4.0,
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the database paths run on both above
def test_round_trip_gateway_feedback_annotation_export_lineage(ws, store, sessions, tmp_path):
    import openai

    from alignflow.feedback.app import Settings, create_app
    from alignflow.serving import keys
    from alignflow.serving.app import make_app
    from alignflow.serving.config import validate_deploy

    aid_a, aid_b = _two_policies(store, tmp_path / "policies")
    cfg = validate_deploy({
        "models": [{"name": "a", "engine": "builtin", "ref": aid_a, "batch_window_ms": 1},
                   {"name": "b", "engine": "builtin", "ref": aid_b, "batch_window_ms": 1}],
        "experiments": [{"name": "support", "arms": [{"name": "control", "model": "a", "weight": 1},
                                                       {"name": "candidate", "model": "b", "weight": 1}]}],
        "logging": {"enabled": True, "retention_days": 30},
    })  # fmt: skip
    with sessions() as s:
        _key, raw = keys.create_key(s, "app")
        _project(s, "prod", n_regular=3)  # three earlier items at priority 500
        auth.create_user(s, "ann1", PASSWORD, "annotator", pod="pod1")
        s.commit()

    question = [{"role": "user", "content": "How do I reset my password?"}]
    by_arm: dict[str, list] = {}
    with _serve(make_app(cfg, store)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=raw, max_retries=0, timeout=60)
        for k in range(40):  # users until both arms have answered the same question
            chat = client.chat.completions.create(model="support", messages=question, user=f"user-{k}",
                                                  max_tokens=8, temperature=1.0, seed=k)  # fmt: skip
            by_arm.setdefault(chat.model_extra["alignflow"]["arm"], []).append(chat)
            if len(by_arm) == 2 and k >= 3:
                break
        disliked = by_arm["control"][0]
        other = by_arm["candidate"][-1]  # the newest answer of the other arm
        done = client.completions.create(model="a", prompt="Cancel my order", max_tokens=8, seed=1)
        http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {raw}"}, timeout=30)
        r1 = http.post("/v1/feedback", json={"response_id": disliked.id, "type": "thumbs_down"})
        fix = "Open Orders, choose the order and press Cancel."
        r2 = http.post("/v1/feedback", json={"response_id": done.id, "type": "correction", "correction": fix})
        assert (r1.status_code, r2.status_code) == (201, 201), (r1.text, r2.text)
        # Only model "a" answered this prompt: its thumbs-down waits for a fresh sample (--sample-with).
        r_wait = http.post("/v1/feedback", json={"response_id": done.id, "type": "thumbs_down"})
        assert r_wait.status_code == 201
        r3 = http.post("/v1/feedback", json={"response_id": "chatcmpl-unknown", "type": "thumbs_up"})
        assert r3.status_code == 404 and r3.json()["error"]["code"] == "response_not_found"
        http.close()
    with sessions() as s:  # the gateway logged every completion under the id the client received
        logged = {r.id: r for r in logs.responses(s)}
        assert disliked.id in logged and done.id in logged
        assert logged[disliked.id].version == aid_a and logged[disliked.id].arm == "control"

    out = cli("deploy", "feedback-to-annotation", "--project", "prod").output
    assert "2 item(s) added to prod" in out and "1 negative feedback event(s) left for later" in out, out
    again = cli("deploy", "feedback-to-annotation", "--project", "prod").output
    assert "item(s) added" not in again and "left for later" in again  # idempotent

    # The annotator's next tasks through the annotation API are the production items, before older ones.
    ann = _login(create_app(ws, Settings()), "ann1")
    wanted = {
        # the other arm's answer wins (as logged: a random tiny policy's NUL is kept as U+FFFD)
        "How do I reset my password?": logs.sanitize_text(other.choices[0].message.content),
        "Cancel my order": fix,  # the correction wins
    }
    seen = []
    for _ in range(2):
        task = ann.post("/api/v1/projects/prod/next").json()
        prompt = task["prompt"].rsplit("user: ", 1)[-1]
        seen.append(prompt)
        texts = [c["text"] for c in task["candidates"]]
        assert wanted[prompt] in texts, (prompt, texts)
        r = ann.post(f"/api/v1/assignments/{task['assignment_id']}/submit",
                     json={"client_id": f"c-{task['assignment_id']}", "answer": _answer(task, texts.index(wanted[prompt]))})  # fmt: skip
        assert r.status_code == 201, r.text
    assert sorted(seen) == sorted(wanted)
    assert ann.post("/api/v1/projects/prod/next").json()["prompt"].startswith("old prompt")

    out = cli("annotate", "export", "prod", "--as", "pairs", "--method", "majority_vote").output
    pairs_id = store.find(kind="pairs", name="prod-pairs")[0].id
    assert pairs_id in out
    rows = store.read_dataset(pairs_id).to_pylist()
    assert {(r["prompt"].rsplit("user: ", 1)[-1], r["chosen"]) for r in rows} == set(wanted.items())

    graph = json.loads(cli("lineage", pairs_id, "--format", "json").output)
    prod = [n for n in graph["nodes"].values() if n["kind"] == "production_feedback"]
    assert len(prod) == 1
    assert {disliked.id, other.id, done.id} <= set(prod[0]["meta"]["responses"])
    assert {aid_a, aid_b} <= set(graph["nodes"])  # ... and on to the policies that answered
    doc = json.loads(store.path(prod[0]["id"]).read_text())
    assert {r["id"]: r["arm"] for r in doc["responses"]}[disliked.id] == "control"
    edges = {(e["parent"], e["role"]) for e in graph["edges"]}
    assert (prod[0]["id"], "items") in edges and (aid_a, "policy") in edges

    # The waiting thumbs-down, against a fresh sample from the other policy.
    out = cli("deploy", "feedback-to-annotation", "--project", "prod", "--sample-with", aid_b,
              "--max-new-tokens", "6").output  # fmt: skip
    assert "1 item(s) added to prod" in out, out
    with sessions() as s:
        item = s.scalar(select(Item).where(Item.external_id == f"prod-neg-{done.id}"))
        assert item.candidates[0]["text"] == logs.sanitize_text(done.choices[0].text)
        assert (item.candidates[1]["model"], item.candidates[1]["version"]) == ("fresh_sample", aid_b)
        assert item.priority > max(i.priority for i in s.scalars(select(Item)) if i.id != item.id)
