"""`alignflow runs ls | show | compare | alerts` through the real Typer app, over runs written by the store API
and by a tiny SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignflow.cli.main import app
from alignflow.errors import AlignflowError

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console():  # noqa: ANN201
    """Tables as a 200-column terminal prints them (the test runner's 80 columns fold the cells)."""
    from alignflow.cli.common import console

    old = console.width
    console.width = 200
    yield
    console.width = old


def cli(*args: object, ok: bool = True):  # noqa: ANN201
    r = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def cli_json(*args: object):  # noqa: ANN201
    return json.loads(cli(*args, "--json").output)


def failure(*args: object) -> str:
    """The AlignflowError a command raises (`main()` turns it into one line and exit code 2)."""
    r = cli(*args, ok=False)
    assert isinstance(r.exception, AlignflowError), (r.output, r.exception)
    return str(r.exception)


@pytest.fixture
def runs(store) -> dict[str, str]:
    """Three runs: sft-a (finished, alerts, an input dataset and a checkpoint output), sft-b (stopped, fewer
    metrics), and dpo-c, which read sft-a's checkpoint."""
    data = store.put_dataset([{"prompt": "p", "completion": "c"}], kind="sft", name="toy-sft")
    a = store.start_run("sft", config={"model": {"path": "/m/tiny"}, "train": {"max_steps": 4}}, name="alpha")
    for step, (loss, acc) in enumerate([(3.0, 0.2), (2.0, 0.5), (1.5, 0.7), (1.7, 0.6)], start=1):
        store.log_metrics(a, step, {"loss": loss, "eval/accuracy": acc, "lr": 1e-3})
    ckpt = store.put_json({"weights": "a"}, kind="checkpoint", name="sft-alpha", parents=[(data, "dataset")],
                          run_id=a)  # fmt: skip
    store.finish_run(a, summary={"outputs": {"checkpoint": ckpt}})
    store.add_alert(a, step=2, rule="kl_spike", severity="warning", metric="kl", value=0.9, threshold=0.5,
                    message="kl 0.9 above its baseline", actions=("log", "store"))  # fmt: skip
    store.add_alert(a, step=4, rule="nonfinite", severity="critical", metric="loss", value=float("nan"),
                    threshold=0.0, message="loss is NaN", actions=("store", "stop"))  # fmt: skip
    b = store.start_run("sft", config={"train": {"max_steps": 2}}, name="beta")
    store.log_metrics(b, 1, {"loss": 2.5, "eval/accuracy": 0.4})
    store.log_metrics(b, 2, {"loss": 2.2, "eval/accuracy": 0.8})
    store.finish_run(b, status="stopped", summary={"stopped_at_step": 2, "stopped_by": "alert:kl_spike"})
    c = store.start_run("dpo", config={"loss": {"type": "sigmoid", "beta": 0.1}}, name="gamma")
    store.add_edge(
        ckpt, store.put_json({"weights": "c"}, kind="checkpoint", run_id=c), "base_model", run_id=c
    )
    store.log_metrics(c, 1, {"loss": 0.69})
    store.add_alert(c, step=1, rule="reward_plateau", severity="info", metric="loss", value=0.69,
                    threshold=0.01, message="flat", actions=("log",))  # fmt: skip
    return {"a": a, "b": b, "c": c, "data": data, "ckpt": ckpt}


def test_ls_lists_runs_newest_first_with_alert_counts_and_filters(runs) -> None:
    rows = cli_json("runs", "ls")
    assert [r["id"] for r in rows] == [runs["c"], runs["b"], runs["a"]]
    by_id = {r["id"]: r for r in rows}
    assert (
        by_id[runs["a"]]["alerts"] == 2
        and by_id[runs["b"]]["alerts"] == 0
        and by_id[runs["c"]]["alerts"] == 1
    )
    assert by_id[runs["b"]]["status"] == "stopped" and by_id[runs["c"]]["status"] == "running"
    assert by_id[runs["a"]]["duration_s"] >= 0 and by_id[runs["c"]]["duration_s"] is None
    assert [r["id"] for r in cli_json("runs", "ls", "--stage", "sft")] == [runs["b"], runs["a"]]
    assert [r["id"] for r in cli_json("runs", "ls", "--status", "stopped")] == [runs["b"]]
    assert [r["id"] for r in cli_json("runs", "ls", "--limit", "1")] == [runs["c"]]
    table = cli("runs", "ls").output
    assert runs["a"] in table and "alpha" in table and "stopped" in table
    assert "--status must be" in failure("runs", "ls", "--status", "done")


def test_show_prints_config_status_metrics_outputs_lineage_and_alerts(runs) -> None:
    d = cli_json("runs", "show", runs["a"])
    assert d["status"] == "finished" and d["name"] == "alpha"
    assert d["config_summary"] == {"model.path": "/m/tiny", "train.max_steps": 4}
    assert d["final_metrics"]["loss"] == {"value": 1.7, "step": 4}
    assert d["best_metrics"]["loss"] == {"value": 1.5, "step": 3, "mode": "min"}
    assert d["best_metrics"]["eval/accuracy"] == {"value": 0.7, "step": 3, "mode": "max"}
    assert d["outputs"] == {"checkpoint": runs["ckpt"]}
    lin = d["lineage"]
    assert [(i["id"], i["role"], i["name"]) for i in lin["inputs"]] == [(runs["data"], "dataset", "toy-sft")]
    assert [o["id"] for o in lin["outputs"]] == [runs["ckpt"]]
    assert lin["child_runs"] == [runs["c"]] and lin["parent_runs"] == []
    assert [a["rule"] for a in d["alerts"]] == ["kl_spike", "nonfinite"] and d["alerts_total"] == 2
    assert d["alerts"][0]["actions"] == ["log", "store"] and d["alerts"][0]["step"] == 2
    # --alerts N keeps the last N
    assert [a["rule"] for a in cli_json("runs", "show", runs["a"], "--alerts", "1")["alerts"]] == [
        "nonfinite"
    ]
    c = cli_json("runs", "show", "gamma")  # by name
    assert c["id"] == runs["c"] and c["lineage"]["parent_runs"] == [runs["a"]]
    assert c["lineage"]["inputs"][0]["role"] == "base_model"
    assert c["config_summary"] == {"loss.type": "sigmoid", "loss.beta": 0.1}
    assert cli_json("runs", "show", runs["b"][:-2])["id"] == runs["b"]  # a unique prefix
    assert "alert:kl_spike" in cli("runs", "show", "beta").output  # which alert stopped it
    assert cli_json("runs", "show", runs["a"], "--config")["config"]["train"] == {"max_steps": 4}
    text = cli("runs", "show", runs["a"]).output
    for fragment in ("config summary", "model.path", "final metrics", "eval/accuracy", "outputs", "checkpoint",
                     "lineage", "toy-sft", runs["c"], "kl 0.9 above its baseline", "nonfinite"):  # fmt: skip
        assert fragment in text, fragment
    assert "no run 'nope'" in failure("runs", "show", "nope")
    assert "ambiguous" in failure("runs", "show", "sft-")


def test_compare_shows_final_and_best_of_common_metrics(runs) -> None:
    t = cli_json("runs", "compare", runs["a"], runs["b"])
    assert t["runs"] == [runs["a"], runs["b"]]
    rows = {r["metric"]: r for r in t["metrics"]}
    assert set(rows) == {"eval/accuracy", "loss"}  # lr was logged by one run only
    assert rows["loss"]["mode"] == "min"
    assert rows["loss"]["runs"][runs["a"]] == {"final": 1.7, "final_step": 4, "best": 1.5, "best_step": 3}
    assert rows["loss"]["runs"][runs["b"]] == {"final": 2.2, "final_step": 2, "best": 2.2, "best_step": 2}
    assert rows["eval/accuracy"]["runs"][runs["b"]]["best"] == 0.8
    only = cli_json("runs", "compare", "alpha", "beta", "--metric", "loss")
    assert [r["metric"] for r in only["metrics"]] == ["loss"]
    text = cli("runs", "compare", "alpha", "beta").output
    assert "metrics in common" in text and "1.5 (3)" in text and "lower" in text and "higher" in text
    assert "not logged by" in failure("runs", "compare", "alpha", "beta", "--metric", "lr")
    assert "at least two" in failure("runs", "compare", "alpha")
    assert "named twice" in failure("runs", "compare", "alpha", runs["a"])


def test_compare_without_common_metrics_says_so(store) -> None:
    x = store.start_run("sft")
    y = store.start_run("rm")
    store.log_metrics(x, 1, {"loss": 1.0})
    store.log_metrics(y, 1, {"accuracy": 0.5})
    assert cli_json("runs", "compare", x, y)["metrics"] == []
    assert "no metric in common" in cli("runs", "compare", x, y).output


def test_alerts_lists_rows_for_all_runs_or_one_and_filters_by_severity(runs) -> None:
    rows = cli_json("runs", "alerts")
    assert [(a["run_id"], a["rule"]) for a in rows] == [
        (runs["a"], "kl_spike"),
        (runs["a"], "nonfinite"),
        (runs["c"], "reward_plateau"),
    ]
    assert rows[0]["value"] == 0.9 and rows[0]["threshold"] == 0.5 and rows[0]["severity"] == "warning"
    assert [a["rule"] for a in cli_json("runs", "alerts", "gamma")] == ["reward_plateau"]
    assert [a["rule"] for a in cli_json("runs", "alerts", "--severity", "warning")] == [
        "kl_spike",
        "nonfinite",
    ]
    assert [a["rule"] for a in cli_json("runs", "alerts", "--severity", "critical")] == ["nonfinite"]
    assert cli_json("runs", "alerts", runs["b"]) == []
    text = cli("runs", "alerts").output
    assert "kl 0.9 above its baseline" in text and runs["c"] in text
    assert "no alerts" in cli("runs", "alerts", runs["b"]).output
    assert "--severity must be" in failure("runs", "alerts", "--severity", "loud")


def test_a_tiny_sft_run_shows_its_config_metrics_and_checkpoint(sqlite_workspace, tmp_path: Path) -> None:
    from alignflow.models import make_tiny_model_dir

    model = make_tiny_model_dir(tmp_path / "tiny", hidden_size=32, num_layers=1, vocab_size=300)
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"say {w}", "completion": f"{w} {w}."}) + "\n" for w in "abcdefghijkl")
    )
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        json.dumps(
            {
                "stage": "sft",
                "run_name": "tiny-sft",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(model), "dtype": "float32"},
                "data": {"train": str(data), "eval_fraction": 0.25, "max_length": 32},
                "optim": {"lr": 2e-3, "scheduler": "constant"},
                "train": {"seed": 0, "batch_size": 4, "max_steps": 3},
            }
        )
    )
    cli("sft", cfg)
    (listed,) = cli_json("runs", "ls")
    assert listed["stage"] == "sft" and listed["status"] == "finished" and listed["name"] == "tiny-sft"
    d = cli_json("runs", "show", "tiny-sft")
    assert d["config_summary"]["model.path"] == str(model) and d["config_summary"]["train.max_steps"] == 3
    assert d["final_metrics"]["loss"]["step"] == 3 and "eval/loss" in d["final_metrics"]
    ckpt = d["outputs"]["checkpoint"]
    assert ckpt in [o["id"] for o in d["lineage"]["outputs"]]
    assert {i["role"] for i in d["lineage"]["inputs"]} == {"dataset", "base_model", "config"}
