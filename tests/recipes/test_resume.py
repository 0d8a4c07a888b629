"""Graceful stop and exact resume: SIGTERM a real `alignflow` process mid-run, re-run the same command,
and the final weights equal (torch.equal) those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignflow.train.distributed import EXIT_REQUEUE

from .conftest import base_config, write_config

STEPS = 16

CASES = {
    "sft": ("sft", "final/model.safetensors", {}),
    "rm": ("pairs", "final/member-0/model.safetensors", {}),
    "dpo": ("pairs", "final/model.safetensors", {"reference": {"precompute": False}}),
}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _sigterm_after_step(cmd: list[str], run_dir: Path, step: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and any(
                json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines() if x.strip()
            ):
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.02)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_sigterm_then_rerun_equals_uninterrupted(
    cli, tiny_model, toy_data, tmp_path: Path, stage: str
) -> None:
    data_key, weights_file, extra = CASES[stage]

    def config(out: Path) -> Path:
        cfg = base_config(
            stage, tiny_model, toy_data[data_key], out, train={"max_steps": STEPS, "batch_size": 4}, **extra
        )
        return write_config(tmp_path / f"{out.name}.yaml", cfg)

    ref_out = tmp_path / "uninterrupted"
    res = cli(stage, config(ref_out))
    assert res.exit_code == 0, res.output + repr(res.exception)

    out = tmp_path / "interrupted"
    cfg = config(out)
    cmd = [sys.executable, "-m", "alignflow.cli.main", stage, str(cfg)]
    proc = _sigterm_after_step(cmd, out, step=3)
    # SIGTERM means "requeue me": checkpointed, then the CLI exits EXIT_REQUEUE (75), not 0
    assert proc.returncode == EXIT_REQUEUE, proc.stderr[-3000:]
    assert "SIGTERM received: checkpoint saved at step" in proc.stderr, proc.stderr[-3000:]
    assert "Resume with the same command" in proc.stderr
    assert not (out / "final").exists()  # it really stopped early
    stopped_at = int(proc.stderr.split("checkpoint saved at step ")[1].split(".")[0])
    assert 3 <= stopped_at < STEPS

    res = cli(stage, cfg)  # the same command again: resumes from the checkpoint
    assert res.exit_code == 0, res.output + repr(res.exception)
    resumed_steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert resumed_steps.count(stopped_at + 1) == 1  # no step trained twice, none skipped
    a, b = _weights(ref_out / weights_file), _weights(out / weights_file)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
