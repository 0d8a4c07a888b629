"""Trackers read back through their own readers: TensorBoard's EventAccumulator and MLflow's client.

Recipes run through the real `alignflow` CLI on a tiny Llama (the same size as tests/recipes); pipelines
through `alignflow run`. Also: importing alignflow (and a recipe) pulls in neither tensorboard nor mlflow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

MODEL = {"hidden_size": 64, "num_layers": 2, "vocab_size": 400}
SUBJECTS = ["the model", "a user", "my friend", "the annotator", "our team", "the robot"]


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls on 2 shared cores: one intra-op thread is much faster than two spinning ones
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from alignflow.models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), **MODEL)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    sft = [
        {"id": f"s{i}", "prompt": f"What did {s} write? ", "completion": f"{s.capitalize()} wrote item {i}."}
        for i, s in enumerate(SUBJECTS * 5)
    ]
    pairs = [
        {
            "id": f"p{i}",
            "prompt": f"How did {s} respond to request {i}? ",
            "chosen": f"{s.capitalize()} answered politely.",
            "rejected": f"{s.capitalize()} answered the harmful request badly.",
        }
        for i, s in enumerate(SUBJECTS * 5)
    ]
    return {"sft": _jsonl(d / "sft.jsonl", sft), "pairs": _jsonl(d / "pairs.jsonl", pairs)}


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow database, made once: creating one runs MLflow's migrations (~7 s on this machine)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def ws(sqlite_workspace, mlflow_db: Path):  # noqa: ANN001, ANN201 - the workspace, with its (empty) mlflow.db
    sqlite_workspace.home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(mlflow_db, sqlite_workspace.home / "mlflow.db")
    return sqlite_workspace


@pytest.fixture
def cli(sqlite_workspace):  # noqa: ANN001, ANN201 - pytest fixture
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    runner = CliRunner()

    def invoke(*args: object):  # noqa: ANN202
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _config(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / f"{cfg['stage']}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _stage(
    stage: str, model: Path, data_file: Path, out: Path, backends: list[str], **extra: Any
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(data_file), "eval_fraction": 0.2, "max_length": 48},
        "optim": {"lr": 2e-3, "scheduler": "constant"},
        "train": {"seed": 0, "batch_size": 8, "max_steps": 4},
        "tracking": {"backends": backends},
    }
    for key, val in extra.items():
        if isinstance(val, dict):
            cfg.setdefault(key, {}).update(val)
        else:
            cfg[key] = val
    return cfg


def _history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def _tensorboard(run_dir: Path):  # noqa: ANN202 - tensorboard's EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _tb_scalars(acc: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _tb_texts(acc: Any, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary")}


def _mlflow_run(workspace: Any, run_dir: Path):  # noqa: ANN202 - (client, mlflow Run)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace.home / 'mlflow.db'}")
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    exp = client.get_experiment_by_name("alignflow")
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`alignflow.run_id` = '{run_id}'")
    assert len(found) == 1, [r.info.run_id for r in found]
    return client, found[0]


def _artifacts(client: Any, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Same steps, same values (TensorBoard keeps float32)."""
    assert [s for s, _ in got] == [s for s, _ in want], (got, want)
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-9)
    return True


