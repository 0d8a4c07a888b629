"""PPO / GRPO under torchrun (`alignflow ppo CONFIG --nproc 2`, DDP on CPU/gloo): the same run as one process.

Each process samples its share of the step's prompt groups with draws that depend only on (seed, step, global
row), scores its rows, and the step's batch is gathered so that reward normalisation, advantages, the KL
controller and every logged statistic are computed over the global batch; the update splits each global
minibatch across the processes with losses normalised by global counts. So the first steps' losses of 2
processes equal 1 process's up to float summation order, and so do the exported weights (up to Adam's
amplification of rounding in near-zero gradients).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import read_metrics, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REWARD = "alignflow.rollout.toy:lowercase_fraction"
STEPS = 3
# Compared at relative 1e-5; KL metrics are ~1e-7 rounding noise at step 1 (policy == reference), hence abs.
KEYS = ("loss/policy", "loss/total", "reward/raw_mean", "reward/shaped_mean", "kl/seq_sum_mean", "kl/coef")


def ppo_config(model: Path, prompts: Path, out: Path, estimator: str) -> dict[str, Any]:
    grpo = estimator == "grpo"
    return {
        "stage": "ppo",
        "output_dir": str(out),
        "model": {"path": str(model), "dtype": "float32"},
        "data": {"train": str(prompts), "kind": "sft", "max_prompt_length": 32},
        # GRPO: 4 prompts x 4 samples, 2 whole groups per process; GAE: 8 prompts, 4 per process
        "rollout": {
            "batch_size": 4 if grpo else 8,
            "num_generations": 4 if grpo else 1,
            "max_new_tokens": 10,
        },
        "reward": {"fn": REWARD, "normalize": not grpo},  # running moments over the global batch
        "kl": {"coef": 0.01, "adaptive": True, "target": 0.5, "horizon": 100},  # global KL -> same beta
        "advantage": {"estimator": estimator},
        "ppo": {"epochs": 2, "minibatch_size": 4},
        "optim": {"lr": 3e-3, "scheduler": "constant"},
        "train": {"seed": 0, "steps": STEPS},
    }


def launch(cfg_path: Path, home: Path, nproc: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ALIGNFLOW_HOME": str(home), "CI": "true", "OMP_NUM_THREADS": "1"}
    env.pop("ALIGNFLOW_DB_URL", None)
    cmd = [sys.executable, "-m", "alignflow", "ppo", str(cfg_path)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], what: str) -> str:
    try:  # a mismatched collective hangs forever: never wait without a bound
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after 300 s:\n{err.decode()[-3000:]}")
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{err.decode()[-3000:]}"
    return out.decode()


def one_vs_two(tmp_path: Path, model: Path, prompts: Path, estimator: str) -> dict[int, Path]:
    """The same config in 1 and in 2 processes, run side by side (separate workspaces: no shared SQLite)."""
    runs: dict[int, Path] = {}
    procs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"{estimator}-{n}"
        cfg = write_config(tmp_path / f"{estimator}-{n}.yaml", ppo_config(model, prompts, runs[n], estimator))
        procs[n] = launch(cfg, tmp_path / f"ws-{n}", n)
    for n, proc in procs.items():
        finish(proc, f"{estimator} with {n} process(es)")
    return runs


def assert_same_metrics(runs: dict[int, Path], keys: tuple[str, ...]) -> None:
    one, two = read_metrics(runs[1]), read_metrics(runs[2])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        for key in keys:
            assert key in a and key in b, key
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key, a[key], b[key])
        # nothing the loss or the logs see may differ, bar timings
        for key in a:
            if key.startswith(("time/", "throughput/")) or key == "optim/grad_norm":
                continue
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])


def assert_same_export(runs: dict[int, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(runs[1] / "final")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(runs[2] / "final")).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        # Adam turns rounding-level differences of near-zero gradients into steps of ~lr on a few weights
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-4), (
            key,
            float((a[key] - b[key]).abs().max()),
        )


def test_grpo_two_processes_equal_one(tiny_model, toy_data, tmp_path):
    runs = one_vs_two(tmp_path, tiny_model, toy_data["sft"], "grpo")
    assert_same_metrics(runs, (*KEYS, "loss/kl", "policy/approx_kl", "policy/entropy"))
    assert_same_export(runs)
    summary = json.loads((runs[2] / "summary.json").read_text())
    assert summary["steps"] == STEPS


def test_gae_two_processes_equal_one(tiny_model, toy_data, tmp_path):
    runs = one_vs_two(tmp_path, tiny_model, toy_data["sft"], "gae")
    assert_same_metrics(runs, (*KEYS, "value/loss", "value/clip_frac", "policy/approx_kl"))
    assert_same_export(runs)
    # the torchrun job's checkpoint is a DCP one, policy and value model together
    ckpt = runs[2] / "checkpoints"
    assert any((p / "dcp").is_dir() for p in ckpt.glob("step-*"))


def test_batch_not_divisible_by_world_size_is_a_config_error(tiny_model, toy_data, tmp_path):
    cfg = ppo_config(tiny_model, toy_data["sft"], tmp_path / "odd", "grpo")
    cfg["rollout"]["batch_size"] = 3
    proc = launch(write_config(tmp_path / "odd.yaml", cfg), tmp_path / "ws", 2)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "rollout.batch_size = 3 is not a multiple of the world size 2" in (out + err).decode()
