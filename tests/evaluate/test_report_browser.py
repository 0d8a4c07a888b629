"""Open the report in headless Chromium (Playwright): no errors, all images decode, verdict visible.

Writes a full-page screenshot to test-artifacts/report.png (gitignored) for a human to look at.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from alignflow.evaluate.report import write_report

from .conftest import XSS

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def test_report_renders_in_chromium(tmp_path: Path, report_data):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {CHROMIUM} is missing: install it with apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} not installed")
    from playwright.sync_api import sync_playwright

    path = write_report(tmp_path, report_data)
    console_errors: list[str] = []
    page_errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")

            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({ok: e.complete && e.naturalWidth > 0, w: e.naturalWidth}))"
            )
            verdict = page.inner_text("#verdict")
            # The injected markup is shown as text and never becomes an element.
            injected = page.eval_on_selector_all("img[src='x'], script", "els => els.length")
            sample_text = page.inner_text("#samples")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()

    assert console_errors == [] and page_errors == []
    assert len(images) == 9 and all(i["ok"] for i in images), images
    assert verdict.startswith("PPO beats SFT on gold utility: +")
    assert injected == 0
    assert XSS in sample_text
    # Self-contained: the only fetches are the page itself and its inline data: images.
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