def _metric(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------- recipes


def test_sft_writes_tensorboard_and_mlflow_that_read_back(cli, tiny_model, data, tmp_path: Path, ws) -> None:
    out = tmp_path / "sft"
    cfg = _stage("sft", tiny_model, data["sft"], out, ["store", "tensorboard", "mlflow"], run_name="traced")
    res = cli("sft", _config(tmp_path, cfg))
    assert res.exit_code == 0, res.output + repr(res.exception)
    losses = _history(out, "loss")
    assert [s for s, _ in losses if s > 0] == [1, 2, 3, 4]

    acc = _tensorboard(out)
    assert _same(_tb_scalars(acc, "loss"), losses)
    assert _same(_tb_scalars(acc, "eval/loss"), _history(out, "eval/loss"))
    config_text = _tb_texts(acc, "config")[0]
    assert "max_steps: 4" in config_text and str(tiny_model) in config_text
    assert '"eval/loss"' in _tb_texts(acc, "artifacts/summary.json")[0]  # the summary shown as text

    client, mrun = _mlflow_run(ws, out)
    assert mrun.info.status == "FINISHED" and mrun.info.run_name == "traced"
    params = mrun.data.params
    assert params["train.max_steps"] == "4" and params["model.path"] == str(tiny_model)
    assert params["tracking.backends"] == '["store", "tensorboard", "mlflow"]'
    assert params["stage"] == "sft" and mrun.data.tags["alignflow.stage"] == "sft"
    assert _same(_metric(client, mrun.info.run_id, "loss"), losses)
    assert _same(_metric(client, mrun.info.run_id, "eval/perplexity"), _history(out, "eval/perplexity"))
    arts = _artifacts(client, mrun.info.run_id)
    assert {"summary.json", "config.yaml"} <= arts
    # the default SQLite store keeps its artifacts in the workspace, not in the working directory
    assert mrun.info.artifact_uri.startswith((ws.home / "mlruns").as_uri())
    summary = json.loads(client.download_artifacts(mrun.info.run_id, "summary.json", str(tmp_path)) and
                         (tmp_path / "summary.json").read_text())  # fmt: skip
    assert summary == json.loads((out / "summary.json").read_text())


def test_store_only_writes_no_tracker_files(cli, tiny_model, data, tmp_path: Path, sqlite_workspace) -> None:
    out = tmp_path / "sft"
    res = cli("sft", _config(tmp_path, _stage("sft", tiny_model, data["sft"], out, ["store"])))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert not (out / "tensorboard").exists()
    assert not (sqlite_workspace.home / "mlflow.db").exists()


def test_dpo_and_reward_model_runs_in_mlflow(cli, tiny_model, data, tmp_path: Path, ws) -> None:
    for stage in ("dpo", "rm"):
        out = tmp_path / stage
        cfg = _stage(stage, tiny_model, data["pairs"], out, ["mlflow", "tensorboard"], train={"max_steps": 3})
        res = cli(stage, _config(tmp_path, cfg))
        assert res.exit_code == 0, res.output + repr(res.exception)
        client, mrun = _mlflow_run(ws, out)
        assert mrun.info.status == "FINISHED"
        assert mrun.data.params["stage"] == stage and mrun.data.params["train.max_steps"] == "3"
        losses = _history(out, "loss")
        assert len(losses) == 3
        assert _same(_metric(client, mrun.info.run_id, "loss"), losses)
        assert _same(_tb_scalars(_tensorboard(out), "loss"), losses)
        assert "summary.json" in _artifacts(client, mrun.info.run_id)
    # the reward model's calibration report (a file in its run folder) is logged at finish too
    assert (tmp_path / "rm" / "reliability.json").is_file()
    assert "reliability.json" in _artifacts(client, mrun.info.run_id)


def test_ppo_logs_scalars_and_sample_tables(cli, tiny_model, data, tmp_path: Path, ws) -> None:
    out = tmp_path / "ppo"
    cfg = {
        "stage": "ppo",
        "output_dir": str(out),
        "model": {"path": str(tiny_model), "dtype": "float32"},
        "data": {"train": str(data["sft"]), "kind": "sft", "max_prompt_length": 32},
        "rollout": {"batch_size": 8, "num_generations": 1, "max_new_tokens": 8},
        "reward": {"fn": "alignflow.rollout.toy:lowercase_fraction"},
        "kl": {"coef": 0.01},
        "ppo": {"epochs": 1, "minibatch_size": 8},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"seed": 0, "steps": 3},
        "tracking": {"backends": ["store", "tensorboard", "mlflow"], "samples_every": 2},
    }
    res = cli("ppo", _config(tmp_path, cfg))
    assert res.exit_code == 0, res.output + repr(res.exception)
    kl = _history(out, "kl/seq_sum_mean")
    assert [s for s, _ in kl] == [1, 2, 3]
    acc = _tensorboard(out)
    assert _same(_tb_scalars(acc, "kl/seq_sum_mean"), kl)
    client, mrun = _mlflow_run(ws, out)
    assert _same(_metric(client, mrun.info.run_id, "kl/seq_sum_mean"), kl)
    assert mrun.data.params["rollout.max_new_tokens"] == "8"

    # sample tables: the JSONL file (what the run pages read), TensorBoard text, an MLflow table
    from alignflow.monitor.trackers import read_samples

    samples = read_samples(out)
    assert list(samples) == [2]
    rows = samples[2]
    assert len(rows) == 8 and {"prompt", "response", "reward", "kl"} <= set(rows[0])
    table = _tb_texts(acc, "samples")[2]
    assert table.split("\n")[0].startswith("| ") and "prompt" in table.split("\n")[0]
    assert len(table.split("\n")) == 2 + 8
    arts = _artifacts(client, mrun.info.run_id)
    assert "samples/step-2.json" in arts
    logged = json.loads(
        Path(client.download_artifacts(mrun.info.run_id, "samples/step-2.json", str(tmp_path))).read_text()
    )
    assert logged["columns"][:4] == ["prompt", "response", "reward", "kl"]  # MLflow's table (split) layout
    assert [row[2] for row in logged["data"]] == pytest.approx([r["reward"] for r in rows])
    assert [row[1] for row in logged["data"]] == [r["response"] for r in rows]


