"""`alignflow data stats|diff|dedup|filter|tag|drift|mix`: thin shells over `alignflow.data.curation`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alignflow.cli.common import console, err_console, open_store
from alignflow.data.curation import dedup as dedup_lib
from alignflow.data.curation import drift as drift_lib
from alignflow.data.curation import filters as filters_lib
from alignflow.data.curation import mix as mix_lib
from alignflow.data.curation import stats as stats_lib
from alignflow.data.curation import tags as tags_lib
from alignflow.data.curation.common import CurationError, load, version_label

HOME = typer.Option(None, "--home", help="Workspace folder.")
JSON = typer.Option(False, "--json", help="Print the full report as JSON instead of a table.")


@contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _tokenizer(path: str | None) -> Any:
    if path is None:
        return None
    from alignflow.models.loading import load_tokenizer

    return load_tokenizer(path)


def _scorer(rule: filters_lib.Rule) -> filters_lib.Scorer:
    """A score rule's scorer: a reward-model folder (model=) or a `module:function` judge (fn=)."""
    if "model" in rule.args:
        return filters_lib.reward_model_scorer(rule)
    from alignflow.rollout.rewards import function_scorer

    fn = function_scorer(rule.args["fn"], field=f"--rule {rule.text!r} fn")
    return lambda prompts, responses: fn(prompts, responses).tolist()


def _written(store: Any, report: dict[str, Any], key: str = "output") -> None:
    if report.get("created", True):
        console.print(f"wrote [bold]{version_label(store, report[key])}[/] ({report[key][:12]})")
    else:
        console.print("no row changed; no new version written")


