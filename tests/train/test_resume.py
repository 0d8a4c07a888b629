"""Resume equality: a run SIGKILLed at a random step and resumed ends with bit-identical weights.

The training script (``scripts/resume_train.py``) saves asynchronously every 2 steps, so the kill can
land mid-write; the atomic commit guarantees the resumed run only ever sees whole checkpoints.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "resume_train.py"
STEPS = 24


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _cmd(run_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--out", str(out), "--steps", str(STEPS)]


def _run_to_end(run_dir: Path, out: Path) -> str:
    res = subprocess.run(_cmd(run_dir, out), env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _run_and_kill_after(run_dir: Path, out: Path, kill_step: int) -> None:
    proc = subprocess.Popen(
        _cmd(run_dir, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == f"step {kill_step}":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()


def test_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    # From step 4 on, a checkpoint is guaranteed committed (the save at step 4 first waits for step 2's write).
    kill_step = random.Random(seed).randint(4, STEPS - 3)

    # The uninterrupted reference runs concurrently with the run that gets killed (saves wall time).
    ref_proc = subprocess.Popen(
        _cmd(tmp_path / "ref", tmp_path / "ref.safetensors"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _run_and_kill_after(tmp_path / "run", tmp_path / "run.safetensors", kill_step)
        _, ref_err = ref_proc.communicate(timeout=120)
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
    assert ref_proc.returncode == 0, ref_err[-3000:]
    stdout = _run_to_end(tmp_path / "run", tmp_path / "run.safetensors")
    resumed_from = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("resumed ")]
    assert resumed_from and 2 <= resumed_from[0] <= kill_step, (stdout[:200], kill_step)

    ref = load_file(str(tmp_path / "ref.safetensors"))
    got = load_file(str(tmp_path / "run.safetensors"))
    assert ref.keys() == got.keys()
    differing = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not differing, f"kill at step {kill_step} (seed {seed}): weights differ in {differing[:5]}"
