"""Mixtures: exact weights over 100k rows, determinism, temperature balancing of three languages, mixture specs as
`data.train`, and clear errors for bad sources and weights."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.data.curation.common import CurationError
from alignflow.data.curation.lang import detect_languages
from alignflow.data.curation.mix import apportion, language_counts, mix_rows, parse_mix_spec
from alignflow.data.io import resolve_dataset

from .conftest import write_jsonl

runner = CliRunner()

SENTENCES = {
    "en": [
        "Could you please explain how the weather forecast is made every morning?",
        "I would like to know which train goes to the airport in the evening.",
        "My grandmother always tells the most wonderful stories about her childhood.",
    ],
    "fr": [
        "Pourriez-vous m'expliquer comment la météo est préparée chaque matin ?",
        "Je voudrais savoir quel train va à l'aéroport ce soir, s'il vous plaît.",
        "Ma grand-mère raconte toujours les plus belles histoires de son enfance.",
    ],
    "de": [
        "Könnten Sie mir bitte erklären, wie die Wettervorhersage jeden Morgen entsteht?",
        "Ich möchte wissen, welcher Zug heute Abend zum Flughafen fährt.",
        "Meine Großmutter erzählt immer die schönsten Geschichten aus ihrer Kindheit.",
    ],
}


def _rows(label: str, n: int) -> list[dict]:
    return [
        {"id": str(i), "prompt": f"{label} {i}", "completion": "c", "messages": None, "meta": "{}"}
        for i in range(n)
    ]


def test_apportion_is_exact() -> None:
    assert apportion(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert apportion(7, [1 / 3] * 3) == [3, 2, 2]
    counts = apportion(100_003, [0.55, 0.3, 0.15])
    assert sum(counts) == 100_003 and all(
        abs(c - w * 100_003) < 1 for c, w in zip(counts, [0.55, 0.3, 0.15], strict=True)
    )


def test_realised_proportions_over_100k_rows_and_determinism() -> None:
    sources = [("a", _rows("a", 40_000)), ("b", _rows("b", 30_000)), ("c", _rows("c", 10_000))]
    weights = [0.5, 0.3, 0.2]
    out, report = mix_rows(sources, weights, rows=100_000, seed=7)
    shares = Counter(json.loads(r["meta"])["mix_source"] for r in out)
    for (label, _), w in zip(sources, weights, strict=True):
        assert abs(shares[label] / 100_000 - w) < 0.01
        assert shares[label] == round(w * 100_000)
    assert [s["repeated"] for s in report["sources"]] == [10_000, 0, 10_000]
    assert len({r["id"] for r in out}) == len(out)
    again, _ = mix_rows(sources, weights, rows=100_000, seed=7)
    assert [r["id"] for r in again[:50]] == [r["id"] for r in out[:50]]
    other, _ = mix_rows(sources, weights, rows=100_000, seed=8)
    assert [r["id"] for r in other[:50]] != [r["id"] for r in out[:50]]


def test_temperature_balances_three_languages() -> None:
    assert language_counts(["en"] * 80 + ["fr"] * 15 + ["de"] * 5, 1000, 1.0) == {
        "de": 50,
        "en": 800,
        "fr": 150,
    }
    src = []
    for lang, n in (("en", 80), ("fr", 15), ("de", 5)):
        for i in range(n):
            src.append(
                {"id": f"{lang}{i}", "prompt": SENTENCES[lang][i % 3], "completion": "c", "meta": "{}"}
            )
    out, report = mix_rows([("s", src)], [1.0], rows=1000, seed=0, temperature=0.5)
    # q ∝ p^0.5: sqrt(.80), sqrt(.15), sqrt(.05) normalised = 0.594, 0.257, 0.149
    assert report["sources"][0]["languages"] == {"de": 149, "en": 594, "fr": 257}
    detected = Counter(detect_languages([r["prompt"] for r in out]))
    assert detected == {"en": 594, "fr": 257, "de": 149}
    natural, _ = mix_rows([("s", src)], [1.0], rows=1000, seed=0, temperature=1.0)
    assert Counter(detect_languages([r["prompt"] for r in natural])) == {"en": 800, "fr": 150, "de": 50}


def test_cli_mix_and_mixture_spec_as_data_train(sqlite_workspace, tmp_path) -> None:
    for name, n in (("a", 30), ("b", 20)):
        src = write_jsonl(
            tmp_path / f"{name}.jsonl", [{"prompt": f"{name}{i}", "completion": "x"} for i in range(n)]
        )
        assert (
            runner.invoke(app, ["data", "import", str(src), "--kind", "sft", "--name", name]).exit_code == 0
        )
    res = runner.invoke(app, ["data", "mix", "--source", "a:0.6", "--source", "b@v1:0.4", "--rows", "40"])
    assert res.exit_code == 0, res.output
    assert "wrote mix@v1" in res.output
    from alignflow.cli.common import open_store

    store = open_store()
    info = store.get("mix")
    assert info.meta["num_rows"] == 40 and info.meta["params"]["sources"][1]["weight"] == 0.4
    assert {e[2] for e in store.lineage(info.id).edges} == {"source"}
    spec = "mix:a:0.6,b:0.4;rows=40;seed=0"
    assert resolve_dataset(store, spec, "sft") == info.id  # the same mixture is the same dataset
    assert parse_mix_spec("mix:a:0.5,b:0.5;temperature=0.7") == {
        "sources": ["a:0.5", "b:0.5"],
        "temperature": 0.7,
    }
    with pytest.raises(CurationError, match="this stage needs pairs"):
        resolve_dataset(store, spec, "pairs")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "a:0.5", "--source", "b:0.3"], "weights sum to 0.8"),
        (["--source", "a:-1", "--source", "b:2"], "weight must be a finite number > 0"),
        (["--source", "a:half"], "weight 'half' is not a number"),
        (["--source", "a"], "expected DATASET:WEIGHT"),
        (["--source", "a:1", "--languages", "temp=0.5"], "--languages"),
        (["--source", "a:1", "--languages", "temperature=2"], "temperature must be in (0, 1]"),
        (["--source", "a:1", "--rows", "0"], "--rows must be at least 1"),
        ([], "give at least one --source"),
        (["--source", "a:0.5", "--source", "a:0.5"], "the same dataset is given twice"),
    ],
)
def test_bad_sources_and_weights(sqlite_workspace, tmp_path, monkeypatch, args, message) -> None:
    import sys

    from alignflow.cli.common import open_store
    from alignflow.cli.main import main

    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "x"}])
    runner.invoke(app, ["data", "import", str(src), "--kind", "sft", "--name", "a"])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "y"}])
    runner.invoke(app, ["data", "import", str(tmp_path / "b.jsonl"), "--kind", "sft", "--name", "b"])
    monkeypatch.setattr(sys, "argv", ["alignflow", "data", "mix", *args])
    res = runner.invoke(app, ["data", "mix", *args])
    assert isinstance(res.exception, CurationError) and message in str(res.exception), res.output
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert open_store().find(name="mix") == []
