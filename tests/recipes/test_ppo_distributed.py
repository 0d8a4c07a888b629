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


def ppo_config(
    model: Path, prompts: Path, out: Path, estimator: str, strategy: str = "ddp"
) -> dict[str, Any]:
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
        # lr: Adam turns rounding-level differences of near-zero gradients into steps of ~lr (export tolerance)
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"seed": 0, "steps": STEPS, "distributed": {"strategy": strategy}},
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


def one_vs_two(
    tmp_path: Path, model: Path, prompts: Path, estimator: str, strategies: tuple[str, ...] = ("ddp",)
) -> dict[str, Path]:
    """The same config in 1 process and in 2 (per strategy), run side by side (separate workspaces: no
    shared SQLite); returns the run folders by "1" / strategy."""
    runs: dict[str, Path] = {}
    procs = {}
    for name, n in [("1", 1), *((s, 2) for s in strategies)]:
        runs[name] = tmp_path / f"{estimator}-{name}"
        cfg = ppo_config(model, prompts, runs[name], estimator, "ddp" if n == 1 else name)
        procs[name] = launch(
            write_config(tmp_path / f"{estimator}-{name}.yaml", cfg), tmp_path / f"ws-{name}", n
        )
    for name, proc in procs.items():
        finish(proc, f"{estimator} {'in 1 process' if name == '1' else f'in 2 processes ({name})'}")
    return runs


def assert_same_metrics(one_dir: Path, two_dir: Path, keys: tuple[str, ...]) -> None:
    one, two = read_metrics(one_dir), read_metrics(two_dir)
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


def assert_same_export(one_dir: Path, two_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(one_dir / "final")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(two_dir / "final")).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        # Adam turns rounding-level differences of near-zero gradients into steps of ~lr on a few weights
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-4), (
            key,
            float((a[key] - b[key]).abs().max()),
        )


def test_grpo_two_processes_equal_one(tiny_model, toy_data, tmp_path):
    runs = one_vs_two(tmp_path, tiny_model, toy_data["sft"], "grpo")
    assert_same_metrics(runs["1"], runs["ddp"], (*KEYS, "loss/kl", "policy/approx_kl", "policy/entropy"))
    assert_same_export(runs["1"], runs["ddp"])
    summary = json.loads((runs["ddp"] / "summary.json").read_text())
    assert summary["steps"] == STEPS


@pytest.fixture(scope="module")
def gae_runs(tiny_model, toy_data, tmp_path_factory):  # noqa: ANN001, ANN201 - pytest fixture
    """PPO with GAE in 1 process, and in 2 with DDP and with FSDP2; the 1-process run is also the reference
    of the preemption test."""
    return one_vs_two(tmp_path_factory.mktemp("gae"), tiny_model, toy_data["sft"], "gae", ("ddp", "fsdp"))


def test_gae_two_processes_ddp_and_fsdp_equal_one(gae_runs):
    """PPO with a separate value model: DDP, and FSDP2 (policy and critic sharded for the update, gathered
    for generation and scoring)."""
    runs = gae_runs
    for strategy in ("ddp", "fsdp"):
        assert_same_metrics(
            runs["1"], runs[strategy], (*KEYS, "value/loss", "value/clip_frac", "policy/approx_kl")
        )
        assert_same_export(runs["1"], runs[strategy])
        # the torchrun job's checkpoint is a DCP one, policy and value model together
        assert any((p / "dcp").is_dir() for p in (runs[strategy] / "checkpoints").glob("step-*"))


def test_sigusr1_in_two_processes_then_resume_in_one_equals_one(tiny_model, toy_data, tmp_path, gae_runs):
    """A torchrun job preempted (SIGUSR1: checkpoint, exit 75) resumes in one process from its DCP checkpoint
    (policy, critic, optimizer, moments, KL coefficient, stream) and ends where one uninterrupted process does
    (the fixture's 1-process run of the same config)."""
    import signal
    import time

    runs = {"one": gae_runs["1"], "preempted": tmp_path / "gae-preempted"}
    cfgs = {
        "preempted": write_config(
            tmp_path / "preempted.yaml", ppo_config(tiny_model, toy_data["sft"], runs["preempted"], "gae")
        )
    }
    two = launch(cfgs["preempted"], tmp_path / "ws-two", 2)
    metrics = runs["preempted"] / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and two.poll() is None:
        if metrics.is_file() and metrics.read_text().strip():
            break
        time.sleep(0.05)
    two.send_signal(signal.SIGUSR1)  # the launcher forwards it to both workers
    _, err = two.communicate(timeout=300)
    assert two.returncode == 75, err.decode()[-3000:]  # EXIT_REQUEUE: checkpointed, requeue me
    stopped = [r["step"] for r in read_metrics(runs["preempted"])]
    assert stopped[-1] < STEPS, "the run finished before SIGUSR1 arrived; nothing was tested"
    assert any((p / "dcp").is_dir() for p in (runs["preempted"] / "checkpoints").glob("step-*"))
    finish(launch(cfgs["preempted"], tmp_path / "ws-two", 1), "the resume in 1 process")
    assert_same_metrics(runs["one"], runs["preempted"], (*KEYS, "value/loss", "policy/approx_kl"))
    assert_same_export(runs["one"], runs["preempted"])


