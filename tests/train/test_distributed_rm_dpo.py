"""Data-parallel reward-model and DPO training under torchrun (gloo, 2 CPU processes) through the real CLI.

- 2 processes log the same first losses as 1 process at the same global batch (grad_accum 2 x batch 4) and
  export the same model(s): a 2-member RM ensemble (with a calibration temperature) through the project's RM
  loader, and the DPO policy (live frozen reference, or precomputed reference log-probs) via from_pretrained;
- grad_accum not a multiple of the world size fails with a message naming train.grad_accum and the size.

Every subprocess runs under a timeout: a collective with a dead or mismatched peer waits forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.recipes import toy
from tests.recipes.conftest import MODEL, base_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS = 3
TIMEOUT = 300
# stage -> config sections beside model/data/train: an ensemble of two RMs, one of them calibrated
EXTRA = {
    "rm": {"ensemble": {"size": 2}, "temperature": {"fraction": 0.2}},
    "dpo": {"reference": {"precompute": False}},
}
LOSS_KEYS = {"rm": ["member0/loss", "member1/loss"], "dpo": ["loss"]}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ALIGNFLOW_DB_URL"}
    env.update(ALIGNFLOW_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "alignflow", *map(str, args)]


def _losses(run_dir: Path, key: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if key in m and m["step"] > 0:
            out[m["step"]] = m[key]
    return out


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1)), (a, b)  # rank 0 alone logged, once per step
    for s in range(1, STEPS + 1):
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a, b)


def _same_weights(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6), k


def _rm_members(final: Path) -> list[dict[str, torch.Tensor]]:
    from alignflow.models.reward import load_reward_models

    return [m.state_dict() for m in load_reward_models(final).members]


def _policy(final: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(final)).state_dict()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model, toy pairs, and the 1-process reference runs of both stages (run side by side)."""
    from alignflow.models import make_tiny_model_dir

    d = tmp_path_factory.mktemp("dist-rm-dpo")
    model = make_tiny_model_dir(d / "tiny", **MODEL)
    data = toy.write_jsonl(d / "pairs.jsonl", toy.pair_rows(48))

    def config(stage: str, name: str, **train: object) -> Path:
        cfg = base_config(
            stage,
            model,
            data,
            d / name,
            train={"max_steps": STEPS, "batch_size": 4, "grad_accum": 2, **train},
            # Adam normalises each element's step, so an element whose gradient is rounding noise of the
            # summation order (~1e-9) moves by up to lr either way: eps well above that noise, and a small lr
            # (measured: lr 2e-3 leaves exports 1e-5..6e-5 apart after 3 steps, lr 2e-4 under 7e-7)
            optim={"lr": 2e-4, "scheduler": "constant", "eps": 1e-6},
            **EXTRA[stage],
        )
        return write_config(d / f"{name}.yaml", cfg)

    # One workspace per stage (SQLite store, one writer at a time); the two 1-process runs share the 2 cores.
    procs = {
        stage: subprocess.Popen(
            _cli(stage, config(stage, f"{stage}-one")),
            env=_env(d / f"ws-{stage}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for stage in ("rm", "dpo")
    }
    for stage, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, (stage, err[-3000:])
    return {"dir": d, "config": config}


def _two(setup: dict, stage: str, name: str, *overrides: str, **train: object) -> subprocess.CompletedProcess:
    cfg = setup["config"](stage, name, **train)
    return subprocess.run(
        _cli(stage, cfg, *overrides, "--nproc", "2"),
        env=_env(setup["dir"] / f"ws-{stage}"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("strategy", ["ddp"])  # FSDP2 is exercised by the DPO test (time)
def test_rm_two_processes_log_the_losses_and_export_the_ensemble_of_one(setup: dict, strategy: str) -> None:
    d, name = setup["dir"], f"rm-two-{strategy}"
    proc = _two(setup, "rm", name, distributed={"strategy": strategy})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for key in LOSS_KEYS["rm"]:
        _close(_losses(d / name, key), _losses(d / "rm-one", key))
    for k in (0, 1):  # the gradient itself (Adam's step hides its scale; the clipped norm does not)
        a, b = _losses(d / name, f"member{k}/grad_norm"), _losses(d / "rm-one", f"member{k}/grad_norm")
        assert a[1] == pytest.approx(b[1], rel=1e-5), (k, a, b)
    one_spec = json.loads((d / "rm-one" / "final" / "ensemble.json").read_text())
    two_spec = json.loads((d / name / "final" / "ensemble.json").read_text())
    assert two_spec["members"] == ["member-0", "member-1"]
    # held-out and calibration pairs were scored on every rank alike: the same temperature and eval metrics
    assert two_spec["temperature"] == pytest.approx(one_spec["temperature"], rel=1e-4)
    assert two_spec["temperature"] != 1.0
    for key, val in one_spec["eval"].items():
        assert two_spec["eval"][key] == pytest.approx(val, rel=1e-4, abs=1e-6), key
    assert (d / name / "reliability.json").is_file()
    for one, two in zip(_rm_members(d / "rm-one" / "final"), _rm_members(d / name / "final"), strict=True):
        _same_weights(one, two)
    state = json.loads(
        (d / name / "checkpoints" / "member-1" / "step-000003" / "trainer_state.json").read_text()
    )
    assert (state["format"], state["world_size"], state["strategy"]) == ("dcp", 2, strategy)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_two_processes_log_the_losses_and_export_the_policy_of_one(setup: dict, strategy: str) -> None:
    d, name = setup["dir"], f"dpo-two-{strategy}"
    # fsdp also precomputes the reference log-probs (rank 0 stores them; every rank computes the same table)
    overrides = ["reference.precompute=true"] if strategy == "fsdp" else []
    proc = _two(setup, "dpo", name, *overrides, distributed={"strategy": strategy})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, two = _losses(d / "dpo-one", "loss"), _losses(d / name, "loss")
    _close(two, one)
    g_two, g_one = _losses(d / name, "grad_norm"), _losses(d / "dpo-one", "grad_norm")
    assert g_two[1] == pytest.approx(g_one[1], rel=1e-5), (g_two, g_one)
    for key in ("rewards/margin", "rewards/accuracy", "logps/chosen"):
        a, b = _losses(d / name, key), _losses(d / "dpo-one", key)
        # At step 1 the policy is the reference: every margin is rounding noise (~1e-8) and the accuracy, the
        # fraction of margins > 0, is the sign of that noise, which the processes' batch shapes change.
        for s in range(2 if key == "rewards/accuracy" else 1, STEPS + 1):
            assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-6), (key, s, a, b)
    summary = json.loads((d / name / "summary.json").read_text())
    one_summary = json.loads((d / "dpo-one" / "summary.json").read_text())
    assert summary["metrics"]["eval/loss"] == pytest.approx(one_summary["metrics"]["eval/loss"], rel=1e-4)
    assert (summary["reference_logps"] is not None) == (strategy == "fsdp")
    _same_weights(_policy(d / "dpo-one" / "final"), _policy(d / name / "final"))


def test_grad_accum_not_a_multiple_of_the_world_size_fails_clearly(setup: dict) -> None:
    proc = _two(setup, "rm", "rm-accum3", grad_accum=3)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]  # the launcher's check: torchrun never started
    assert "train.grad_accum = 3 is not a multiple of the world size 2" in out, out[-3000:]
    assert "ChildFailedError" not in out
    # a LoRA reward model cannot be merged from FSDP shards: also refused before any process starts
    proc = _two(setup, "rm", "rm-fsdp-lora", "lora.enabled=true", distributed={"strategy": "fsdp"})
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert "set train.distributed.strategy=ddp" in proc.stdout + proc.stderr
