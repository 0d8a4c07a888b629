"""`alignflow eval POLICY... --prompts FILE|ARTIFACT --scorer SPEC`: compare policies with confidence intervals."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from alignflow.cli.common import console, open_store
from alignflow.cli.generate import HOME, check_top_p, progress_bar


def eval_(
    policies: list[str] = typer.Argument(
        ..., help="Model folders or checkpoint/model artifacts (one or more)."
    ),
    prompts: str = typer.Option(
        ...,
        "--prompts",
        help="Prompts: a JSONL/Parquet file (imported as kind 'prompts') or a dataset artifact.",
    ),
    scorer: str = typer.Option(
        ...,
        "--scorer",
        help="rm:CKPT (reward model folder or artifact), gold:MODULE:FN (fn(prompts, responses) -> scores) "
        "or judge:SPEC (AI judge backends).",
    ),
    baseline: str | None = typer.Option(
        None, "--baseline", help="Policy the others are compared with (win rate, Δ score); evaluated too."
    ),
    temperature: list[float] = typer.Option(
        [0.0, 1.0], "--temperature", min=0.0, help="Temperature to sample at, repeatable; 0 = greedy."
    ),
    samples_per_prompt: int = typer.Option(
        4, "--samples-per-prompt", min=1, help="Responses per prompt at each temperature > 0 (greedy: 1)."
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Cap on each response's tokens."),
    top_p: float = typer.Option(1.0, "--top-p", callback=check_top_p, help="Nucleus mass in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler and of the bootstrap."),
    max_prompts: int | None = typer.Option(
        None, "--max-prompts", min=1, help="Use only the first N prompts."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Responses sampled together."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Folder for summary.json, responses.jsonl and index.html (default: under reports/).",
    ),
    name: str | None = typer.Option(None, "--name", help="Name of the evaluation artifact."),
    home: str | None = HOME,
) -> None:
    """Per policy and temperature: mean score with a bootstrap CI, win rate and score difference against the
    baseline (paired by prompt), response lengths; with a multi-head reward model, every head's mean (and its
    difference from the baseline) per policy; prints the tables, writes the JSON summary and an HTML report,
    and stores an 'evaluation' artifact with lineage to the policies, prompts and scorer."""
    from alignflow.evaluate.policies import head_rows, summary_rows, verdicts
    from alignflow.evaluate.report import print_summary
    from alignflow.rollout.policy_eval import EvalSettings, evaluate_policies

    settings = EvalSettings(
        temperatures=tuple(temperature),
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        max_prompts=max_prompts,
    )
    store = open_store(home)
    with progress_bar("eval") as update:
        result = evaluate_policies(
            store,
            policies,
            prompts,
            scorer,
            settings,
            baseline=baseline,
            out_dir=out,
            name=name,
            progress=update,
        )
    summary = result.summary
    tables = [
        {
            "title": f"scores by {scorer}",
            "summary_rows": summary_rows(summary),
            "verdict": "\n".join(verdicts(summary)),
        }
    ]
    if summary.get("heads"):  # a multi-head reward model: the policy × head tables
        tables.append({"title": "mean reward per head", "summary_rows": head_rows(summary)})
        if head_rows(summary, diff=True):
            title = f"per-head difference from {summary['baseline']} (paired by prompt)"
            tables.append({"title": title, "summary_rows": head_rows(summary, diff=True)})
    for i, table in enumerate(tables):
        print_summary(table, console, result.report if i == len(tables) - 1 else None)
    eff = summary.get("annotation_efficiency") or {}
    if eff.get("curve"):
        last = eff["curve"][-1]
        console.print(
            f"annotation efficiency: held-out RM accuracy {last['accuracy']:.3f} after {last['n_labels']} of the "
            f"reward model's training pairs ({len(eff['curve'])} points in summary.json and the report)"
        )
    elif eff.get("note"):
        console.print(f"[dim]annotation efficiency: {escape(eff['note'])}[/]")
    console.print(f"summary: {escape(str(result.out_dir / 'summary.json'))}")
    console.print(f"evaluation artifact: [bold]{result.artifact_id}[/]")
