"""The HTML report: self-contained, escaped, sections present only when their data is, clear errors."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from alignflow.evaluate.report import print_summary, render_html, verdict_text, write_report

from .conftest import XSS


def test_full_report_is_self_contained_and_escaped(tmp_path: Path, report_data):
    path = write_report(tmp_path / "out", report_data)
    assert path == tmp_path / "out" / "index.html"
    page = path.read_text(encoding="utf-8")
    # No scripts, no external resources: every src is a data: URI and there are no <link> or @import.
    assert "<script" not in page.lower()
    assert "<link" not in page.lower() and "@import" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"https?://", page)
    # Injected markup is shown as text.
    assert XSS not in page
    assert html_escaped(XSS) in page
    assert "Explain &lt;b&gt;KL&lt;/b&gt; &amp; why" in page
    # Every section is there.
    for sec in ["warnings", "summary", "policies", "win-rates", "proxy-vs-gold", "curves", "reliability",
                "annotators", "samples", "lineage", "stage-times"]:  # fmt: skip
        assert f'<section id="{sec}"' in page, sec
    assert "Lineage of the final policy" in page
    assert report_data["verdict"].startswith("PPO beats SFT on gold utility: +")
    assert html_escaped(report_data["verdict"]) in page
    # Plots: policies, win rates, proxy/gold, 4 curves, reliability, annotators = 9 decodable PNGs.
    assert len(srcs) == 9
    for s in srcs:
        png = base64.b64decode(s.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp"))


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_minimal_report_skips_missing_sections(tmp_path: Path):
    page = write_report(tmp_path, {"title": "Only a title"}).read_text()
    assert "<h1>Only a title</h1>" in page
    assert "<section" not in page and "<img" not in page
    assert 'id="verdict"' not in page


def test_default_verdict_names_the_best_policy():
    page = render_html(
        {
            "title": "t",
            "policies": {
                "a": {"mean": 0.1, "lo": 0.0, "hi": 0.2, "n": 3},
                "b": {"mean": 0.4, "lo": 0.3, "hi": 0.5, "n": 3},
            },
        }  # fmt: skip
    )
    assert "Best on gold utility: b 0.4 [0.3, 0.5]" in page


def test_verdict_text_wording():
    """Decimals give the CI width two significant digits."""
    assert (
        verdict_text("PPO", "SFT", 0.12, 0.08, 0.16) == "PPO beats SFT on gold utility: +0.120 [0.080, 0.160]"
    )
    assert (
        verdict_text("DPO", "SFT", -0.1, -0.2, -0.01)
        == "DPO is worse than SFT on gold utility: -0.10 [-0.20, -0.01]"
    )
    assert verdict_text("DPO", "SFT", 0.01, -0.02, 0.04, metric="win rate") == (
        "DPO is not distinguishable from SFT on win rate: +0.010 [-0.020, 0.040]"
    )
    assert verdict_text("A", "B", 12.0, 12.0, 12.0) == "A beats B on gold utility: +12 [12, 12]"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, r"data\['title'\]: required"),
        ({"title": "t", "polices": {}}, r"unknown key\(s\) \['polices'\]"),
        ({"title": "t", "policies": {"ppo": {"mean": 1.0, "hi": 2.0}}}, r"data\['policies'\]\['ppo'\]: missing key 'lo'"),
        ({"title": "t", "win_rates": {"x": {"rate": "high", "lo": 0, "hi": 1}}}, r"\['x'\]\['rate'\]: expected a number"),
        ({"title": "t", "curves": {"loss": {"train": [[0, 1], [1]]}}}, r"\['train'\]\[1\]: expected \[step, value\]"),
        ({"title": "t", "proxy_vs_gold": {"steps": [0, 1], "proxy": [1.0]}}, r"\['proxy'\]: has 1 values but 'steps' has 2"),
        ({"title": "t", "samples": [{"prompt": "p", "policy": "x"}]}, r"data\['samples'\]\[0\]: missing key 'response'"),
        ({"title": "t", "reliability": {"bins": []}}, r"data\['reliability'\]: missing key 'ece'"),
    ],
)  # fmt: skip
def test_bad_data_names_the_key_path(tmp_path: Path, data, message):
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path, data)
    assert not (tmp_path / "index.html").exists()


def test_print_summary(report_data, tmp_path: Path):
    buf = io.StringIO()
    console = Console(file=buf, width=140, color_system=None)
    print_summary(report_data, console, report_path=tmp_path / "index.html")
    out = buf.getvalue()
    assert "gold utility" in out and "PPO" in out and "DPO" in out
    assert "PPO beats SFT on gold utility" in out
    assert "warning: Possible reward hacking" in out
    assert f"report: {tmp_path / 'index.html'}" in out


def test_numpy_inputs_are_accepted(tmp_path: Path):
    """Pipelines hand over NumPy arrays and scalars; they render like Python numbers."""
    import numpy as np

    steps = np.arange(10)
    page = render_html(
        {
            "title": "np",
            "summary_rows": [{"policy": "ppo", "gold": np.float32(0.25), "n": np.int64(1200)}],
            "policies": {
                "ppo": {"mean": np.float64(0.3), "lo": np.float32(0.2), "hi": 0.4, "n": np.int64(5)}
            },
            "proxy_vs_gold": {"steps": steps, "proxy": steps * 0.1, "gold": np.ones(10), "length": None},
        }
    )
    assert '<td class="num">0.25</td>' in page and '<td class="num">1,200</td>' in page
    assert page.count("<img") == 2


def test_facts_table_formats_values_and_rejects_non_mapping(tmp_path: Path) -> None:
    html_text = render_html(
        {"title": "t", "facts": {"reward model accuracy": 0.71234, "recall": None, "pairs": 412}}
    )
    assert "Key figures" in html_text and "0.712" in html_text and "n/a" in html_text and "412" in html_text
    with pytest.raises(ValueError, match=r"data\['facts'\]"):
        render_html({"title": "t", "facts": [1, 2]})
