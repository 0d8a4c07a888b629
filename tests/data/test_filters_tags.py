"""Filter rules (each one's drop count reported) and the `--where` language (safe: a grammar, never eval)."""

from __future__ import annotations

import json

import pytest
from tests.data.conftest import write_jsonl
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.data.curation.common import CurationError
from alignflow.data.curation.filters import apply_rules, filter_dataset, parse_rule
from alignflow.data.curation.tags import parse_where, tag_rows

runner = CliRunner()


def judge(prompts: list[str], responses: list[str]) -> list[float]:
    """A stand-in judge for the `fn=` score rule: the response's length in words."""
    return [float(len(r.split())) for r in responses]


ROWS = [
    {
        "id": "0",
        "prompt": "What is the weather like in Paris today?",
        "chosen": "Sunny and warm.",
        "rejected": "No.",
        "meta": json.dumps({"judge": 8, "a1": 1, "a2": 1, "a3": 1}),
    },
    {
        "id": "1",
        "prompt": "Quel temps fait-il à Paris aujourd'hui, mon ami?",
        "chosen": "Il fait beau.",
        "rejected": "Non.",
        "meta": json.dumps({"judge": 9, "a1": 1, "a2": 2, "a3": 1}),
    },
    {
        "id": "2",
        "prompt": "Email me at jane.doe@example.com about the invoice please",
        "chosen": "Sure thing.",
        "rejected": "No.",
        "meta": json.dumps({"judge": 3, "a1": 2, "a2": 2, "a3": 2}),
    },
    {
        "id": "3",
        "prompt": "x" * 300,
        "chosen": "As an AI, I cannot.",
        "rejected": "ok",
        "meta": json.dumps({"judge": 7, "a1": 1, "a2": 2, "a3": 0}),
    },
]


@pytest.mark.parametrize(
    ("rule", "kept"),
    [
        ("length:field=prompt,max=100", ["0", "1", "2"]),
        ("length:field=prompt,min=2,max=12,unit=words", ["0", "1", "2"]),
        ("language:field=prompt,allow=en", ["0", "2"]),
        ("language:deny=fr", ["0", "2", "3"]),
        ("pii:types=email|phone", ["0", "1", "3"]),
        ("regex:field=chosen,pattern=(?i)as an ai,", ["0", "1", "2"]),
        ("regex:field=chosen,action=keep,pattern=\\.$", ["0", "1", "2", "3"]),
        ("score:field=meta.judge,min=7", ["0", "1", "3"]),
        ("score:fn=tests.data.test_filters_tags:judge,min=3", ["0", "1", "3"]),
        ("score:fn=tests.data.test_filters_tags:judge,on=margin,min=2", ["0", "1", "3"]),
        ("agreement:labels=meta.a1|meta.a2|meta.a3,min=0.66", ["0", "1", "2"]),
    ],
)
def test_each_rule(rule: str, kept: list[str]) -> None:
    from alignflow.cli.curate import _scorer

    keep, report = apply_rules(ROWS, [parse_rule(rule)], scorer_for=_scorer)
    assert [r["id"] for r, k in zip(ROWS, keep, strict=True) if k] == kept
    assert report == [{"rule": rule, "dropped": len(ROWS) - len(kept), "examined": len(ROWS)}]


def test_rules_apply_in_order_and_report_their_drops(cstore, tmp_path) -> None:
    from alignflow.data.io import import_dataset

    aid = import_dataset(
        cstore,
        write_jsonl(tmp_path / "f.jsonl", [dict(r, meta=None) | json.loads(r["meta"]) for r in ROWS]),
        "pairs",
        name="f",
    )
    rep = filter_dataset(cstore, aid, ["length:field=prompt,max=100", "score:field=meta.judge,min=5"])
    assert [r["dropped"] for r in rep["per_rule"]] == [1, 1]
    assert [r["examined"] for r in rep["per_rule"]] == [4, 3]
    info = cstore.get(rep["output"])
    assert (
        info.meta["counts"]["rows_out"] == 2
        and info.meta["params"]["rules"][1] == "score:field=meta.judge,min=5"
    )
    assert cstore.resolve("f@v2") == rep["output"]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("size:max=3", "unknown rule type 'size'"),
        ("length:field=prompt", "give min and/or max"),
        ("length:max=ten", "max must be a number"),
        ("length:min=5,max=2", "min 5.0 is above max 2.0"),
        ("length:max=5,unit=lines", "unit must be chars, words or tokens"),
        ("length:max=5,colour=red", "unknown key 'colour'"),
        ("language:allow=english", "'english' is not an ISO 639-1"),
        ("language:allow=en,deny=fr", "exactly one of allow= or deny="),
        ("regex:pattern=(unclosed", "invalid regex"),
        ("pii:types=email|dna", "unknown PII type 'dna'"),
        ("score:min=1", "exactly one of field=, model= or fn="),
        ("agreement:labels=meta.a1,min=2", "min must be a number in [0, 1]"),
        ("length", "give min and/or max"),
    ],
)
def test_bad_rules_name_the_argument(rule: str, message: str) -> None:
    with pytest.raises(CurationError, match="--rule") as exc:
        parse_rule(rule)
    assert message in str(exc.value)


