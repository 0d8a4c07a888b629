"""PPO throughput, alignflow vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer``: episodes/s.

TRL removed ``PPOTrainer`` after 1.12.0, so its side runs in a separate virtualenv
(``benchmarks/.venv-trl112``, ``make bench-venv-trl112``: torch 2.13.0, trl 1.12.0, transformers 5.23.0 as in
the main venv) as a subprocess of this script (``--worker``), reading the same saved model directories
and the same prompt token ids. The two sides alternate run by run.

Matched settings: ``--batch-size`` prompts (= episodes) per step, ``--response-length`` sampled tokens
(temperature 1, no top-k/top-p), a separate value model (the policy trunk + a scalar head), a frozen reference,
the same scalar reward model on prompt + response, per-token k1 KL penalty (coef 0.05) + score at the last
token, GAE (gamma 1, lambda 0.95), ``--ppo-epochs`` epochs of one minibatch each, clip 0.2, value clip 0.2,
value-loss coefficient 0.1, fp32, no gradient checkpointing. TRL never stops at EOS (``stop_token=None``);
alignflow stops a row at EOS and the batch when every row has stopped — the mean response lengths are
reported. alignflow's step time is its recipe's ``time/step`` (rollout + scoring + experience + updates;
it excludes writing that step's metrics). Run:

    .venv/bin/python benchmarks/bench_trl_ppo.py [--runs 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trl_common import HERE, step_clock, trl_common_args  # noqa: E402 - stdlib-only at import time

TRL112_PYTHON = HERE / ".venv-trl112" / "bin" / "python"
LR = 1e-5
KL_COEF = 0.05


def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the TRL-1.12 virtualenv: one ``PPOTrainer.train()``; returns per-step seconds and lengths."""
    import torch
    from _trl_common import silence
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")
    load = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **load)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **load)
    # The value model: the policy's trunk (the reward model dir holds it) with a scalar head.
    value = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_dir"], num_labels=1, **load)
    steps, batch = spec["steps"], spec["batch_size"]
    common = trl_common_args(steps, batch, LR, Path(spec["out"]), seed=spec["seed"])
    for k in ("max_steps", "eval_strategy"):
        common.pop(k)
    args = PPOConfig(
        **common,
        total_episodes=steps * batch,
        num_mini_batches=1,
        num_ppo_epochs=spec["ppo_epochs"],
        response_length=spec["response_length"],
        local_rollout_forward_batch_size=batch,
        temperature=1.0,
        kl_coef=KL_COEF,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        stop_token=None,
        missing_eos_penalty=None,
        num_sample_generations=0,
    )
    ds = Dataset.from_list([{"input_ids": ids} for ids in spec["prompts"]])
    clock = step_clock()
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=ds,
        value_model=value,
        callbacks=[clock],
    )
    silence(trainer)
    trainer.train()
    return {"seconds": clock.durations(), "episodes": batch, "response_len": float(spec["response_length"])}


def alignflow_ppo(
    assets: Any,
    store: Any,
    prompts_file: Path,
    steps: int,
    batch: int,
    response_length: int,
    epochs: int,
    tag: str,
) -> tuple[list[tuple[float, float]], float]:
    """One ``alignflow.recipes.ppo.run``; ``(seconds, episodes)`` per step and the mean response length."""
    from _trl_common import run_alignflow

    cfg = {
        "stage": "ppo",
        "output_dir": str(assets.root / "runs" / f"af-ppo-{tag}"),
        "model": {
            "path": str(assets.policy_dir),
            "dtype": "float32",
            "device": "cpu",
            "gradient_checkpointing": False,
            "attn_implementation": "sdpa",
        },
        "data": {"train": str(prompts_file), "kind": "sft", "max_prompt_length": 128},
        "rollout": {
            "batch_size": batch,
            "num_generations": 1,
            "max_new_tokens": response_length,
            "temperature": 1.0,
            "top_p": 1.0,
            "scoring_batch_size": batch,
        },
        "reward": {"models": [str(assets.rm_ckpt_dir)]},
        "kl": {"coef": KL_COEF, "estimator": "k1"},
        "advantage": {"estimator": "gae", "gamma": 1.0, "lam": 0.95, "whiten": True},
        "value": {"shared_trunk": False, "coef": 0.1, "clip_range": 0.2},
        "ppo": {"epochs": epochs, "minibatch_size": batch, "clip_range": 0.2},
        "optim": {"lr": LR, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"seed": 0, "steps": steps},
    }
    _, metrics = run_alignflow("ppo", cfg, store)
    lens = [m["response/len_mean"] for m in metrics[1:]] or [0.0]
    return [(m["time/step"], m["throughput/episodes_per_s"] * m["time/step"]) for m in metrics], sum(
        lens
    ) / len(lens)


