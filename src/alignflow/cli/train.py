"""`alignflow sft|rm|dpo CONFIG [key=value ...]`: thin shells over the recipes' `run(cfg)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from alignflow.cli.common import console
from alignflow.cli.launch import NPROC_HELP, finish_code, launch, preflight
from alignflow.config import load_config

CONFIG_HELP = "Stage config YAML (see src/alignflow/recipes/<stage>.yaml for a commented example)."
OVERRIDES_HELP = "Dotted overrides applied on top of CONFIG, e.g. optim.lr=1e-4 train.max_steps=10."
HOME_HELP = "Workspace folder (default: $ALIGNFLOW_HOME or ./alignflow-workspace)."
RESULT_HELP = (
    "Also write the recipe's result (run id, checkpoint id and folder, metrics) as JSON to this file, or "
    '{"error": ...} when it fails; under torchrun only rank 0 writes it. The Ray engine reads it.'
)


def _report(result: dict[str, Any]) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":  # under torchrun the result is rank 0's to print
        raise typer.Exit(finish_code(result))
    if result.get("stopped"):
        console.print(f"stopped at step {result['step']}; run folder {result['run_dir']} (re-run to resume)")
        code = finish_code(result)
        if code:
            raise typer.Exit(code)
        return
    shown = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
    console.print(f"run {result['run_id']} finished; checkpoint {result['checkpoint']}")
    console.print(f"checkpoint folder: {result['checkpoint_dir']}")
    console.print_json(json.dumps(shown))


def _write_result(path: Path | None, result: dict[str, Any]) -> None:
    import os

    if path is None or os.environ.get("RANK", "0") != "0":
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, default=str, indent=1))
    os.replace(tmp, path)


def _run(
    module: str,
    schema_name: str,
    config: Path,
    overrides: list[str],
    home: str | None,
    result_json: Path | None = None,
    nproc: int = 1,
) -> None:
    import importlib
    import os

    from alignflow.errors import AlignflowError

    if home:
        os.environ["ALIGNFLOW_HOME"] = home
    try:
        mod = importlib.import_module(f"alignflow.recipes.{module}")
        cfg = load_config(config, overrides, schema=getattr(mod, schema_name))
        if nproc > 1:  # the same command in N processes under torchrun (alignflow.cli.launch)
            preflight(cfg, mod.check_world, nproc)
            raise typer.Exit(launch(nproc))
        result = mod.run(cfg)
    except AlignflowError as exc:
        err = {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}
        _write_result(result_json, {"error": err})
        raise
    _write_result(result_json, result)
    _report(result)


def sft(
    config: Path = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    home: str | None = typer.Option(None, "--home", help=HOME_HELP),
    result_json: Path | None = typer.Option(None, "--result-json", help=RESULT_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Supervised fine-tuning on prompt/completion or chat `messages` rows (loss on completion tokens)."""
    _run("sft", "SFTConfig", config, overrides or [], home, result_json, nproc)


def rm(
    config: Path = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    home: str | None = typer.Option(None, "--home", help=HOME_HELP),
    result_json: Path | None = typer.Option(None, "--result-json", help=RESULT_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Train a Bradley-Terry reward model (or an ensemble) on preference pairs or rankings."""
    _run("reward", "RewardConfig", config, overrides or [], home, result_json, nproc)


def dpo(
    config: Path = typer.Argument(..., help=CONFIG_HELP),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
    home: str | None = typer.Option(None, "--home", help=HOME_HELP),
    result_json: Path | None = typer.Option(None, "--result-json", help=RESULT_HELP),
    nproc: int = typer.Option(1, "--nproc", min=1, help=NPROC_HELP),
) -> None:
    """Preference-optimise a policy with DPO or a family member (cdpo, robust, ipo, hinge, simpo, orpo)."""
    _run("dpo", "DPOConfig", config, overrides or [], home, result_json, nproc)
