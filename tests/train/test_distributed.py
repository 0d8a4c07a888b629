"""Data-parallel SFT under torchrun (gloo, 2 CPU processes) through the real CLI.

- 2 processes (DDP and FSDP2) log the same losses as 1 process at the same global batch, and export the
  same model;
- one run stopped by SIGUSR1 in 1 process, resumed in 2, stopped again and resumed in 1: each checkpoint
  resumes at the other world size with the losses of an uninterrupted run, and SIGUSR1 to `alignflow sft
  --nproc 2` checkpoints within the step and exits 75;
- SIGKILL of one rank: torchrun restarts the job, which resumes from the last checkpoint.

Every subprocess runs under a timeout: a collective with a dead or mismatched peer waits forever.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.recipes import toy
from tests.recipes.conftest import MODEL, base_config, write_config

from alignflow.cli.launch import strip_nproc
from alignflow.train.distributed import EXIT_REQUEUE, DistContext

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 8  # room for two SIGUSR1 stops and two resumes in one run (the chain test)
TIMEOUT = 300


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DB_URL"}
    env.update(ALIGNFLOW_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "alignflow", *map(str, args)]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a crash and after the restart) keeps its last value."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "loss" in m:
            out[m["step"]] = m["loss"]
    return out


def _close(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a, b)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from alignflow.models import make_tiny_model_dir

    d = tmp_path_factory.mktemp("dist")
    model = make_tiny_model_dir(d / "tiny", **MODEL)
    data = toy.write_jsonl(d / "sft.jsonl", toy.sft_rows(48))
    home = d / "ws"

    def config(name: str, **train: object) -> Path:
        cfg = base_config(
            "sft",
            model,
            data,
            d / name,
            train={"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, **train},
        )
        return write_config(d / f"{name}.yaml", cfg)

    ref = config("reference")
    proc = subprocess.run(_cli("sft", ref), env=_env(home), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": d, "home": home, "config": config, "reference": _losses(d / "reference")}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).state_dict()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_log_the_losses_and_export_the_model_of_one(setup: dict, strategy: str) -> None:
    d = setup["dir"]
    cfg = setup["config"](f"two-{strategy}", distributed={"strategy": strategy})
    env = _env(setup["home"])
    if strategy == "fsdp":  # the launcher's several-nodes path: torchrun's c10d rendezvous (one node here)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env["ALIGNFLOW_TORCHRUN_ARGS"] = (
            f"--nnodes 1 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id t"
        )
    proc = subprocess.run(
        _cli("sft", cfg, "--nproc", "2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = _losses(d / f"two-{strategy}")
    assert sorted(two) == list(range(1, STEPS + 1))  # rank 0 alone logged, once per step
    _close(two, setup["reference"], range(1, 4))
    one_w, two_w = _weights(d / "reference" / "final"), _weights(d / f"two-{strategy}" / "final")
    assert one_w.keys() == two_w.keys()
    for k in one_w:
        assert torch.allclose(one_w[k], two_w[k], rtol=1e-4, atol=1e-6), k
    ckpt = json.loads(
        (d / f"two-{strategy}" / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text()
    )
    assert (ckpt["format"], ckpt["world_size"], ckpt["strategy"]) == ("dcp", 2, strategy)


def _signal_after(
    cmd: list[str], env: dict[str, str], run_dir: Path, step: int, sig: int
) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(
                json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines() if x.strip()
            ):
                proc.send_signal(sig)
                break
            time.sleep(0.05)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        _kill_tree(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launcher, torchrun and every worker (a hung collective must not outlive the test)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stopped_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])


def test_sigusr1_stops_one_process_then_two_and_each_checkpoint_resumes_at_the_other_world_size(
    setup: dict,
) -> None:
    """1 process -> SIGUSR1 -> resumed in 2 -> SIGUSR1 -> resumed in 1: both directions in one chain, each stop
    a checkpoint within the step and exit 75, and the losses those of the uninterrupted run."""
    d, env = setup["dir"], _env(setup["home"])
    cfg = setup["config"]("usr1-chain")
    run_dir = d / "usr1-chain"
    stopped = _signal_after(_cli("sft", cfg), env, run_dir, 2, signal.SIGUSR1)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-3000:]
    first = _stopped_step(run_dir)
    assert not (run_dir / "checkpoints" / f"step-{first:06d}" / "dcp").exists()  # the one-process format

    stopped = _signal_after(_cli("sft", cfg, "--nproc", "2"), env, run_dir, first + 1, signal.SIGUSR1)
    assert stopped.returncode == EXIT_REQUEUE, stopped.stderr[-3000:]
    assert "SIGUSR1 received: checkpoint saved at step" in stopped.stderr
    at = _stopped_step(run_dir)
    assert first < at < STEPS and not (run_dir / "final").exists()
    state = json.loads((run_dir / "checkpoints" / f"step-{at:06d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (run_dir / "checkpoints" / f"step-{at:06d}").glob("rng-*.pt")} == {
        "rng-0.pt",
        "rng-1.pt",
    }
    resumed = subprocess.run(_cli("sft", cfg), env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _close(_losses(run_dir), setup["reference"], range(1, STEPS + 1))


def test_sigkill_of_one_rank_restarts_and_resumes(setup: dict) -> None:
    import psutil

    d, env = setup["dir"], _env(setup["home"])
    cfg = setup["config"]("killed", save_every=2)
    run_dir = d / "killed"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "-m",
        "alignflow",
        "sft",
        str(cfg),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    killed = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file() and any(
                json.loads(x).get("step", 0) >= 3 for x in metrics.read_text().splitlines() if x.strip()
            ):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            child.kill()  # SIGKILL: no handler, no checkpoint
                            killed = child.pid
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.05)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        _kill_tree(proc)
    assert killed is not None, "rank 1 was never seen"
    assert proc.returncode == 0, err[-4000:]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    _close(losses, setup["reference"], range(1, STEPS + 1))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_grad_accum_must_split_evenly(setup: dict) -> None:
    cfg = setup["config"]("uneven", grad_accum=3)
    proc = subprocess.run(
        _cli("sft", cfg, "--nproc", "2"),
        env=_env(setup["home"]),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # the launcher's check, in one process: torchrun never started
    assert "train.grad_accum = 3 is not a multiple of the world size 2" in out
    assert "ChildFailedError" not in out


def test_one_process_context_is_a_no_op() -> None:
    ctx = DistContext()
    assert not ctx.enabled and ctx.is_main
    assert ctx.shard([1, 2, 3]) == [1, 2, 3]
    assert ctx.sum(2.5) == 2.5 and ctx.any(True) and ctx.broadcast({"a": 1}) == {"a": 1}
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model, torch.device("cpu")) is model
    assert strip_nproc(["sft", "c.yaml", "--nproc", "2", "x=1", "--nproc=4"]) == ["sft", "c.yaml", "x=1"]


@pytest.mark.parametrize(("args", "code"), [(["sft", "--help"], 0), (["sft", "/nonexistent.yaml"], 2)])
def test_a_torchrun_worker_exits_with_the_commands_code_and_output(
    tmp_path: Path, args: list[str], code: int
) -> None:
    """Under torchrun `python -m alignflow` ends with os._exit (no interpreter finalization, see __main__):
    the command's exit code and its whole output still come out."""
    env = {**_env(tmp_path / "ws"), "TORCHELASTIC_RUN_ID": "t", "WORLD_SIZE": "1"}
    proc = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    if code == 0:
        assert "Usage:" in proc.stdout and proc.stdout.rstrip().endswith("─╯")
    else:
        assert "/nonexistent.yaml" in proc.stdout + proc.stderr