def prompt_rows(assets: Any, n: int) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """RL prompts as alignflow SFT rows and as the token ids alignflow's recipe will feed (bos + prompt)."""
    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(assets.policy_dir))
    prompts = assets.prompts[:n]
    rows = [{"id": f"p{i}", "prompt": p, "completion": "-"} for i, p in enumerate(prompts)]
    ids = [[tok.bos_token_id, *tok(p, add_special_tokens=False)["input_ids"]][-128:] for p in prompts]
    return rows, ids


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from _trl_common import (
        TINY_TEST,
        Measured,
        ModelSize,
        alignflow_store,
        alternate,
        build_assets,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="PPO steps per run; the first is a warm-up")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args(argv)
    if not TRL112_PYTHON.exists():
        raise SystemExit(
            f"{TRL112_PYTHON} is missing: run `make bench-venv-trl112` first (TRL 1.12 for PPOTrainer)"
        )
    root = args.root or Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    assets = build_assets(root, TINY_TEST if args.tiny else ModelSize(), 256)
    store = alignflow_store(root)
    rows, ids = prompt_rows(assets, args.batch_size * args.steps)
    prompts_file = assets.write_jsonl("ppo-prompts.jsonl", rows)
    af, tr = Measured("alignflow", "episodes/s"), Measured("TRL 1.12 PPOTrainer", "episodes/s")
    af_len: list[float] = []

    def run_af(i: int) -> None:
        steps, mean_len = alignflow_ppo(
            assets,
            store,
            prompts_file,
            args.steps,
            args.batch_size,
            args.response_length,
            args.ppo_epochs,
            f"run{i}",
        )
        af_len.append(mean_len)
        print(f"  alignflow run {i}: {af.add(steps):.2f} episodes/s (mean response {mean_len:.1f} tokens)")

    def run_trl(i: int) -> None:
        spec = {
            "policy_dir": str(assets.policy_dir),
            "rm_dir": str(assets.rm_dir),
            "prompts": ids,
            "seed": 0,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "response_length": args.response_length,
            "ppo_epochs": args.ppo_epochs,
            "out": str(root / "runs" / f"trl-ppo-{i}"),
        }
        spec_file = root / f"ppo-spec-{i}.json"
        spec_file.write_text(json.dumps(spec))
        env = {
            **os.environ,
            "TRL_EXPERIMENTAL_SILENCE": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        proc = subprocess.run(
            [str(TRL112_PYTHON), __file__, "--worker", str(spec_file)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"TRL 1.12 PPO worker failed:\n{proc.stderr[-4000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        rate = tr.add([(s, out["episodes"]) for s in out["seconds"]])
        print(
            f"  TRL       run {i}: {rate:.2f} episodes/s (response {out['response_len']:.0f} tokens, always full)"
        )

    alternate(args.runs, run_af, run_trl)
    return {
        "name": "ppo",
        "title": "PPO (GAE, separate value model)",
        "unit": "episodes/s",
        "alignflow": af.runs,
        "trl": tr.runs,
        "trl_version": "1.12.0",
        "tokens_per_unit": None,
        "alignflow_mean_response": sum(af_len) / len(af_len),
        "n_params": assets.n_params,
        "size": assets.size.__dict__,
        "batch_size": args.batch_size,
        "response_length": args.response_length,
        "ppo_epochs": args.ppo_epochs,
        "steps": args.steps,
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        result = trl_worker(json.loads(Path(sys.argv[2]).read_text()))
        print(json.dumps(result))
    else:
        from _trl_common import save_json

        save_json("ppo", main())