def stats(
    ref: str = typer.Argument(..., help="Dataset id, prefix, name, name@vN or name@tag."),
    tokenizer: str | None = typer.Option(None, "--tokenizer", help="Tokenizer folder for token lengths."),
    html: Path | None = typer.Option(None, "--html", help="Also write an HTML page with plots here."),
    language_sample: int = typer.Option(
        2000, "--language-sample", help="Detect languages on this many rows."
    ),
    as_json: bool = JSON,
    home: str | None = HOME,
) -> None:
    """Rows, token/character/word length distributions, languages, duplicate counts, tags and score histograms.

    The statistics are stored as a `dataset-stats` artifact linked to the dataset.
    """
    if language_sample < 1:
        raise CurationError(f"--language-sample must be at least 1, got {language_sample}")
    store = open_store(home)
    aid, kind, _, rows, _ = load(store, ref)
    result = stats_lib.compute_stats(rows, kind, _tokenizer(tokenizer), language_sample=language_sample)
    store.put_json(result, kind="dataset-stats", name=f"stats-{aid[:12]}", parents=[(aid, "dataset")])
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(stats_lib.stats_html(result, version_label(store, aid)), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    console.print(f"[bold]{version_label(store, aid)}[/]: {result['rows']:,} {kind} rows")
    table = Table("field", "unit", "min", "p5", "p50", "p95", "max", "mean")
    for field, units in result["lengths"].items():
        for unit, d in units.items():
            table.add_row(
                field, unit, *(f"{d[k]:.0f}" for k in ("min", "p5", "p50", "p95", "max")), f"{d['mean']:.1f}"
            )
    console.print(table)
    langs = ", ".join(f"{k} {v}" for k, v in result["languages"]["counts"].items())
    console.print(f"languages (sample of {result['languages']['sampled']}): {langs}")
    console.print("duplicates: " + ", ".join(f"by {k} {v}" for k, v in result["duplicates"].items()))
    if result["tags"]:
        console.print("tags: " + ", ".join(f"{k} {v}" for k, v in result["tags"].items()))
    for k, d in result["scores"].items():
        console.print(
            f"{k}: min {d['min']:.3g}  p50 {d['p50']:.3g}  max {d['max']:.3g}  mean {d['mean']:.3g}"
        )
    if html is not None:
        console.print(f"wrote {html}")


def diff(
    a: str = typer.Argument(..., help="The earlier dataset (id, name, name@vN, name@tag)."),
    b: str = typer.Argument(..., help="The later dataset."),
    as_json: bool = JSON,
    home: str | None = HOME,
) -> None:
    """Rows added and removed from A to B, and every statistic that changed."""
    store = open_store(home)
    _, kind_a, _, rows_a, _ = load(store, a)
    _, kind_b, _, rows_b, _ = load(store, b)
    sa = stats_lib.compute_stats(rows_a, kind_a)
    sb = stats_lib.compute_stats(rows_b, kind_b)
    result = stats_lib.diff_stats(sa, sb, rows_a, rows_b)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    console.print(
        f"{result['rows_a']:,} -> {result['rows_b']:,} rows: {result['removed']:,} removed, "
        f"{result['added']:,} added"
    )
    table = Table("statistic", "A", "B", "B − A")
    for k, d in result["changes"].items():
        table.add_row(k, f"{d['a']:.4g}", f"{d['b']:.4g}", f"{d['delta']:+.4g}")
    console.print(table)


def dedup(
    ref: str = typer.Argument(..., help="Dataset id, prefix, name, name@vN or name@tag."),
    exact: bool = typer.Option(
        False, "--exact", help="Drop rows equal after normalising case, punctuation and spaces."
    ),
    near: bool = typer.Option(
        False, "--near", help="Drop near-duplicates (MinHash LSH on character 3-grams)."
    ),
    semantic: bool = typer.Option(
        False, "--semantic", help="Drop semantic duplicates (MiniLM cosine similarity)."
    ),
    threshold: float | None = typer.Option(
        None,
        "--threshold",
        help="Jaccard threshold for --near (default 0.7) or cosine for --semantic (default 0.95).",
    ),
    semantic_threshold: float | None = typer.Option(
        None, "--semantic-threshold", help="Cosine threshold for --semantic when --near takes --threshold."
    ),
    by: str = typer.Option("row", "--by", help="Compare rows by prompt, response or the whole row."),
    across_splits: bool = typer.Option(
        False, "--across-splits", help="Also drop train rows whose prompt appears in the eval split."
    ),
    eval_ref: str | None = typer.Option(
        None, "--eval", help="The eval dataset for --across-splits (default: rows with meta.split = eval)."
    ),
    report_file: Path | None = typer.Option(
        None, "--report", help="Write the clusters (kept and dropped ids) as JSON."
    ),
    home: str | None = HOME,
) -> None:
    """Remove exact, near and semantic duplicates; the first row of each cluster is kept. Writes a new version."""
    near_t = (threshold if threshold is not None else 0.7) if near else None
    if semantic:
        sem_t = (
            semantic_threshold
            if semantic_threshold is not None
            else (threshold if threshold is not None and not near else 0.95)
        )
    else:
        sem_t = None
        if semantic_threshold is not None:
            raise CurationError("--semantic-threshold needs --semantic")
    if threshold is not None and not (near or semantic):
        raise CurationError("--threshold needs --near or --semantic")
    store = open_store(home)
    n_rows = store.get(ref).meta.get("num_rows")
    with _progress("dedup", n_rows if (near or semantic) else None) as advance:
        report = dedup_lib.dedup_dataset(
            store,
            ref,
            by=by,
            exact=exact,
            near=near_t,
            semantic=sem_t,
            across_splits=across_splits,
            eval_ref=eval_ref,
            progress=advance,
        )
    if report_file is not None:
        report_file.write_text(json.dumps(report, indent=1))
    table = Table("dropped as", "rows")
    for k, v in report["dropped"].items():
        table.add_row(k, str(v))
    console.print(f"{report['rows_in']:,} -> {report['rows_out']:,} rows (by {by})")
    console.print(table)
    for mode, clusters in report["clusters"].items():
        for c in clusters[:5]:
            console.print(
                f"  {mode}: kept {c['kept']}, dropped {', '.join(c['dropped'][:5])}", highlight=False
            )
        if len(clusters) > 5:
            console.print(f"  {mode}: … {len(clusters) - 5} more clusters (--report FILE for all)")
    _written(store, report)


def filter_(
    ref: str = typer.Argument(..., help="Dataset id, prefix, name, name@vN or name@tag."),
    rule: list[str] = typer.Option(
        [],
        "--rule",
        help="TYPE:key=value,... (repeatable, applied in order): length, language, regex, pii, score, agreement. "
        "E.g. length:field=prompt,max=2000; language:allow=en|de; pii:types=email|phone; "
        "score:field=meta.judge,min=7; agreement:labels=meta.a1|meta.a2|meta.a3,min=0.67; "
        "regex:field=chosen,pattern=as an AI.",
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder for length rules with unit=tokens."
    ),
    home: str | None = HOME,
) -> None:
    """Drop the rows that fail any rule; reports each rule's drops and writes a new version."""
    for r in rule:
        filters_lib.parse_rule(r)  # every rule checked before the store is touched
    store = open_store(home)
    with _progress("rules", len(rule)) as advance:
        report = filters_lib.filter_dataset(
            store,
            ref,
            rule,
            progress=advance,
            load_tokenizer=lambda: _tokenizer(tokenizer),
            scorer_for=_scorer,
        )
    table = Table("rule", "examined", "dropped")
    for r in report["per_rule"]:
        table.add_row(r["rule"], str(r["examined"]), str(r["dropped"]))
    console.print(table)
    console.print(f"{report['rows_in']:,} -> {report['rows_out']:,} rows")
    _written(store, report)


def tag(
    ref: str = typer.Argument(..., help="Dataset id, prefix, name, name@vN or name@tag."),
    where: str = typer.Option(
        ...,
        "--where",
        help="Which rows: e.g. \"len(prompt) > 500 and meta.source == 'web'\" (columns, meta.KEY, len(), "
        "== != < <= > >= contains matches, and/or/not; parsed by a small grammar, never eval'd).",
    ),
    tag_: str = typer.Option(..., "--tag", help="The tag to add to the matching rows' meta.tags."),
    home: str | None = HOME,
) -> None:
    """Tag the rows matching an expression; writes a new version."""
    tags_lib.parse_where(where)
    store = open_store(home)
    report = tags_lib.tag_dataset(store, ref, where, tag_)
    console.print(f"tagged {report['tagged']:,} of {report['rows']:,} rows with {tag_!r}")
    _written(store, report)


def drift(
    ref: str = typer.Argument(..., help="The reference dataset."),
    new: str = typer.Argument(..., help="The new dataset (or the policy's samples)."),
    by: str = typer.Option("prompt", "--by", help="Embed rows by prompt, response or row."),
    new_by: str | None = typer.Option(
        None, "--new-by", help="Embed NEW by this instead (e.g. response for policy samples)."
    ),
    alpha: float = typer.Option(0.05, "--alpha", help="Significance level (Bonferroni over the two tests)."),
    fail_above: float | None = typer.Option(
        None,
        "--fail-above",
        help="Also call it drift when the classifier AUC exceeds this (an effect-size bar).",
    ),
    action: str = typer.Option(
        "fail", "--on-drift", help="fail (exit 1) or warn (exit 0) when drift is found."
    ),
    max_rows: int = typer.Option(
        2000, "--max-rows", help="Embed at most this many random rows of each side."
    ),
    permutations: int = typer.Option(500, "--permutations", help="Permutations for the MMD test."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling, permutations and the classifier split."),
    as_json: bool = JSON,
    home: str | None = HOME,
) -> None:
    """Two-sample tests on MiniLM embeddings (MMD permutation test, classifier test), p-values, effect sizes and
    the clusters that moved. Usable as a pipeline gate: exits 1 on drift unless --on-drift warn."""
    if action not in ("fail", "warn"):
        raise CurationError(f"--on-drift must be fail or warn, got {action!r}")
    if fail_above is not None and not 0.5 <= fail_above <= 1.0:
        raise CurationError(f"--fail-above is an AUC in [0.5, 1], got {fail_above}")
    if permutations < 19:
        raise CurationError(f"--permutations must be at least 19, got {permutations}")
    if not 0.0 < alpha < 1.0:
        raise CurationError(f"--alpha must be in (0, 1), got {alpha}")
    store = open_store(home)
    with _progress("embedding", None) as advance:
        report = drift_lib.drift_datasets(
            store,
            ref,
            new,
            by=by,
            new_by=new_by,
            max_rows=max_rows,
            alpha=alpha,
            n_perm=permutations,
            seed=seed,
            progress=advance,
        )
    drifted = drift_lib.is_drift(report, fail_above)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        m, c = report["mmd"], report["classifier"]
        console.print(f"{report['ref_rows']} reference vs {report['new_rows']} new rows (by {report['by']})")
        console.print(
            f"MMD² {m['mmd2']:.4g}, p = {m['p_value']:.4f}; classifier AUC {c['auc']:.3f}, "
            f"p = {c['p_value']:.4g}"
        )
        table = Table("cluster", "ref share", "new share", "change", "example")
        for cl in report.get("clusters", [])[:5]:
            table.add_row(
                str(cl["cluster"]),
                f"{cl['ref_share']:.1%}",
                f"{cl['new_share']:.1%}",
                f"{cl['change']:+.1%}",
                cl["example"][:80].replace("\n", " "),
            )
        console.print(table)
        console.print(
            ("[bold red]drift[/]" if drifted else "[green]no drift[/]") + f" (report {report['id'][:12]})"
        )
    if drifted and action == "fail":
        raise typer.Exit(1)


def mix(
    source: list[str] = typer.Option(
        [], "--source", help="DATASET:WEIGHT (repeatable); weights must sum to 1."
    ),
    languages: str | None = typer.Option(
        None, "--languages", help="temperature=T in (0, 1]: language shares within each source ∝ p^T."
    ),
    rows: int | None = typer.Option(
        None, "--rows", help="Rows in the mixture (default: the most without repeats)."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (the same seed gives the same mixture)."),
    name: str = typer.Option("mix", "--name", help="Name of the mixture dataset."),
    home: str | None = HOME,
) -> None:
    """Mix datasets with exact weights (largest-remainder counts), optionally balancing languages."""
    parsed = [mix_lib.parse_source(s) for s in source]
    if not parsed:
        raise CurationError("give at least one --source DATASET:WEIGHT")
    mix_lib.check_weights([w for _, w in parsed])
    mix_lib.parse_languages(languages)
    store = open_store(home)
    report = mix_lib.mix_datasets(store, source, rows=rows, seed=seed, languages=languages, name=name)
    table = Table("source", "available", "rows", "share", "repeated", "languages")
    for s in report["sources"]:
        langs = ", ".join(f"{k} {v}" for k, v in s.get("languages", {}).items())
        table.add_row(
            s["source"],
            str(s["available"]),
            str(s["rows"]),
            f"{s['rows'] / report['rows']:.2%}",
            str(s["repeated"]),
            langs,
        )
    console.print(table)
    _written(store, report)


def register(app: typer.Typer) -> None:
    """Attach the curation commands to the `data` group."""
    app.command("stats")(stats)
    app.command("diff")(diff)
    app.command("dedup")(dedup)
    app.command("filter")(filter_)
    app.command("tag")(tag)
    app.command("drift")(drift)
    app.command("mix")(mix)
