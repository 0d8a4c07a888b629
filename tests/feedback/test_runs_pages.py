"""Run pages of `alignflow serve`: login and role required, metric plots as inline SVG, alerts, the latest sample
table (text shown as text), lineage; and the same pages in Chromium with no console errors."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fb_helpers import PASSWORD, make_users

from alignflow.feedback.app import create_app
from alignflow.store import Store

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "feedback"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
EVIL = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def populate(workspace) -> dict[str, str]:
    """A PPO-like run with 30 steps of metrics, a KL alert at step 12, sample tables at steps 10 and 20 and an
    input dataset; a second run reads its checkpoint."""
    store = Store.open(workspace)
    try:
        data = store.put_dataset([{"prompt": "p"}], kind="prompts", name="toy-prompts")
        run_dir = workspace.home / "runs" / "ppo-run"
        a = store.start_run("ppo", config={"train": {"max_steps": 30}, "kl": {"coef": 0.05}}, name="hacky",
                            run_dir=run_dir)  # fmt: skip
        for step in range(1, 31):
            store.log_metrics(
                a, step, {"kl": 0.01 * step + (0.5 if step == 12 else 0.0), "reward/mean": step / 30}
            )
        store.log_metrics(a, 30, {"eval/gold": 0.4})  # a metric logged once draws as a point
        ckpt = store.put_json({"w": 1}, kind="checkpoint", name="ppo-hacky", parents=[(data, "prompts")],
                              run_id=a)  # fmt: skip
        store.finish_run(
            a,
            status="stopped",
            summary={"stopped_at_step": 30, "stopped_by": "alert:kl_spike", "outputs": {"checkpoint": ckpt}},
        )
        store.add_alert(a, 12, "kl_spike", "critical", "kl", 0.62, 0.3, "kl 0.62 jumped above its baseline",
                        ["store", "stop"])  # fmt: skip
        samples = run_dir / "samples"
        samples.mkdir(parents=True)
        rows10 = [{"prompt": "old prompt", "response": "old", "reward": 0.1, "kl": 0.0}]
        rows20 = [
            {"prompt": "How do I reset my password?", "response": EVIL, "reward": 0.91, "kl": 0.123},
            {"prompt": "second", "response": "plain answer", "reward": -0.2, "kl": 0.05},
        ]
        (samples / "step-10.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows10))
        (samples / "step-20.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows20))
        b = store.start_run("dpo", name="downstream")
        store.add_edge(ckpt, store.put_json({"w": 2}, kind="checkpoint", run_id=b), "base_model", run_id=b)
        store.log_metrics(b, 1, {"loss": 0.69})
        return {"a": a, "b": b, "data": data, "ckpt": ckpt}
    finally:
        store.close()


def browser_login(app, name: str) -> TestClient:
    c = TestClient(app, follow_redirects=False)
    token = re.search(r'name="login_csrf" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"username": name, "password": PASSWORD, "login_csrf": token})
    assert r.status_code == 303, r.text
    return c


def test_run_pages_need_a_login_as_lead_or_admin(workspace, s) -> None:
    make_users(s, {"ann": "annotator", "rev": "reviewer", "lead": "lead", "boss": "admin"})
    ids = populate(workspace)
    app = create_app(workspace)
    anon = TestClient(app, follow_redirects=False)
    for path in ("/runs", f"/runs/{ids['a']}"):
        r = anon.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert ids["a"] not in r.text
    for who in ("ann", "rev"):
        c = browser_login(app, who)
        for path in ("/runs", f"/runs/{ids['a']}"):
            r = c.get(path)
            assert r.status_code == 403 and "may not open this page" in r.text, (who, path)
            assert "kl_spike" not in r.text and "reset my password" not in r.text
        home = c.get("/annotate" if who == "ann" else "/review")
        assert home.status_code == 200 and "<nav>" in home.text
        assert '<a href="/runs">' not in home.text  # no nav link to pages they may not open
    for who in ("lead", "boss"):
        r = browser_login(app, who).get("/runs")
        assert r.status_code == 200 and ids["a"] in r.text and ids["b"] in r.text, who
        assert '<a href="/runs">Runs</a>' in r.text  # the header links to the runs
        assert "default-src 'self'" in r.headers["content-security-policy"]


def test_runs_list_shows_status_and_alert_counts_and_filters(workspace, s) -> None:
    make_users(s, {"lead": "lead"})
    ids = populate(workspace)
    c = browser_login(create_app(workspace), "lead")
    page = c.get("/runs").text
    row_a = re.search(rf"<tr><td><a href=\"/runs/{ids['a']}\">.*?</tr>", page, re.S).group(0)
    assert "stopped" in row_a and "hacky" in row_a and '<span class="alert-count">1</span>' in row_a
    assert page.index(ids["b"]) < page.index(ids["a"])  # newest first
    only_dpo = c.get("/runs?stage=dpo").text
    assert ids["b"] in only_dpo and ids["a"] not in only_dpo
    assert (
        ids["a"] in c.get("/runs?status=stopped").text and ids["b"] not in c.get("/runs?status=stopped").text
    )


def _points(svg: str) -> list[tuple[float, float]]:
    raw = re.search(r'<polyline points="([^"]+)"', svg).group(1)
    return [tuple(map(float, p.split(","))) for p in raw.split()]


def test_run_page_plots_metrics_and_shows_alerts_samples_and_lineage(workspace, s) -> None:
    make_users(s, {"lead": "lead"})
    ids = populate(workspace)
    c = browser_login(create_app(workspace), "lead")
    r = c.get(f"/runs/{ids['a']}")
    assert r.status_code == 200
    page = r.text
    figures = dict(re.findall(r'<figure class="chart" data-metric="([^"]+)">(.*?)</figure>', page, re.S))
    assert set(figures) == {"kl", "reward/mean", "eval/gold"}
    kl = figures["kl"]
    pts = _points(kl)
    assert len(pts) == 30
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    assert xs == sorted(xs) and xs[0] == 58 and xs[-1] == 420 - 12  # steps 1..30 span the plot area
    assert ys.index(min(ys)) == 11  # the spike at step 12 is the highest point (SVG y grows down)
    assert "final 0.3" in kl and ">0.62<" in kl and "step 1" in kl and ">30<" in kl
    mark = re.findall(r'<line class="alert-mark" x1="([\d.]+)"', kl)
    assert len(mark) == 1 and float(mark[0]) == pytest.approx(pts[11][0], abs=0.11)  # the alert's step
    assert 'class="alert-mark"' not in figures["reward/mean"]
    assert "<polyline" not in figures["eval/gold"] and "<circle" in figures["eval/gold"]
    assert "style=" not in page  # the CSP forbids inline styles: SVG uses presentation attributes only
    alerts = re.search(r'<table class="alerts" id="alerts">(.*?)</table>', page, re.S).group(1)
    assert "kl_spike" in alerts and "critical" in alerts and "kl 0.62 jumped above its baseline" in alerts
    assert "store, stop" in alerts and ">12<" in alerts
    assert "Samples at step 20" in page  # the latest table, not step 10's
    samples = re.search(r'<table class="samples" id="samples">(.*?)</table>', page, re.S).group(1)
    assert [h for h in re.findall(r"<th>([^<]+)</th>", samples)] == ["prompt", "response", "reward", "kl"]
    assert "How do I reset my password?" in samples and "0.91" in samples and "old prompt" not in samples
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in samples and "<script>window" not in page
    lineage = re.search(r'<section class="lineage" id="lineage">(.*?)</section>', page, re.S).group(1)
    assert "toy-prompts" in lineage and ids["data"][:16] in lineage and "ppo-hacky" in lineage
    assert f'class="child-run" href="/runs/{ids["b"]}"' in lineage
    assert "stopped" in page and "at step 30" in page and "kl.coef" in page
    assert '<span id="stopped-by">by alert:kl_spike</span>' in page
    down = c.get(f"/runs/{ids['b']}").text
    assert f'class="parent-run" href="/runs/{ids["a"]}"' in down and 'id="no-samples"' in down
    assert "No alerts." in down
    assert c.get("/runs/hacky").status_code == 200  # a run's name works as well as its id
    missing = c.get("/runs/no-such-run")
    assert missing.status_code == 404 and "no run &#39;no-such-run&#39;" in missing.text


# ------------------------------------------------------------------------------------------------- browser


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


@pytest.mark.browser
def test_run_pages_render_in_chromium_without_console_errors(server, workspace, s, tmp_path, db_url) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (make browser)")
    from playwright.sync_api import sync_playwright

    make_users(s, {"lead": "lead"})
    ids = populate(workspace)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(15_000)
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)  # fmt: skip
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)  # fmt: skip
            page.goto(f"{server}/runs")
            assert page.url.endswith("/login")  # logged out: sent to the login page
            page.fill("input[name=username]", "lead")
            page.fill("input[name=password]", PASSWORD)
            page.click("#login")
            page.wait_for_load_state()
            page.goto(f"{server}/runs")
            with page.expect_navigation():
                page.click(f"a[href='/runs/{ids['a']}']")
            page.wait_for_load_state("networkidle")
            chart = page.locator("figure.chart[data-metric=kl] svg")
            assert chart.is_visible()
            box = chart.bounding_box()
            assert box is not None and box["width"] > 200 and box["height"] > 80
            assert page.locator("figure.chart polyline").count() == 2
            assert page.locator("#alerts td", has_text="kl_spike").count() == 1
            assert EVIL in page.locator("#samples pre").all_inner_texts()  # the raw text, shown as text
            assert page.evaluate("window.__xss") is None
            # the stylesheet loaded (CSP allows 'self'): charts sit in a grid
            assert page.evaluate("getComputedStyle(document.querySelector('.charts')).display") == "grid"
            name = f"runs-page-{db_url.split(':')[0]}.png"
            page.screenshot(path=str(tmp_path / name), full_page=True)
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / name), full_page=True)
            page.click("a.child-run")
            page.wait_for_load_state("networkidle")
            assert page.locator("a.parent-run").inner_text() == ids["a"]
        finally:
            browser.close()
    assert not problems, problems
    assert (tmp_path / name).stat().st_size > 10_000
