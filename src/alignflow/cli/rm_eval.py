"""`alignflow rm-eval CHECKPOINT --pairs FILE|ARTIFACT`: a thin shell over :mod:`alignflow.evaluate.rm_eval`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from alignflow.cli.common import console, open_store


def rm_eval(
    checkpoint: str = typer.Argument(
        ...,
        help="Reward-model folder (`alignflow rm`'s checkpoint_dir or a HF folder) or checkpoint artifact.",
    ),
    pairs: str = typer.Option(
        ...,
        "--pairs",
        help="Pair file (.jsonl/.parquet: HH transcripts, TRL prompt/chosen/rejected or RewardBench rows) "
        "or a stored pairs dataset.",
    ),
    subset_field: str | None = typer.Option(
        None, "--subset-field", help="Group accuracy by this field (RewardBench: subset)."
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", min=8, help="Token budget per sequence (default: the checkpoint's)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for evaluation.json and report.html (default: ./rm-eval)."
    ),
    batch_size: int = typer.Option(
        16, "--batch-size", min=1, help="Pairs per scoring forward (memory, not results)."
    ),
    home: str | None = typer.Option(None, "--home", help="Workspace folder."),
) -> None:
    """Accuracy (95% CI, per subset, RewardBench score), ties, ECE and margins of a reward model on pairs; with a
    multi-head checkpoint and pairs carrying per-dimension labels, each dimension head's accuracy against its
    labels beside the overall head's."""
    from alignflow.evaluate.rm_eval import (
        HEAD_TABLE_HEADER,
        TABLE_HEADER,
        evaluate_reward_model,
        head_table_rows,
        table_rows,
    )

    store = open_store(home)
    try:
        ev = evaluate_reward_model(
            store,
            checkpoint,
            pairs,
            out or Path("rm-eval"),
            subset_field=subset_field,
            max_length=max_length,
            batch_size=batch_size,
        )
    finally:
        store.close()
    table = Table(*TABLE_HEADER)
    for row in table_rows(ev.summary):
        table.add_row(*row)
    console.print(table)
    s = ev.summary
    if "per_head" in s:  # a multi-head checkpoint on pairs with dimension labels
        heads = Table(
            *HEAD_TABLE_HEADER, title="accuracy against each dimension's labels", title_justify="left"
        )
        for row in head_table_rows(s):
            heads.add_row(*row)
        if s["per_head"]:
            console.print(heads)
        else:
            console.print(f"no pair decides a dimension of the heads {', '.join(s['heads'][1:])}")
    console.print(
        f"loss {s['loss']:.4f}  margin {s['margin']:.4f}  ECE {s['ece']:.4f}  temperature {s['temperature']:.3f}"
        f"  ({s['responses_cut']} of {2 * s['overall']['n']} responses cut at {s['max_length']} tokens)",
        highlight=False,
    )
    console.print(f"report: {ev.out_dir / 'report.html'}  json: {ev.out_dir / 'evaluation.json'}")
    console.print(f"rm_evaluation artifact {ev.artifact_id}")
