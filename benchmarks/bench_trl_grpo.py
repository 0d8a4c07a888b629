"""Critic-free online RL throughput, alignflow GRPO/RLOO vs TRL 1.16 ``GRPOTrainer``/``RLOOTrainer``: episodes/s.

One episode is one sampled completion. Matched settings: ``--prompts`` prompts x ``--generations`` samples per
step (one optimizer step per generation round, one pass over it: TRL ``num_iterations=1``,
``steps_per_generation=1``; alignflow ``ppo.epochs=1`` with one minibatch), ``--response-length`` new tokens at
temperature 1 (no top-k/top-p), the same rule-based reward (``alignflow.rollout.toy:digit_fraction``), a frozen
reference model in both (GRPO: ``beta * k3`` KL loss term, beta 0.04; RLOO: ``beta * KL`` in the reward,
beta 0.05), token-mean loss aggregation (TRL ``loss_type="dapo"``), fp32, no gradient checkpointing.
Both stop a row at EOS. alignflow's step time is its recipe's ``time/step`` (excludes writing that step's
metrics). Run:

    .venv/bin/python benchmarks/bench_trl_grpo.py [--algo grpo|rloo] [--runs 5] [--steps 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from _trl_common import (
    TINY_TEST,
    Assets,
    Measured,
    ModelSize,
    alignflow_store,
    alternate,
    build_assets,
    run_alignflow,
    silence,
    step_clock,
    trl_common_args,
)

LR = 1e-5
BETA = {"grpo": 0.04, "rloo": 0.05}


def digit_reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
    """TRL's reward-function signature over alignflow's ``digit_fraction`` (the same scores on both sides)."""
    from alignflow.rollout.toy import digit_fraction

    return digit_fraction(list(prompts), [str(c) for c in completions])


def alignflow_rl(
    assets: Assets,
    store: Any,
    prompts_file: Path,
    algo: str,
    steps: int,
    n_prompts: int,
    k: int,
    length: int,
    tag: str,
) -> tuple[list[tuple[float, float]], float]:
    """One ``alignflow.recipes.ppo.run`` with ``advantage.estimator=algo``; ``(seconds, episodes)`` per step."""
    cfg = {
        "stage": "ppo",
        "output_dir": str(assets.root / "runs" / f"af-{algo}-{tag}"),
        "model": {
            "path": str(assets.policy_dir),
            "dtype": "float32",
            "device": "cpu",
            "gradient_checkpointing": False,
            "attn_implementation": "sdpa",
        },
        "data": {"train": str(prompts_file), "kind": "sft", "max_prompt_length": 128},
        "rollout": {
            "batch_size": n_prompts,
            "num_generations": k,
            "max_new_tokens": length,
            "temperature": 1.0,
            "top_p": 1.0,
            "scoring_batch_size": n_prompts * k,
        },
        "reward": {"fn": "alignflow.rollout.toy:digit_fraction"},
        "kl": {"coef": BETA[algo], "estimator": "k1"},
        "advantage": {"estimator": algo, "whiten": algo == "grpo", "grpo_scale": "group"},
        "ppo": {"epochs": 1, "minibatch_size": n_prompts * k, "clip_range": 0.2, "aggregation": "token-mean"},
        "optim": {"lr": LR, "scheduler": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
        "train": {"seed": 0, "steps": steps},
    }
    _, metrics = run_alignflow("ppo", cfg, store)
    lens = [m["response/len_mean"] for m in metrics[1:]] or [0.0]
    return [(m["time/step"], m["throughput/episodes_per_s"] * m["time/step"]) for m in metrics], sum(
        lens
    ) / len(lens)


def trl_rl(
    assets: Assets, prompts: list[str], algo: str, steps: int, n_prompts: int, k: int, length: int, tag: str
) -> tuple[list[tuple[float, float]], float]:
    """One ``GRPOTrainer``/``RLOOTrainer`` ``train()``; ``(seconds, episodes)`` per step and mean completion length."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from alignflow.models import load_tokenizer

    tok = load_tokenizer(str(assets.policy_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(
        str(assets.policy_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    episodes = n_prompts * k
    common = trl_common_args(steps, episodes, LR, assets.root / "runs" / f"trl-{algo}-{tag}")
    rl = {
        "num_generations": k,
        "max_completion_length": length,
        "generation_batch_size": episodes,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "beta": BETA[algo],
        "num_iterations": 1,
        "epsilon": 0.2,
        "log_completions": False,
    }
    if algo == "grpo":
        args: Any = GRPOConfig(**common, **rl, loss_type="dapo", scale_rewards="group")
        cls: Any = GRPOTrainer
    else:
        args, cls = RLOOConfig(**common, **rl, normalize_advantages=False), RLOOTrainer
    # TRL tokenises the prompt text as is; the bos token as text gives alignflow's [bos] + ids(prompt).
    ds = Dataset.from_list([{"prompt": tok.bos_token + p} for p in prompts])
    clock = step_clock()
    trainer = silence(
        cls(
            model=model,
            reward_funcs=digit_reward,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[clock],
        )
    )
    trainer.train()
    hist = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ][1:]
    return [(s, float(episodes)) for s in clock.durations()], (
        sum(hist) / len(hist) if hist else float("nan")
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algo", choices=("grpo", "rloo"), default="grpo")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="RL steps per run; the first is a warm-up")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--generations", type=int, default=4, help="samples per prompt")
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--root", type=Path, default=None)
    args = ap.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix=f"bench-{args.algo}-"))
    assets = build_assets(root, TINY_TEST if args.tiny else ModelSize(), 256)
    store = alignflow_store(root)
    prompts = assets.prompts[: args.prompts * args.steps]
    prompts_file = assets.write_jsonl(
        "rl-prompts.jsonl", [{"id": f"p{i}", "prompt": p, "completion": "-"} for i, p in enumerate(prompts)]
    )
    name = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}[args.algo]
    af, tr = Measured("alignflow", "episodes/s"), Measured(f"TRL {name}", "episodes/s")
    lengths: dict[str, list[float]] = {"alignflow": [], "trl": []}
    shape = (args.algo, args.steps, args.prompts, args.generations, args.response_length)

    def run_af(i: int) -> None:
        steps, mean_len = alignflow_rl(assets, store, prompts_file, *shape, f"run{i}")
        lengths["alignflow"].append(mean_len)
        print(f"  alignflow run {i}: {af.add(steps):.2f} episodes/s (mean response {mean_len:.1f} tokens)")

    def run_trl(i: int) -> None:
        steps, mean_len = trl_rl(assets, prompts, *shape, f"run{i}")
        lengths["trl"].append(mean_len)
        print(f"  TRL       run {i}: {tr.add(steps):.2f} episodes/s (mean response {mean_len:.1f} tokens)")

    alternate(args.runs, run_af, run_trl)
    return {
        "name": args.algo,
        "title": f"{args.algo.upper()} (critic-free)",
        "unit": "episodes/s",
        "alignflow": af.runs,
        "trl": tr.runs,
        "tokens_per_unit": None,
        "mean_response": {k_: sum(v) / len(v) for k_, v in lengths.items()},
        "n_params": assets.n_params,
        "size": assets.size.__dict__,
        "prompts": args.prompts,
        "generations": args.generations,
        "response_length": args.response_length,
        "steps": args.steps,
    }


if __name__ == "__main__":
    from _trl_common import save_json

    result = main()
    save_json(result["name"], result)
