"""`alignflow run PIPELINE --engine ray`: each stage a Ray task on a local Ray instance, through the real CLI.

Same outputs and artifact ids as the local engine, one cache for both engines, a failing or killed stage
marked failed with the local engine's error text and resumed on the next run, `resources:` validated, and
`resources.nproc` running a recipe under torchrun. The first test's `--engine ray` commands start (and shut
down) their own local Ray instance, as a user's would; the others join one instance the module starts once
(`--address`), since a Ray start costs seconds to tens of seconds on a busy 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from alignflow.errors import AlignflowError, DataFormatError
from alignflow.pipeline import PipelineError, StageContext, load_pipeline, run_pipeline
from alignflow.store import Store
from alignflow.workspace import Workspace

from .stages import TOY_PIPELINE

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 300

# The runner tests' pipeline, with resources for its train stage and a stage that logs three ways.
TOY = (
    TOY_PIPELINE
    + """\
    resources: {num_cpus: 2}
  chatty:
    call: tests.pipeline.test_ray_engine:chatty
    params: {word: hello, score: "${evaluate.score}"}
"""
)


# ------------------------------------------------------------------------------ stages (run in the worker)


def chatty(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Logs three ways (ctx.log, print, a raw write to fd 2); reports its torch thread count and niceness."""
    import torch

    ctx.log(f"chatty says {params['word']} (score {params['score']})")
    print("printed by the stage", flush=True)
    os.write(2, b"written to fd 2\n")
    return {
        "word": params["word"],
        "threads": torch.get_num_threads(),
        "nice": os.nice(0),
        "pid": os.getpid(),
    }


def boom(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Fails like a bad input file does, until AF_TEST_NO_BOOM is set; then it resumes in the same folder."""
    (ctx.work_dir / "attempts").open("a").write("x")
    if not os.environ.get("AF_TEST_NO_BOOM"):
        raise DataFormatError(f"{params['file']}:3: field 'chosen': missing field 'chosen'")
    return {"ok": True, "attempts": len((ctx.work_dir / "attempts").read_text())}


# ------------------------------------------------------------------------------------------------ helpers


def cli(home: Path, *args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DB_URL"}
    path = [str(REPO), env.get("PYTHONPATH")]
    env.update(
        {"ALIGNFLOW_HOME": str(home), "PYTHONPATH": os.pathsep.join(filter(None, path)), **(extra_env or {})}
    )
    return subprocess.run(
        [sys.executable, "-m", "alignflow.cli.main", "run", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def state(home: Path, name: str) -> dict[str, Any]:
    return json.loads((home / "pipelines" / name / "state.json").read_text())


def outputs(home: Path, name: str) -> dict[str, dict[str, Any]]:
    return {stage: entry["outputs"] for stage, entry in state(home, name).items() if "outputs" in entry}


def error_text(proc: subprocess.CompletedProcess) -> str:
    """The CLI's error message: from the line starting with 'error:' to the end of stderr."""
    lines = proc.stderr.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("error:"))
    return "\n".join(lines[first:]).strip()


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    p = tmp_path / "toy.yaml"
    p.write_text(TOY.replace("DIE", "null"))
    return p


