"""The `alignflow` command: each sub-command is a thin shell over a library call."""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from alignflow.cli import (
    annotate,
    constitution,
    curate,
    data,
    deploy,
    generate,
    lineage,
    pipeline,
    ppo,
    quality,
    runs,
    serve,
    users,
    workspace,
)
from alignflow.cli import eval as eval_cli
from alignflow.cli import rm_eval as rm_eval_cli
from alignflow.cli import train as train_cli
from alignflow.cli.common import err_console
from alignflow.errors import AlignflowError

app = typer.Typer(
    name="alignflow",
    help="alignflow: SFT, preference collection with quality control, reward models, PPO/DPO, "
    "evaluation and lineage, in one system.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(workspace.app, name="workspace")
curate.register(data.app)
app.add_typer(data.app, name="data")
app.add_typer(quality.app, name="quality")
app.add_typer(constitution.app, name="constitution")
app.command("lineage")(lineage.lineage)
app.add_typer(runs.app, name="runs")
app.command("serve")(serve.serve)
app.add_typer(users.app, name="users")
app.add_typer(annotate.app, name="annotate")
app.add_typer(deploy.app, name="deploy")
app.command("run")(pipeline.run)
app.command("quickstart")(pipeline.quickstart)
app.command("ppo")(ppo.ppo)
app.command("sft")(train_cli.sft)
app.command("rm")(train_cli.rm)
app.command("dpo")(train_cli.dpo)
app.command("rm-eval")(rm_eval_cli.rm_eval)
app.command("generate")(generate.generate)
app.command("eval")(eval_cli.eval_)


def main() -> None:
    """Entry point: library errors become one clear line and exit code 2, not a traceback."""
    try:
        app()
    except AlignflowError as exc:
        # Escaped: a message quotes user input, and "[/]" in it would crash rich's markup parser.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
