"""Statistics (terminal, JSON, HTML), diffs, and Hugging Face save_to_disk folders in and out."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.data.curation.stats import compute_stats, diff_stats

from .conftest import write_jsonl

runner = CliRunner()

ROWS = [
    {
        "id": "0",
        "prompt": "one two three",
        "chosen": "a b",
        "rejected": "c",
        "weight": 1.0,
        "meta": json.dumps({"score": 1.0, "tags": ["x"]}),
    },
    {
        "id": "1",
        "prompt": "One, two; three!",
        "chosen": "d",
        "rejected": "e f g",
        "weight": 2.0,
        "meta": json.dumps({"score": 3.0}),
    },
    {
        "id": "2",
        "prompt": "The weather in London is rainy again today, I am afraid.",
        "chosen": "a b",
        "rejected": "c",
        "weight": 1.0,
        "meta": json.dumps({"score": 2.0, "tags": ["x", "y"]}),
    },
]


def test_compute_stats_by_hand() -> None:
    s = compute_stats(ROWS, "pairs")
    assert s["rows"] == 3
    assert s["lengths"]["prompt"]["words"]["min"] == 3 and s["lengths"]["prompt"]["words"]["max"] == 11
    assert s["lengths"]["rejected"]["chars"]["p50"] == 1
    assert s["duplicates"] == {"prompt": 1, "response": 1, "row": 0}
    assert s["tags"] == {"x": 2, "y": 1}
    assert s["scores"]["meta.score"]["mean"] == 2.0 and s["scores"]["weight"]["max"] == 2.0
    assert s["languages"]["counts"]["en"] >= 1 and s["languages"]["sampled"] == 3


def test_token_lengths_with_a_tokenizer() -> None:
    class Tok:
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    s = compute_stats(ROWS, "pairs", tokenizer=Tok())
    assert s["lengths"]["prompt"]["tokens"]["max"] == 11


def test_diff() -> None:
    a, b = ROWS, ROWS[:2] + [dict(ROWS[0], id="9", prompt="brand new prompt")]
    d = diff_stats(compute_stats(a, "pairs"), compute_stats(b, "pairs"), a, b)
    assert (d["removed"], d["added"]) == (1, 1)
    assert d["changes"]["lengths.prompt.words.max"]["delta"] == 3 - 11


def test_cli_stats_html_and_diff(sqlite_workspace, tmp_path) -> None:
    src = write_jsonl(
        tmp_path / "s.jsonl",
        [{k: v for k, v in r.items() if k != "meta"} | json.loads(r["meta"]) for r in ROWS],
    )
    assert runner.invoke(app, ["data", "import", str(src), "--kind", "pairs", "--name", "s"]).exit_code == 0
    html = tmp_path / "s.html"
    res = runner.invoke(app, ["data", "stats", "s", "--html", str(html)])
    assert res.exit_code == 0, res.output
    assert "3 pairs rows" in res.output and "duplicates: by prompt 1" in res.output
    page = html.read_text()
    assert page.count("<img") >= 6 and "data:image/png;base64," in page and "<h2>Languages</h2>" in page
    assert runner.invoke(app, ["data", "dedup", "s", "--exact", "--by", "prompt"]).exit_code == 0
    res = runner.invoke(app, ["data", "diff", "s@v1", "s@v2", "--json"])
    d = json.loads(res.stdout)
    assert d["rows_a"] == 3 and d["rows_b"] == 2 and d["removed"] == 1
    res = runner.invoke(app, ["data", "diff", "s@v1", "s@v2"])
    assert "3 -> 2 rows: 1 removed, 0 added" in res.output


def test_hf_folder_round_trip(sqlite_workspace, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "hf_in"
    datasets.Dataset.from_list(
        [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no", "source": "web"} for i in range(5)]
    ).save_to_disk(str(folder))
    res = runner.invoke(app, ["data", "import", str(folder), "--kind", "pairs", "--name", "hfd"])
    assert res.exit_code == 0, res.output
    from alignflow.cli.common import open_store
    from alignflow.data.io import export_dataset

    store = open_store()
    assert store.get("hfd").meta["num_rows"] == 5
    out = tmp_path / "hf_out"
    res = runner.invoke(app, ["data", "export", "hfd", str(out), "--format", "hf"])
    assert res.exit_code == 0 and "wrote 5 rows" in res.output, res.output
    back = datasets.load_from_disk(str(out))
    assert back[0]["prompt"] == "q0" and back[0]["source"] == "web" and len(back) == 5
    bad = tmp_path / "hf_bad"
    datasets.Dataset.from_list([{"prompt": "q", "chosen": 3, "rejected": "no"}]).save_to_disk(str(bad))
    res = runner.invoke(app, ["data", "import", str(bad), "--kind", "pairs"])
    assert "row 1: field 'chosen'" in str(res.exception)
    res = runner.invoke(app, ["data", "export", "hfd", str(tmp_path / "x"), "--format", "arrow"])
    assert "--format must be hf" in str(res.exception)
    assert export_dataset(store, "hfd", tmp_path / "again.jsonl") == 5