@pytest.fixture(scope="module")
def ray_instance() -> Any:
    """A Ray instance in this process (started once for the module): the 'someone else's cluster' case."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def address(ray_instance: Any) -> str:
    """`--address` of the module's instance, for the tests that are not about starting one."""
    return ray_instance.get_runtime_context().gcs_address


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_ray_gives_the_local_outputs_and_each_engine_skips_what_the_other_ran(
    toy: Path, tmp_path: Path
) -> None:
    local_home, ray_home = tmp_path / "local", tmp_path / "ray"
    ok(cli(local_home, str(toy)))
    out = ok(cli(ray_home, str(toy), "--engine", "ray"))
    assert "[ray]  started a local Ray instance" in out
    # The stage's output reaches the driver's console: ctx.log, print and raw fd writes alike.
    for line in ("chatty says hello (score 2.0)", "printed by the stage", "written to fd 2"):
        assert line in out, out
    assert (
        "written to fd 2"
        in (ray_home / "pipelines" / "toy").glob("chatty-*/ray-task.log").__next__().read_text()
    )

    local, ray = outputs(local_home, "toy"), outputs(ray_home, "toy")
    assert local.keys() == ray.keys() == {"data", "train", "evaluate", "chatty"}
    assert ray["chatty"]["pid"] != local["chatty"]["pid"]  # it did run elsewhere
    for side in (local, ray):
        side["chatty"].pop("pid")
    assert ray == local  # artifact ids (content hashes) and every other output
    # The driver's torch thread count (not the 1 Ray gives a task) and its priority (not Ray's nice 15).
    assert ray["chatty"]["threads"] == local["chatty"]["threads"]
    assert ray["chatty"]["nice"] == local["chatty"]["nice"]
    # Keys do not depend on the engine (nor on `resources`): the same stage keys in both workspaces.
    assert {s: e["key"] for s, e in state(ray_home, "toy").items()} == {
        s: e["key"] for s, e in state(local_home, "toy").items()
    }

    # One cache for both engines: whatever ran locally is skipped under Ray (and no instance is started) ...
    out = ok(cli(local_home, str(toy), "--engine", "ray"))
    for stage in local:
        assert f"[skip] {stage}: unchanged" in out
    assert "[ray]" not in out
    # ... and the reverse.
    out = ok(cli(ray_home, str(toy)))
    assert all(f"[skip] {stage}: unchanged" in out for stage in ray)

    # Lineage written from the Ray task is the store's as usual.
    store = Store.open(Workspace.from_env(ray_home, f"sqlite:///{ray_home / 'alignflow.db'}"))
    assert ray["data"]["dataset"] in store.lineage(ray["train"]["checkpoint"]).nodes


@pytest.mark.slow
def test_a_failing_stage_fails_as_locally_and_resumes(tmp_path: Path, address: str) -> None:
    pipe = tmp_path / "boom.yaml"
    pipe.write_text(
        "name: boom\nstages:\n"
        "  data: {call: 'tests.pipeline.stages:make_data', params: {n: 3}}\n"
        "  boom: {call: 'tests.pipeline.test_ray_engine:boom', params: {file: pairs.jsonl}, after: [data]}\n"
    )
    local_home, ray_home = tmp_path / "local", tmp_path / "ray"
    local = cli(local_home, str(pipe))
    ray = cli(ray_home, str(pipe), "--engine", "ray", "--address", address)
    assert local.returncode == ray.returncode == 2, ray.stdout[-2000:] + ray.stderr[-2000:]
    # The same one line, not a Ray traceback.
    assert (
        error_text(ray) == error_text(local) == "error: pairs.jsonl:3: field 'chosen': missing field 'chosen'"
    )
    assert "RayTaskError" not in ray.stderr and "Traceback" not in ray.stderr
    for home in (local_home, ray_home):
        assert state(home, "boom")["boom"]["status"] == "failed"
        assert state(home, "boom")["data"]["status"] == "done"
    # The next run resumes the failed stage in its own folder and skips the rest.
    out = ok(
        cli(ray_home, str(pipe), "--engine", "ray", "--address", address, extra_env={"AF_TEST_NO_BOOM": "1"})
    )
    assert "[skip] data: unchanged" in out and "[run]  boom (resuming)" in out
    assert state(ray_home, "boom")["boom"]["outputs"] == {"ok": True, "attempts": 2}


@pytest.mark.slow
def test_a_killed_ray_worker_marks_the_stage_failed_and_the_rerun_resumes(
    tmp_path: Path, address: str
) -> None:
    pipe = tmp_path / "die.yaml"
    pipe.write_text(TOY.replace("DIE", "2"))
    home = tmp_path / "ws"
    proc = cli(home, str(pipe), "--engine", "ray", "--address", address)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "stage 'train': the Ray worker running it died" in error_text(proc)
    assert "run the pipeline again to resume" in error_text(proc)
    st = state(home, "toy")
    assert st["train"]["status"] == "failed" and st["data"]["status"] == "done"
    assert "evaluate" not in st
    out = ok(cli(home, str(pipe), "--engine", "ray", "--address", address, extra_env={"AF_TEST_NO_DIE": "1"}))
    assert "[skip] data: unchanged" in out and "[run]  train (resuming)" in out
    assert state(home, "toy")["train"]["outputs"]["resumed_from"] == 3  # steps 1..3 were done before the kill
    assert state(home, "toy")["evaluate"]["outputs"]["score"] == 2.0


