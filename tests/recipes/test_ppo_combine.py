"""`reward.combine` through the real `alignflow ppo` CLI: per-head rewards, Lagrange multipliers, exact resume.

The reward function (tests/recipes/multihead_rewards.py) returns two heads: `a` (lowercase fraction, about 0.55
at init) and `b` (digit fraction, a few percent), so `b >= 0.5` is violated throughout and `a >= 0` holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from . import multihead_rewards, toy
from .conftest import base_config, read_metrics, write_config
from .test_ppo import ppo_config, run_cli

FN = f"{multihead_rewards.__name__}:ab"


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_counters():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls on 2 shared cores (see test_ppo.py)
    multihead_rewards.CALLS.clear()
    multihead_rewards.SIGTERM_AT_CALL = None
    yield
    multihead_rewards.SIGTERM_AT_CALL = None
    torch.set_num_threads(old)


def combine_config(model: Path, prompts: Path, out: Path, combine: dict[str, Any], **sections: Any) -> dict:
    sections = {"rollout": {"batch_size": 8, "num_generations": 1, "max_new_tokens": 12}, **sections}
    return ppo_config(model, prompts, out, reward={"fn": FN, "combine": combine}, **sections)


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo"])
def test_violated_constraint_multiplier_rises(cli, tiny_model, toy_data, tmp_path, estimator):
    """b >= 0.5 with b near 0: each step lambda_b grows by lr * (0.5 - mean b); reward (a + l b) / (1 + l)."""
    lr = 0.5
    combine = {"weights": {"a": 1.0}, "constraints": {"b": ">= 0.5"}, "multiplier_lr": lr}
    k = 1 if estimator == "gae" else 2  # rloo / grpo: groups of 2 samples, 4 prompts a step
    cfg = combine_config(
        tiny_model,
        toy_data["sft"],
        tmp_path / "run",
        combine,
        advantage={"estimator": estimator},
        rollout={"batch_size": 8 // k, "num_generations": k, "max_new_tokens": 12},
        train={"steps": 4},
    )
    run_cli(cli, tmp_path, cfg)
    rows = read_metrics(tmp_path / "run")
    lam = [r["reward/multiplier/b"] for r in rows]
    assert lam[0] == 0.0  # multiplier_init, the value used at step 1
    assert all(later > earlier for earlier, later in zip(lam, lam[1:], strict=False)), lam
    for r, nxt in zip(rows, lam[1:], strict=False):  # the logged values are the update rule's
        assert r["reward/threshold/b"] == 0.5
        assert nxt == pytest.approx(
            min(max(r["reward/multiplier/b"] + lr * (0.5 - r["reward/head/b"]), 0), 10)
        )
    for r in rows:  # linear in the heads: the batch mean of the combination is the combination of the means
        l_b = r["reward/multiplier/b"]
        expected = (r["reward/head/a"] + l_b * r["reward/head/b"]) / (1 + l_b)
        assert r["reward/raw_mean"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    print(estimator, "multiplier/b per step:", lam, "head/b:", [r["reward/head/b"] for r in rows])


def test_satisfied_constraints_multipliers_relax_to_zero_and_stay(cli, tiny_model, toy_data, tmp_path):
    """From init 1.0 with lr 1.0. a >= 0 holds with slack ~0.55: lambda_a = 1 - mean a at step 2, then 0 (not
    below) and 0 again. b >= -1 holds with slack >= 1: lambda_b is 0 from step 2 on."""
    combine = {
        "weights": {"a": 1.0, "b": 1.0},
        "constraints": {"a": ">= 0", "b": ">= -1"},
        "multiplier_lr": 1.0,
        "multiplier_init": 1.0,
    }
    run_cli(
        cli,
        tmp_path,
        combine_config(tiny_model, toy_data["sft"], tmp_path / "run", combine, train={"steps": 4}),
    )
    rows = read_metrics(tmp_path / "run")
    lam_a = [r["reward/multiplier/a"] for r in rows]
    lam_b = [r["reward/multiplier/b"] for r in rows]
    assert lam_a[0] == 1.0 and lam_a[1] == pytest.approx(1.0 - rows[0]["reward/head/a"]) and 0 < lam_a[1] < 1
    assert lam_a[2:] == [0.0, 0.0], lam_a
    assert lam_b == [1.0, 0.0, 0.0, 0.0], lam_b
    assert [r["reward/threshold/b"] for r in rows] == [-1.0] * 4
    print(
        "multiplier/a per step:", lam_a, "head/a:", [r["reward/head/a"] for r in rows], "multiplier/b:", lam_b
    )


def test_resume_with_combine_equals_uninterrupted(cli, tiny_model, toy_data, tmp_path):
    """SIGTERM during step 2 (in-process, through the recipe's stop handler), re-run: steps 3-4 and the final
    weights equal an uninterrupted run's exactly; the restored reference threshold is not measured again."""
    combine = {
        "weights": {"a": 1.0},
        "constraints": {"a": ">= reference", "b": ">= 0.5"},
        "multiplier_lr": 0.5,
        "multiplier_init": 0.5,  # both move: lambda_a falls (a above its threshold), lambda_b rises
        "reference_prompts": 5,  # one 5-row scoring call, told apart from the 8-row training calls
    }

    def config(name: str) -> dict[str, Any]:
        return combine_config(
            tiny_model, toy_data["sft"], tmp_path / name, combine, train={"seed": 3, "steps": 4}
        )

    run_cli(cli, tmp_path, config("full"))
    assert multihead_rewards.CALLS == [5, 8, 8, 8, 8]

    multihead_rewards.CALLS.clear()
    multihead_rewards.SIGTERM_AT_CALL = 3  # reference, step 1, step 2
    path = write_config(tmp_path / "stopped.yaml", config("stopped"))
    res = cli("ppo", path)
    assert res.exit_code == 75, res.output + repr(res.exception)  # EXIT_REQUEUE after SIGTERM
    assert "stopped at step 2" in res.output
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [1, 2]

    multihead_rewards.CALLS.clear()
    multihead_rewards.SIGTERM_AT_CALL = None
    res = cli("ppo", path)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert multihead_rewards.CALLS == [8, 8]  # steps 3 and 4; no reference measurement

    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "stopped")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    keys = [k for k in full[0] if k.startswith(("reward/", "loss/", "kl/"))]
    assert {"reward/multiplier/a", "reward/multiplier/b", "reward/threshold/a", "reward/head/b"} <= set(keys)
    for a, b in zip(full, resumed, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, a["step"]  # exact, not approx
    assert len({r["reward/threshold/a"] for r in resumed}) == 1
    w_full = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    w_resumed = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)
    print(
        "threshold/a:",
        full[0]["reward/threshold/a"],
        "multiplier/a:",
        [r["reward/multiplier/a"] for r in full],
        "multiplier/b:",
        [r["reward/multiplier/b"] for r in full],
    )