def test_cli_filter_bad_rule_exits_2_and_writes_nothing(sqlite_workspace, tmp_path, monkeypatch) -> None:
    import sys

    from alignflow.cli.common import open_store
    from alignflow.cli.main import main

    src = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert runner.invoke(app, ["data", "import", str(src), "--kind", "pairs", "--name", "f"]).exit_code == 0
    monkeypatch.setattr(
        sys, "argv", ["alignflow", "data", "filter", "f", "--rule", "length:max=9", "--rule", "length:max=x"]
    )
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert len(open_store().find(name="f")) == 1
    res = runner.invoke(app, ["data", "filter", "f", "--rule", "length:field=prompt,max=0"])
    assert isinstance(res.exception, CurationError) and "no rows left" in str(res.exception)
    assert len(open_store().find(name="f")) == 1


def test_where_expressions() -> None:
    row = {
        "id": "7",
        "prompt": "How do I kill a process?",
        "chosen": "Use kill.",
        "rejected": "No.",
        "weight": 0.5,
        "meta": json.dumps({"source": "web", "score": 3}),
    }

    def ev(expr: str):
        return parse_where(expr)(row)

    assert ev("len(prompt) > 10 and meta.source == 'web'")
    assert ev("prompt contains 'kill' and not chosen contains 'gun'")
    assert ev("meta.score >= 3 or weight > 1")
    assert not ev("(meta.score > 3 or weight > 1) and id == '7'")
    assert ev("prompt matches '^How' and meta.missing == null")
    assert not ev("meta.score > 'abc'")  # a number and a string do not compare
    assert ev('weight == 0.5 and id != "8"')
    assert ev("response contains 'kill'")


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("__import__('os').system('true')", "unexpected character"),
        ("__import__('os')", "unexpected '('"),
        ("prompt ==", "ends too early"),
        ("len(prompt > 3", "expected ')'"),
        ("prompt = 'x'", "unexpected character"),
        ("nosuchcolumn == 1", "unknown column 'nosuchcolumn'"),
        ("", "empty expression"),
        ("prompt == 'a' 'b'", "unexpected \"'b'\""),
    ],
)
def test_where_rejects_anything_but_the_grammar(expr: str, message: str) -> None:
    row = {"id": "1", "prompt": "p", "meta": "{}"}
    with pytest.raises(CurationError, match="--where") as exc:
        parse_where(expr)(row)
    assert message in str(exc.value)


def test_tag_rows_and_cli(sqlite_workspace, tmp_path) -> None:
    rows = [
        {"id": str(i), "prompt": f"q{i}", "chosen": "a" * i, "rejected": "b", "meta": "{}"}
        for i in range(1, 5)
    ]
    out, n = tag_rows(rows, "len(chosen) >= 3", "long")
    assert n == 2 and [json.loads(r["meta"]).get("tags") for r in out] == [None, None, ["long"], ["long"]]
    again, n2 = tag_rows(out, "len(chosen) >= 3", "long")
    assert n2 == 0 and again == out
    with pytest.raises(CurationError, match="--tag"):
        tag_rows(rows, "true", "bad tag!")
    src = write_jsonl(tmp_path / "t.jsonl", [{k: v for k, v in r.items() if k != "meta"} for r in rows])
    runner.invoke(app, ["data", "import", str(src), "--kind", "pairs", "--name", "t"])
    res = runner.invoke(app, ["data", "tag", "t", "--where", "len(chosen) >= 3", "--tag", "long"])
    assert res.exit_code == 0 and "tagged 2 of 4 rows" in res.output and "wrote t@v2" in res.output
    res = runner.invoke(app, ["data", "stats", "t@v2", "--json", "--language-sample", "4"])
    assert json.loads(res.stdout)["tags"] == {"long": 2}


@pytest.mark.slow
def test_score_rule_with_a_reward_model_folder(tmp_path) -> None:
    """Model-based pruning: a reward-model folder (a tiny Llama, not trained) scores chosen replies; the rule
    keeps the rows at or above a threshold on those very scores."""
    import statistics

    import torch

    from alignflow.data.curation.filters import reward_model_scorer
    from alignflow.models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "rm", vocab_size=300, hidden_size=32, num_layers=1)
    rows = [dict(r, chosen=f"{r['chosen']} {i}") for i, r in enumerate(ROWS)]
    rule = parse_rule(f"score:model={model},min=0")
    torch.manual_seed(0)
    scores = reward_model_scorer(rule)([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    cut = statistics.median(scores)
    torch.manual_seed(0)
    keep, _ = apply_rules(rows, [parse_rule(f"score:model={model},min={cut!r}")])
    assert keep == [s >= cut for s in scores] and 0 < sum(keep) < len(rows)
