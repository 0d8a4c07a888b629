"""`alignflow generate POLICY --prompts FILE|ARTIFACT --n K`: a generations dataset from a policy."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from alignflow.cli.common import console, err_console, open_store

HOME = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME).")


def check_top_p(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """One bar for a long step: yields ``update(completed, total)``; the bar appears at the first update."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )
    task = bar.add_task(description, total=None)
    with bar:
        yield lambda completed, total: bar.update(task, completed=completed, total=total)


def generate(
    policy: str = typer.Argument(
        ..., help="A model folder or a checkpoint/model artifact (id, prefix, name)."
    ),
    prompts: str = typer.Option(
        ...,
        "--prompts",
        help="Prompts: a JSONL/Parquet file (imported as kind 'prompts') or a dataset artifact.",
    ),
    n: int = typer.Option(2, "--n", min=1, help="Candidates per prompt (K)."),
    temperature: float = typer.Option(
        1.0, "--temperature", min=0.0, help="Sampling temperature; 0 = greedy."
    ),
    top_p: float = typer.Option(1.0, "--top-p", callback=check_top_p, help="Nucleus mass in (0, 1]."),
    max_new_tokens: int = typer.Option(
        128, "--max-new-tokens", min=1, help="Cap on each candidate's tokens."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the sampler (the same seed gives the same candidates)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Candidates sampled together."),
    name: str | None = typer.Option(
        None, "--name", help="Dataset name (default: generations-<policy name>)."
    ),
    home: str | None = HOME,
) -> None:
    """Sample K candidates per prompt and store them as a 'generations' dataset (one row per prompt x candidate),
    with lineage to the policy and the prompts; `annotate import-items --artifact` reads it."""
    from alignflow.rollout.generations import Sampling, generate_dataset

    sampling = Sampling(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    store = open_store(home)
    with progress_bar("generate") as update:
        aid = generate_dataset(
            store, policy, prompts, sampling, batch_size=batch_size, name=name, progress=update
        )
    info = store.get(aid)
    console.print(
        f"generated {info.meta['num_rows']} candidates for {info.meta['num_prompts']} prompts -> [bold]{aid}[/]"
    )
