"""`alignflow ppo CONFIG [key=value ...]`: on-policy RLHF (PPO with GAE, RLOO or GRPO)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from alignflow.cli.common import console
from alignflow.cli.launch import NPROC_HELP, finish_code, launch, preflight


def ppo(
    config: Path = typer.Argument(..., help="PPO config YAML (see src/alignflow/recipes/ppo.yaml)."),
    overrides: list[str] = typer.Argument(
        None, help="Dotted overrides, e.g. train.steps=50 advantage.estimator=rloo rollout.num_generations=4."
    ),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Train a policy against a reward function or reward model(s); Ctrl-C checkpoints, re-run resumes."""
    from alignflow.config import load_config
    from alignflow.recipes.ppo import PPOConfig, check_world, run

    cfg = load_config(config, overrides or [], schema=PPOConfig)
    if nproc > 1:  # checked here, before torchrun starts its processes
        preflight(cfg, check_world, nproc)
        raise typer.Exit(launch(nproc))
    result = run(cfg)
    if os.environ.get("RANK", "0") != "0":  # under torchrun the result is rank 0's to print
        raise typer.Exit(finish_code(result))
    if result.get("stopped"):
        console.print(f"stopped at step {result['step']}; resume with the same command")
        code = finish_code(result)
        if code:
            raise typer.Exit(code)
        return
    console.print(
        json.dumps({k: result[k] for k in ("run_id", "checkpoint", "checkpoint_dir", "metrics")}, indent=1)
    )