def test_reference_threshold_same_from_frozen_reference_and_lora_adapters_off(
    cli, tiny_model, toy_data, tmp_path
):
    """'>= reference' samples the KL reference: the frozen copy, or the LoRA policy with its adapters off. At
    step 0 both are the SFT model, and with the same prompts and generator they measure the same threshold."""
    combine = {"weights": {"a": 1.0}, "constraints": {"a": ">= reference"}, "reference_prompts": 8}
    got = {}
    for name, lora in (("full", {"enabled": False}), ("lora", {"enabled": True, "r": 4, "alpha": 8})):
        cfg = combine_config(
            tiny_model, toy_data["sft"], tmp_path / name, combine, lora=lora, train={"steps": 1}
        )
        run_cli(cli, tmp_path, cfg)
        got[name] = read_metrics(tmp_path / name)[0]["reward/threshold/a"]
    assert 0.0 < got["full"] < 1.0
    assert got["lora"] == pytest.approx(got["full"], abs=1e-6), got
    print("reference threshold/a:", got)


def test_multi_head_reward_model_heads_logged_combined_and_checked(cli, tiny_model, toy_data, tmp_path):
    """A two-head `alignflow rm` checkpoint (overall, polite): without reward.combine the overall head is the
    reward and both heads are logged; with it, a '>= reference' constraint on polite; unknown heads named."""
    pairs = [dict(row, labels={"polite": float(i % 2)}) for i, row in enumerate(toy.pair_rows(24))]
    rm_cfg = base_config(
        "rm",
        tiny_model,
        toy.write_jsonl(tmp_path / "pairs.jsonl", pairs),
        tmp_path / "rm",
        train={"max_steps": 2},
    )
    res = cli("rm", write_config(tmp_path / "rm.yaml", {**rm_cfg, "heads": ["overall", "polite"]}))
    assert res.exit_code == 0, res.output + repr(res.exception)
    rm_dir = str(tmp_path / "rm" / "final")

    def config(name: str, combine: dict[str, Any] | None, steps: int) -> dict[str, Any]:
        return ppo_config(
            tiny_model,
            toy_data["sft"],
            tmp_path / name,
            reward={"fn": None, "models": [rm_dir], "combine": combine},
            rollout={"batch_size": 4, "num_generations": 1, "max_new_tokens": 8},
            train={"steps": steps},
        )

    run_cli(cli, tmp_path, config("plain", None, 1))
    row = read_metrics(tmp_path / "plain")[0]
    assert row["reward/raw_mean"] == pytest.approx(row["reward/head/overall"], abs=1e-6)
    assert "reward/head/polite" in row and not any(k.startswith("reward/multiplier/") for k in row)

    combine = {
        "weights": {"overall": 1.0},
        "constraints": {"polite": ">= reference"},
        "multiplier_init": 0.5,
        "multiplier_lr": 0.5,
        "reference_prompts": 4,
    }
    run_cli(cli, tmp_path, config("combined", combine, 2))
    rows = read_metrics(tmp_path / "combined")
    thr = rows[0]["reward/threshold/polite"]
    assert rows[1]["reward/threshold/polite"] == thr
    step_1 = min(max(0.5 - 0.5 * (rows[0]["reward/head/polite"] - thr), 0.0), 10.0)
    assert rows[0]["reward/multiplier/polite"] == 0.5
    assert rows[1]["reward/multiplier/polite"] == pytest.approx(step_1)
    print(
        "rm heads: threshold/polite", thr, "multiplier/polite", [r["reward/multiplier/polite"] for r in rows]
    )

    res = cli("ppo", write_config(tmp_path / "bad.yaml", config("bad", {"weights": {"accuracy": 1.0}}, 1)))
    assert res.exit_code != 0
    text = str(res.exception) + res.output
    assert "reward.combine.weights.accuracy: unknown head 'accuracy'" in text, text
    assert "has heads ['overall', 'polite']" in text, text