def test_resources_are_validated_and_not_part_of_the_key(tmp_path: Path, sqlite_workspace) -> None:
    def bad(stage: str, match: str) -> None:
        p = tmp_path / "bad.yaml"
        p.write_text(f"name: bad\nstages:\n  a: {stage}\n")
        with pytest.raises(PipelineError, match=match) as exc:
            load_pipeline(p)
        assert str(p) in str(exc.value)

    bad("{call: 'x:y', resources: {num_cpu: 2}}", r"stages\.a\.resources: unknown key\(s\) num_cpu")
    bad("{call: 'x:y', resources: 4}", r"stages\.a\.resources: expected a mapping")
    bad("{call: 'x:y', resources: {num_cpus: -1}}", r"stages\.a\.resources\.num_cpus: expected a number >= 0")
    bad("{call: 'x:y', resources: {num_cpus: 0}}", r"stages\.a\.resources\.num_cpus: expected a number > 0")
    bad("{call: 'x:y', resources: {num_gpus: two}}", r"stages\.a\.resources\.num_gpus: expected a number")
    bad("{recipe: sft, resources: {nproc: 0}}", r"stages\.a\.resources\.nproc: expected an integer >= 1")
    bad("{call: 'x:y', resources: {nproc: 2}}", r"stages\.a\.resources\.nproc: .*not a 'call' stage")
    bad("{recipe: ppo, resources: {nproc: 2}}", r"stages\.a\.resources\.nproc: .*not recipe 'ppo'")
    # In a rounds block the error names the block's stage.
    p = tmp_path / "rounds.yaml"
    p.write_text("rounds: {count: 2, stages: {r: {call: 'x:y', resources: {gpus: 1}}}}\n")
    with pytest.raises(PipelineError, match=r"rounds\.stages\.r\.resources: unknown key\(s\) gpus"):
        load_pipeline(p)

    # resources change no key: adding them (or overriding them) re-uses the cache.
    pipe = tmp_path / "toy.yaml"
    pipe.write_text(TOY.replace("DIE", "null").replace("    resources: {num_cpus: 2}\n", ""))
    store = Store.open(sqlite_workspace)
    assert run_pipeline(pipe, store=store, log=lambda m: None)["ran"] == [
        "data",
        "train",
        "evaluate",
        "chatty",
    ]
    again = run_pipeline(
        pipe, ["train.resources.num_cpus=2", "data.resources.num_gpus=1"], store=store, log=lambda m: None
    )
    assert again["ran"] == []