def test_batch_not_divisible_by_world_size_is_a_config_error(tiny_model, toy_data, tmp_path):
    cfg = ppo_config(tiny_model, toy_data["sft"], tmp_path / "odd", "grpo")
    cfg["rollout"]["batch_size"] = 3
    proc = launch(write_config(tmp_path / "odd.yaml", cfg), tmp_path / "ws", 2)
    out, err = proc.communicate(timeout=300)
    text = (out + err).decode()
    assert proc.returncode == 2, text[
        -3000:
    ]  # the CLI's config error, from the launcher: torchrun never started
    assert "rollout.batch_size = 3 is not a multiple of the world size 2" in text
    assert "ChildFailedError" not in text and "torch.distributed" not in text


# ---------------------------------------------------------------------------------------------------------------------
# the pieces, in one process: split sampling, the gather of rows of different widths, the world-size checks


class _FakeDist:
    """Rank ``rank`` of 2 whose ``gather`` records what it sent and returns the given parts."""

    def __init__(self, rank: int, parts: list[Any] | None = None) -> None:
        self.rank, self.world_size, self.enabled, self.parts, self.sent = rank, 2, True, parts, None

    def gather(self, obj: Any) -> list[Any]:
        self.sent = obj
        return self.parts if self.parts is not None else [obj]


def test_split_sampling_and_gather_equal_one_batch(tiny_model):
    import torch

    from alignflow.data.prompts import left_pad
    from alignflow.models import load_policy, load_tokenizer
    from alignflow.recipes.ppo import _all_rows, _my_rows
    from alignflow.rollout import sample

    tok = load_tokenizer(str(tiny_model), padding_side="left")
    model = load_policy(str(tiny_model), dtype="float32").eval()
    k, n_groups = 2, 4
    texts = ["Hello there", "The model wrote a short poem carefully.", "x", "Item 42 costs $3.50 today, why?"]
    train_ids = [tok(t).input_ids for t in texts]
    batch = [g for g in range(n_groups) for _ in range(k)]
    eos = list(range(3, 120))  # many "EOS" ids: rows finish at different steps, the processes' widths differ

    def run(rows: list[int]):  # noqa: ANN202
        ids, mask = left_pad([train_ids[batch[i]] for i in rows], tok.pad_token_id, "cpu")
        gen = torch.Generator().manual_seed(1234)
        return sample(
            model, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=tok.pad_token_id,
            generator=gen, row_index=rows, num_rows=len(batch),
        )  # fmt: skip

    whole = run(list(range(len(batch))))
    assert len(set(whole.lengths.tolist())) > 1
    sent, args = [], []
    for rank in (0, 1):
        fake = _FakeDist(rank)
        mine = _my_rows(len(batch), k, fake)  # type: ignore[arg-type]
        assert mine == [g * k + j for g in range(rank, n_groups, 2) for j in range(k)]
        local = run(mine)
        heads = local.lengths.float().unsqueeze(1)  # a stand-in (B, 1) score
        fwd = (local.logprobs, local.logprobs * 2, local.logprobs * 3)
        args.append(
            (mine, local, [str(i) for i in mine], heads, 0.5 * (1 + rank), fwd, batch, train_ids, tok, "cpu")
        )
        _all_rows(fake, *args[-1])  # type: ignore[arg-type]
        sent.append(fake.sent)
    assert sent[0]["ids"].shape[1] != sent[1]["ids"].shape[1]  # the padding path is exercised
    got = _all_rows(_FakeDist(0, sent), *args[0])  # type: ignore[arg-type]
    roll = got.rollout
    width = whole.response_ids.shape[1]
    assert roll.response_ids.shape[1] == width
    assert torch.equal(roll.response_ids, whole.response_ids)
    assert torch.equal(roll.response_mask, whole.response_mask)
    assert torch.equal(roll.finished, whole.finished)
    assert torch.equal(roll.prompt_ids, whole.prompt_ids) and torch.equal(roll.prompt_mask, whole.prompt_mask)
    torch.testing.assert_close(roll.logprobs, whole.logprobs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.forwards[2], whole.logprobs * 3, rtol=1e-5, atol=1e-6)
    assert got.responses == [str(i) for i in range(len(batch))]
    assert torch.equal(got.head_scores.squeeze(1), whole.lengths.float())
    assert got.spread == pytest.approx(0.75)  # rows-weighted mean of the processes' 0.5 and 1.0


def test_world_size_checks():
    from alignflow.errors import ConfigError
    from alignflow.recipes.ppo import PPOConfig, check_world
    from alignflow.train.distributed import DistContext

    def cfg(**rollout_ppo: int) -> PPOConfig:
        return PPOConfig.model_validate(
            {
                "model": {"path": "m"},
                "data": {"train": "d"},
                "reward": {"fn": REWARD},
                "rollout": {"batch_size": rollout_ppo.get("batch_size", 4)},
                "ppo": {"minibatch_size": rollout_ppo.get("minibatch_size", 4)},
            }
        )

    check_world(cfg(batch_size=3, minibatch_size=3), DistContext())  # one process: anything goes
    check_world(cfg(), DistContext(rank=0, world_size=2))
    with pytest.raises(ConfigError, match="ppo.minibatch_size = 3 is not a multiple of the world size 2"):
        check_world(cfg(minibatch_size=3), DistContext(rank=0, world_size=2))
    check_world(cfg(), DistContext(rank=0, world_size=2, strategy="fsdp"))
    lora = cfg().model_copy(update={"lora": cfg().lora.model_copy(update={"enabled": True})})
    with pytest.raises(ConfigError, match="strategy=fsdp with lora.enabled"):
        check_world(lora, DistContext(rank=0, world_size=2, strategy="fsdp"))