@pytest.mark.parametrize(
    ("combine", "message"),
    [
        ({"weights": {"a": 1.0, "z": 1.0}}, "reward.combine.weights.z: unknown head 'z'"),
        (
            {"weights": {"a": 1.0}, "constraints": {"q": ">= 0"}},
            "reward.combine.constraints.q: unknown head 'q'",
        ),
        ({"weights": {"a": 1.0}, "constraints": {"b": "<= 0.5"}}, "reward.combine.constraints.b"),
        (
            {"weights": {"a": 1.0}, "constraints": {"b": ">= lots"}},
            "expected '>= reference' or '>= <number>'",
        ),
        ({"weights": {"a": 0.0}}, "at least one positive weight"),
        ({"weights": {"a": -1.0}}, "reward.combine.weights.a"),
        (None, "reward.combine is unset"),
    ],
)
def test_combine_config_errors(cli, tiny_model, toy_data, tmp_path, combine, message):
    cfg = combine_config(tiny_model, toy_data["sft"], tmp_path / "bad", combine, train={"steps": 1})
    res = cli("ppo", write_config(tmp_path / "bad.yaml", cfg))
    assert res.exit_code != 0
    text = str(res.exception) + res.output
    assert message in text, text
    print(text.strip().splitlines()[-1])
    if "unknown head" in message:
        assert "has heads ['a', 'b']" in text, text