@pytest.mark.slow
def test_cli_errors_for_the_engine_flags(toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "ws"
    # More CPUs than the local instance has: a clear error, not a task that waits forever (a cluster joined
    # with --address may still grow, so there the stage waits with a warning).
    proc = cli(home, str(toy), "--engine", "ray", "train.resources.num_cpus=64")
    assert proc.returncode == 2
    assert error_text(proc).startswith("error: stage 'train': resources.num_cpus=64 but the Ray cluster has")
    assert state(home, "toy")["train"]["status"] == "failed"
    # The flag errors fail before any work: in-process through the same Typer app (a subprocess costs seconds),
    # where an AlignflowError comes out as itself (`alignflow.cli.main.main` prints it as "error: ..." and exits 2).
    from typer.testing import CliRunner

    from alignflow.cli.main import app

    def run(*args: str) -> Any:
        env = {"ALIGNFLOW_HOME": str(home), "ALIGNFLOW_DB_URL": None}
        return CliRunner().invoke(app, ["run", str(toy), *args], env=env)

    res = run("--address", "auto")
    assert isinstance(res.exception, AlignflowError)
    assert str(res.exception) == "--address auto is for the Ray engine: add --engine ray"
    res = run("--engine", "spark")
    assert res.exit_code != 0 and "spark" in res.stderr
    # Without ray installed: None in sys.modules makes `import ray` raise ImportError, as a missing package does.
    monkeypatch.setitem(sys.modules, "ray", None)
    res = run("--engine", "ray")
    assert isinstance(res.exception, AlignflowError)
    assert (
        str(res.exception) == "--engine ray needs Ray, which is not installed: pip install 'alignflow[ray]'"
    )


@pytest.mark.slow
def test_an_existing_instance_is_used_and_left_running(
    ray_instance: Any, address: str, toy: Path, tmp_path: Path, sqlite_workspace
) -> None:
    ray = ray_instance
    # In-process: run_pipeline finds Ray initialised, runs the stages on it and does not shut it down.
    lines: list[str] = []
    res = run_pipeline(toy, store=Store.open(sqlite_workspace), engine="ray", log=lines.append)
    assert res["ran"] == ["data", "train", "evaluate", "chatty"]
    assert not [m for m in lines if m.startswith("[ray]  started")]
    # This instance was started with Ray's defaults: its workers run at nice 15, and the task log says so.
    assert any("this Ray worker runs at nice 15" in m for m in lines)
    assert "chatty says hello (score 2.0)" in lines
    assert ray.is_initialized()
    # A second driver, the CLI, joins the same cluster with --address and leaves it running too.
    out = ok(cli(tmp_path / "cli-ws", str(toy), "--engine", "ray", "--address", address))
    assert f"[ray]  connected to the Ray cluster at {address}" in out
    assert outputs(tmp_path / "cli-ws", "toy")["train"] == res["outputs"]["train"]
    assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42


def test_importing_alignflow_does_not_import_ray() -> None:
    code = (
        "import sys, alignflow, alignflow.pipeline, alignflow.pipeline.runner, alignflow.cli.main, "
        "alignflow.cli.pipeline\nprint([m for m in sys.modules if m.split('.')[0] == 'ray'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout


TINY_SFT = """\
name: tiny-sft
stages:
  base:
    call: alignflow.domains.quickstart:make_base
    params: {corpus_size: 300, vocab_size: 300, hidden_size: 32, num_layers: 1, num_heads: 2, seed: 0}
  sft:
    recipe: sft
    resources: {nproc: 1}
    config:
      model: {path: "${base.model_dir}", dtype: float32}
      data: {train: DATA, eval_fraction: 0.25, max_length: 64}
      optim: {lr: 2.0e-3, scheduler: constant}
      train: {seed: 0, batch_size: 8, max_steps: 4}
"""


@pytest.mark.slow
def test_nproc_runs_the_recipe_under_torchrun_with_the_local_result(tmp_path: Path, address: str) -> None:
    from tests.recipes import toy as toy_data

    data = toy_data.write_jsonl(tmp_path / "sft.jsonl", toy_data.sft_rows(32))
    pipe = tmp_path / "tiny-sft.yaml"
    pipe.write_text(TINY_SFT.replace("DATA", str(data)))
    local_home, ray_home = tmp_path / "local", tmp_path / "ray"
    ok(cli(local_home, str(pipe)))  # the local engine ignores resources: the recipe runs in-process
    out = ok(cli(ray_home, str(pipe), "--engine", "ray", "--address", address))
    assert "[torchrun] " in out and "--nproc-per-node 1" in out and "--standalone" in out
    work = Path(state(ray_home, "tiny-sft")["sft"]["work_dir"])
    assert (work / "stage-config.yaml").is_file() and (work / "stage-result.json").is_file()
    local, ray = outputs(local_home, "tiny-sft"), outputs(ray_home, "tiny-sft")
    assert ray["base"]["model"] == local["base"]["model"]
    # The same weights, bit for bit: torchrun's one process trains what the in-process recipe trains.
    assert ray["sft"]["checkpoint"] == local["sft"]["checkpoint"]

    def losses(metrics: dict[str, float]) -> dict[str, float]:  # not the timings
        return {k: v for k, v in metrics.items() if "per_sec" not in k and "time" not in k}

    assert losses(ray["sft"]["metrics"]) == losses(local["sft"]["metrics"])
    assert ray["sft"]["checkpoint_dir"].startswith(str(ray_home))
    # A config error is reported before torchrun starts, with the local engine's text (in-process: the module's
    # Ray instance is this process's, and the error needs no CLI round trip).
    errors = {}
    for engine, home in (("local", local_home), ("ray", ray_home)):
        store = Store.open(Workspace.from_env(home, f"sqlite:///{home / 'alignflow.db'}"))
        with pytest.raises(AlignflowError) as exc:
            run_pipeline(
                pipe, ["sft.config.train.batch_size=0"], store=store, engine=engine, log=lambda m: None
            )
        store.close()
        errors[engine] = str(exc.value)
    assert errors["ray"] == errors["local"]
    assert "stage 'sft'" in errors["ray"] and "train.batch_size" in errors["ray"]