def test_resumed_run_continues_its_mlflow_run(cli, tiny_model, data, tmp_path: Path, ws) -> None:
    out = tmp_path / "sft"
    cfg = _stage("sft", tiny_model, data["sft"], out, ["mlflow"], train={"max_steps": 2})
    assert cli("sft", _config(tmp_path, cfg)).exit_code == 0
    res = cli("sft", _config(tmp_path, cfg), "train.max_steps=4")  # same folder: the run continues
    assert res.exit_code == 0, res.output + repr(res.exception)
    client, mrun = _mlflow_run(ws, out)  # asserts there is exactly one MLflow run
    assert mrun.info.status == "FINISHED"
    assert [s for s, _ in _metric(client, mrun.info.run_id, "loss")] == [1, 2, 3, 4]
    # params are immutable in MLflow: the first value stays, the changed one is a tag
    assert mrun.data.params["train.max_steps"] == "2"
    assert mrun.data.tags["alignflow.resumed_param.train.max_steps"] == "4"


def test_unreachable_mlflow_server_fails_fast_naming_the_field(
    cli, tiny_model, data, tmp_path: Path, sqlite_workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    out = tmp_path / "sft"
    cfg = _stage(
        "sft", tiny_model, data["sft"], out, ["mlflow"], tracking={"mlflow_uri": "http://127.0.0.1:9"}
    )
    res = cli("sft", _config(tmp_path, cfg))
    assert res.exit_code != 0
    assert "tracking.mlflow_uri 'http://127.0.0.1:9'" in str(res.exception) + res.output
    from alignflow.store import Store

    store = Store.open(sqlite_workspace)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert store.get_run(run_id).status == "failed"  # not left `running`


def test_an_alert_with_stop_ends_the_run_resumably_and_resume_keeps_its_cooldown(
    cli, tiny_model, data, tmp_path: Path, ws
) -> None:
    from alignflow.store import Store

    out = tmp_path / "sft"
    rule = {
        "rule": "kl_ceiling",
        "metric": "loss",
        "threshold": 0.5,
        "cooldown": 10,
        "actions": ["store", "stop"],
    }
    cfg = _stage(
        "sft", tiny_model, data["sft"], out, ["tensorboard", "mlflow"], monitor={"alerts": {"rules": [rule]}}
    )
    path = _config(tmp_path, cfg)
    res = cli("sft", path)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "alert kl_ceiling" in res.output
    first = min(s for s, _ in _history(out, "loss"))  # a random tiny model's loss is far above 0.5
    store = Store.open(ws)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    run = store.get_run(run_id)
    assert run.status == "stopped"
    assert run.summary["stopped_at_step"] == first and run.summary["stopped_by"] == "alert:kl_ceiling"
    assert run.summary["alert"]["metric"] == "loss" and run.summary["alert"]["threshold"] == 0.5
    assert [(a.rule, a.step) for a in store.alerts(run_id)] == [("kl_ceiling", first)]
    assert (out / "checkpoints" / "latest").read_text().strip().endswith(str(first))  # resumable
    assert "kl_ceiling" in _tb_texts(_tensorboard(out), "alerts")[first]
    client, mrun = _mlflow_run(ws, out)
    assert mrun.info.status == "KILLED"

    # The same command resumes; the rule's cool-down (fired at `first`, 10 steps) comes back with the
    # checkpoint, so it stays silent and the run finishes (a fresh monitor would stop it again at once).
    res = cli("sft", path)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert store.get_run(run_id).status == "finished"
    assert [(a.rule, a.step) for a in store.alerts(run_id)] == [("kl_ceiling", first)]
    assert max(s for s, _ in _history(out, "loss")) == 4
    _, mrun = _mlflow_run(ws, out)
    assert mrun.info.status == "FINISHED"


# ------------------------------------------------------------------------------------------- pipelines


PIPE = """\
name: tracked
tracking: {backends: [store, tensorboard, mlflow], mlflow_experiment: pipelines}
stages:
  data:
    call: tests.pipeline.stages:make_data
    params: {n: 2}
  base:
    call: tests.pipeline.stages:train
    params: {data: "${data.dataset}", lr: 0.5, steps: 2, die_at: null}
  final:
    call: tests.pipeline.stages:evaluate
    params: {model: "${policy@last.checkpoint}"}
rounds:
  count: 2
  carry:
    previous_labels: {init: null, from: labels.cumulative}
    current_policy: {init: "${base.checkpoint}", from: policy.checkpoint}
  stages:
    labels:
      call: tests.pipeline.stages:collect
      params: {previous: "${round.previous_labels}", n: 2, round: "${round.index}", policy: "${round.current_policy}"}
    policy:
      call: tests.pipeline.stages:improve
      params: {init: "${round.current_policy}", data: "${labels.cumulative}", steps: 2, reference: "${base.checkpoint}",
               die_at: null}
"""


def test_pipeline_runs_are_tracked_per_invocation(cli, tmp_path: Path, ws) -> None:
    from mlflow.tracking import MlflowClient

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE)
    for _ in range(2):  # the second invocation skips every stage and is tracked as a run of its own
        res = cli("run", pipe)
        assert res.exit_code == 0, res.output + repr(res.exception)
    client = MlflowClient(tracking_uri=f"sqlite:///{ws.home / 'mlflow.db'}")
    exp = client.get_experiment_by_name("pipelines")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    root = ws.home / "pipelines" / "tracked" / "runs"
    assert len(list(root.iterdir())) == 2
    # Each MLflow run names its folder. Folder names (second-resolution time + random hex) need not sort in
    # invocation order when both invocations start within one second (seen in CI).
    folders = [root / r.data.tags["alignflow.run_id"] for r in runs]
    for mrun, folder, status in zip(runs, folders, ("ran", "skipped"), strict=True):
        rid = mrun.info.run_id
        assert mrun.data.tags["alignflow.pipeline"] == "tracked"
        assert mrun.data.params["rounds"] == "2"
        assert mrun.data.params["stages.policy_1.params.steps"] == "2"
        # round stages plot against the round (w_R = w_{R-1} + steps * 2R from w_0 = 1: 5, 13)
        assert _metric(client, rid, "policy/w") == [(1, 5.0), (2, 13.0)]
        assert _metric(client, rid, "labels/n_total") == [(1, 2.0), (2, 4.0)]
        assert _metric(client, rid, "final/score") == [(0, 13.0)] and _metric(client, rid, "data/n") == [
            (0, 2.0)
        ]
        assert bool(_metric(client, rid, "base/seconds")) == (
            status == "ran"
        )  # only a stage that ran has a time
        table = json.loads((folder / "stages.json").read_text())
        assert table["status"] == "finished"
        assert [r["stage"] for r in table["stages"]] == ["data", "base", "labels@1", "policy@1", "labels@2",
                                                         "policy@2", "final"]  # fmt: skip
        assert {r["status"] for r in table["stages"]} == {status}
        assert {"stages.json", "stages/step-7.json"} <= _artifacts(client, rid)
        acc = _tensorboard(folder)
        assert _same(_tb_scalars(acc, "policy/w"), [(1, 5.0), (2, 13.0)])
        assert "policy@2" in _tb_texts(acc, "stages")[7]


