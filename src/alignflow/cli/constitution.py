"""`alignflow constitution run`: Constitutional AI's critique-and-revise loop (a thin shell over
:func:`alignflow.synth.constitution.run_constitution`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from alignflow.cli.common import console, open_store
from alignflow.cli.generate import progress_bar

app = typer.Typer(
    help="Constitutional AI: critique and revise a policy's responses against written principles.",
    no_args_is_help=True,
)
_PREFIXES = ("hf:", "fn:", "openai:")


def as_generator_spec(ref: str) -> str:
    """A bare model folder or artifact means ``hf:`` it."""
    return ref if ref.startswith(_PREFIXES) else f"hf:{ref}"


@app.command("run")
def run(
    policy: str = typer.Option(
        ...,
        "--policy",
        help="The policy whose responses are revised: a model folder or checkpoint/model artifact, or a "
        "generator spec (hf:DIR, openai:MODEL@URL, fn:MODULE:FN). Prompts are given to an hf: policy as "
        "`alignflow generate` gives them.",
    ),
    prompts: str = typer.Option(
        ..., "--prompts", help="Prompts: a JSONL/Parquet file (imported as 'prompts') or a dataset artifact."
    ),
    constitution: Path = typer.Option(
        ...,
        "--constitution",
        help="Constitution YAML: name, optional version, principles [{name, critique, revision, judge?}] "
        "with {prompt}/{response}/{critique} placeholders (see examples/constitution.yaml).",
        readable=False,
    ),
    critic: str | None = typer.Option(
        None,
        "--critic",
        help="Who writes critiques and revisions (generator spec or model folder; default: the policy). "
        "Add '#chat=true' to an hf: critic whose tokenizer has a chat template.",
    ),
    rounds: int = typer.Option(1, "--rounds", min=1, help="Critique-revision rounds per example."),
    judge: str | None = typer.Option(
        None,
        "--judge",
        help="Optional judge spec (rule:, rm:, hf:, openai:) that decides each (original, revision) pair "
        "in both orders against a sampled principle; disagreeing orders drop the pair.",
    ),
    score: str | None = typer.Option(
        None,
        "--score",
        help="Optional reference scorer MODULE:FN, fn(prompts, responses) -> scores (e.g. the demo's "
        "alignflow.domains.support:gold_utility_batch): the report compares originals with final texts.",
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Cap on each generation."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="Policy sampling temperature."),
    critic_temperature: float = typer.Option(
        0.0, "--critic-temperature", min=0.0, help="Critic temperature (0 = greedy, reproducible)."
    ),
    min_chars: int = typer.Option(
        8, "--min-chars", min=1, help="Revisions shorter than this (non-space characters) are not taken."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds sampling and the choice of principles."),
    name: str | None = typer.Option(None, "--name", help="Name prefix (default constitution-<name>)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    home: str | None = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME)."),
) -> None:
    """Sample a response per prompt, then for each round draw a principle, have the critic critique the
    response by it and revise it. Stores an SFT dataset (prompt -> final revision), a pairs dataset
    (revision chosen over original, or as --judge decides) and a report, all linked to the constitution file
    (stored as an artifact whose id is its SHA-256), the policy, the critic and the prompts.
    `alignflow sft` and `alignflow dpo` take the datasets by id or name in data.train."""
    from alignflow.judges import load_judge
    from alignflow.judges.generators import load_generator
    from alignflow.rollout.generations import resolve_prompts
    from alignflow.rollout.rewards import function_scorer
    from alignflow.synth.constitution import load_constitution, run_constitution

    load_constitution(constitution)  # a bad file fails before any model is loaded
    store = open_store(home)
    prompts_id = resolve_prompts(store, prompts)
    gen = load_generator(as_generator_spec(policy), store)
    crit = load_generator(as_generator_spec(critic), store) if critic else None
    jdg = load_judge(judge, store) if judge else None
    scorer = function_scorer(score, "--score") if score else None
    with progress_bar("constitution") as update:
        result = run_constitution(
            store,
            gen,
            prompts_id,
            constitution,
            crit,
            rounds=rounds,
            seed=seed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            critic_temperature=critic_temperature,
            min_chars=min_chars,
            limit=limit,
            judge=jdg,
            scorer=scorer,
            name=name,
            progress=update,
        )
    r = result.report
    if as_json:
        typer.echo(json.dumps(r, indent=1, default=str))
        return
    console.print(
        f"{r['prompts']} prompts, {r['revision_steps']} critique-revision steps: "
        f"{r['revisions_taken']} revisions taken, refused {r['revisions_refused'] or 'none'}; "
        f"{r['examples_changed']} examples changed ({100 * r['share_changed']:.1f}%); "
        f"mean chars {r['mean_chars_original']} -> {r['mean_chars_final']}",
        highlight=False,
    )
    if r.get("score"):
        sc = r["score"]
        console.print(
            f"reference score {sc['mean_original']} -> {sc['mean_final']} "
            f"({sc['improved']} improved, {sc['worsened']} worsened)",
            highlight=False,
        )
    console.print(f"constitution {r['constitution']} v{r['constitution_version']} -> {result.constitution}")
    console.print(f"sft -> {result.sft or 'none (nothing revised)'}")
    console.print(f"pairs -> {result.pairs or 'none'}")
    console.print(f"report -> {result.report_json} (markdown {result.report_md})")
