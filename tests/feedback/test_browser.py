"""Playwright in Debian's Chromium against a live server: login, keyboard annotation, review, admin pages, XSS.

Screenshots go to test-artifacts/feedback/ (gitignored).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from fb_helpers import PASSWORD, answer, make_users, pair_items
from sqlalchemy import select

from alignflow.feedback import services
from alignflow.feedback.app import create_app
from alignflow.feedback.models import Response

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "feedback"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def server(workspace):
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    srv = uvicorn.Server(
        uvicorn.Config(create_app(workspace), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def page(browser, request):
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.set_default_timeout(15_000)
    yield pg
    SHOTS.mkdir(parents=True, exist_ok=True)
    ctx.close()


def shot(pg, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def login(pg, base: str, username: str) -> None:
    pg.goto(f"{base}/login")
    pg.fill("input[name=username]", username)
    pg.fill("input[name=password]", PASSWORD)
    pg.click("#login")
    pg.wait_for_load_state()


def test_login_and_pairwise_task_by_keyboard(server, page, s, db_url):
    make_users(s, {"ann": "annotator"})
    services.create_project(
        s, "kb", "# Guide\nPrefer **accurate** answers.", overlap=1, gold_rate=0.0, qa_rate=0.0
    )
    services.import_items(s, "kb", pair_items(3))
    page.goto(f"{server}/login")
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", "wrong-password")
    page.click("#login")
    assert "invalid username or password" in page.content()
    login(page, server, "ann")
    page.goto(f"{server}/annotate?project=kb")
    with page.expect_navigation():  # a GET never leases; Start POSTs
        page.click("#start")
    first_prompt = page.inner_text("section.prompt pre")
    page.keyboard.press("g")  # guideline one key away
    assert page.is_visible("#guideline pre")
    page.keyboard.press("g")
    # overall: left (1); strength: strong (3); dimensions: left, right, tie, left
    for key in ("1", "3", "1", "2", "3", "1"):
        page.keyboard.press(key)
    page.keyboard.press("r")
    page.keyboard.type("Left is accurate; right invents a date.")
    page.keyboard.press("Escape")
    shot(page, f"annotate-filled-{db_url.split(':')[0]}")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.inner_text("#progress").startswith("done 1")
    assert page.inner_text("section.prompt pre") != first_prompt  # the next task is shown
    shot(page, f"annotate-next-{db_url.split(':')[0]}")
    s.expire_all()
    r = s.scalar(select(Response))
    assert r.payload["choice"] == "left" and r.payload["strength"] == 3
    assert r.payload["dimensions"] == {"accuracy": "left", "professionalism": "right", "conciseness": "tie",
                                       "empathy": "left"}  # fmt: skip
    assert r.payload["rationale"].startswith("Left is accurate")
    assert r.duration_s is not None and r.duration_s > 0


def test_model_output_html_is_shown_as_text(server, page, s):
    make_users(s, {"ann": "annotator"})
    services.create_project(s, "xss", "<script>window.__xss = 'guideline'</script>", overlap=1, gold_rate=0.0)
    evil = [
        "<script>window.__xss = 'script';</script>",
        '<img src=x onerror="window.__xss = \'img\'"><b onmouseover="window.__xss=1">bold</b>',
    ]
    services.import_items(
        s, "xss", [{"id": "e1", "prompt": "<svg onload=\"window.__xss='svg'\">", "candidates": evil}]
    )
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    login(page, server, "ann")
    page.goto(f"{server}/annotate?project=xss")
    with page.expect_navigation():  # a GET never leases; Start POSTs
        page.click("#start")
    page.wait_for_timeout(300)
    texts = page.locator("article.candidate pre").all_inner_texts()
    assert sorted(texts) == sorted(evil)  # exactly the raw text, visible as text
    assert page.locator("article.candidate img, article.candidate script, section.prompt svg").count() == 0
    assert page.evaluate("window.__xss") is None and not dialogs
    page.keyboard.press("g")
    assert "<script>" in page.inner_text("#guideline pre")
    assert page.evaluate("window.__xss") is None
    shot(page, "xss-as-text")


def test_reviewer_corrects_an_item(server, page, s):
    make_users(s, {"ann": "annotator", "rev": "reviewer"})
    services.create_project(
        s, "qa", "# Guide", overlap=1, gold_rate=0.0, qa_rate=1.0, schema={"dimensions": ["accuracy"]}
    )
    services.import_items(s, "qa", pair_items(1))
    t = services.next_task(s, "ann", "qa")
    services.submit(
        s, "ann", t["assignment_id"], answer(t, "left", rationale="left is right"), "ann-client-1"
    )
    login(page, server, "rev")
    assert page.url.endswith("/review")
    page.goto(f"{server}/review?project=qa")
    with page.expect_navigation():  # a GET never leases; Start POSTs
        page.click("#start")
    assert "left is right" in page.inner_text("#original")
    assert page.inner_text("#original .orig-choice").startswith("left")
    for key in ("2", "2", "2"):  # overall right, strength clear, accuracy right
        page.keyboard.press(key)
    page.keyboard.press("r")
    page.keyboard.type("Right is better: left misquotes the source.")
    page.keyboard.press("Escape")
    shot(page, "review-correct")
    page.keyboard.press("Enter")
    page.wait_for_selector("#no-task")
    s.expire_all()
    rv = s.scalar(select(Response).where(Response.kind == "review"))
    assert rv.review_action == "correct" and rv.payload["choice"] == "right"
    orig = s.scalar(select(Response).where(Response.kind == "annotate"))
    assert rv.label != orig.label and orig.qa_status == "done"


def test_admin_creates_project_and_imports_items(server, page, s, tmp_path):
    make_users(s, {"boss": "admin"})
    login(page, server, "boss")
    assert page.url.endswith("/admin")
    page.fill("#new-project input[name=name]", "web-made")
    page.fill("#new-project textarea[name=guideline]", "# Web guideline\nBe kind.")
    page.fill("#new-project input[name=dimensions]", "accuracy, empathy")
    page.fill("#new-project input[name=overlap]", "2")
    page.click("#create-project")
    page.wait_for_url("**/admin/projects/web-made**")
    assert "project created" in page.content()
    items = tmp_path / "web-items.jsonl"
    import json

    items.write_text("\n".join(json.dumps(r) for r in pair_items(4)))
    page.set_input_files("#import-items input[name=file]", str(items))
    page.click("#import")
    page.wait_for_selector("text=imported 4 items")
    assert page.locator("#queue-table tr").nth(1).locator("td").first.inner_text() == "4"
    # A malformed paste is refused with the line number and nothing is imported.
    page.fill(
        "#import-items textarea[name=jsonl]", '{"id": "z1", "prompt": "p", "candidates": ["a", "b"]}\n{oops'
    )
    page.click("#import")
    page.wait_for_selector(".error")
    assert "web form:2: invalid JSON" in page.inner_text(".error")
    shot(page, "admin-project")
    assert services.queue_state(s, "web-made")["items"] == 4
    assert services.schema_spec(s, services.get_project(s, "web-made")).dimensions == ["accuracy", "empathy"]


def test_ranking_by_keyboard_and_skip(server, page, s):
    make_users(s, {"ann": "annotator"})
    spec = {"kind": "ranking", "max_candidates": 3, "dimensions": []}
    services.create_project(s, "rk", "# Rank", spec, overlap=1, gold_rate=0.0, qa_rate=0.0)
    cands = [{"id": c, "text": f"answer {c}"} for c in ("x", "y", "z")]
    services.import_items(
        s, "rk", [{"id": f"q{k}", "prompt": f"rank {k}", "candidates": cands} for k in range(2)]
    )
    login(page, server, "ann")
    page.goto(f"{server}/annotate?project=rk")
    with page.expect_navigation():  # a GET never leases; Start POSTs
        page.click("#start")
    page.keyboard.press("x")  # skip: focus the reason box
    page.keyboard.type("not my language")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert "skipped 1" in page.inner_text("#progress")
    texts = page.locator("article.candidate pre").all_inner_texts()
    best_first = [texts.index(f"answer {c}") + 1 for c in ("z", "x", "y")]  # display numbers
    for n in best_first:
        page.keyboard.press(str(n))
    assert page.input_value("input[name=ranking]") == ",".join(str(n - 1) for n in best_first)
    shot(page, "ranking")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    s.expire_all()
    r = s.scalar(select(Response))
    assert r.label == ["z", "x", "y"]
    assert services.progress(s, "ann", "rk") == {"done": 1, "skipped": 1}