def test_a_failing_pipeline_run_is_marked_failed(cli, tmp_path: Path, ws) -> None:
    from mlflow.tracking import MlflowClient

    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        "name: broken\ntracking: {backends: [mlflow]}\nstages:\n"
        "  data: {call: tests.pipeline.stages:make_data, params: {n: 2}}\n"
        "  bad: {call: tests.pipeline.stages:evaluate, params: {model: nope}}\n"
    )
    res = cli("run", pipe)
    assert res.exit_code != 0
    client = MlflowClient(tracking_uri=f"sqlite:///{ws.home / 'mlflow.db'}")
    (mrun,) = client.search_runs([client.get_experiment_by_name("alignflow").experiment_id])
    assert mrun.info.status == "FAILED"
    assert _metric(client, mrun.info.run_id, "data/n") == [(0, 2.0)]
    assert any(a.startswith("text/error/") for a in _artifacts(client, mrun.info.run_id))


def test_pipeline_tracking_key_is_validated(cli, tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text("name: p\ntracking:\n  backends: [wandb]\nstages:\n  a: {call: 'x:y'}\n")
    res = cli("run", pipe)
    assert res.exit_code != 0
    assert "pipe.yaml" in str(res.exception) and "tracking.backends" in str(res.exception)


# ------------------------------------------------------------------------------------------- import cost


def test_importing_alignflow_and_a_recipe_loads_no_tracker() -> None:
    code = (
        "import sys, alignflow, alignflow.recipes.sft, alignflow.recipes.ppo, alignflow.recipes.common, "
        "alignflow.monitor.trackers, alignflow.pipeline.runner, alignflow.cli.main\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
