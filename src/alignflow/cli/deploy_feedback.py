"""`alignflow deploy feedback-to-annotation` and `alignflow deploy purge-logs`: production logs back into
annotation, and their retention. `register(app)` adds both to the `deploy` typer (`cli/deploy.py` calls it)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import typer

from alignflow.cli.common import console
from alignflow.errors import AlignflowError

HOME = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME).")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([dh])$")


def parse_since(value: str | None, now: datetime | None = None) -> datetime | None:
    """`--since`: an ISO 8601 date/time (UTC when no zone is given) or a look-back such as `7d` or `12h`."""
    if value is None:
        return None
    m = _RELATIVE.match(value.strip())
    if m:
        amount = float(m.group(1))
        delta = timedelta(days=amount) if m.group(2) == "d" else timedelta(hours=amount)
        return (now or datetime.now(UTC)) - delta
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise AlignflowError(
            f"--since {value!r}: expected an ISO 8601 date/time (2026-12-01 or 2026-12-01T09:00) or 7d / 12h"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _sessions(home: str | None):  # noqa: ANN202
    from alignflow.feedback.services import connect
    from alignflow.workspace import Workspace

    return connect(Workspace.from_env(home))


def _sampler(store, ref: str, max_new_tokens: int, seed: int) -> tuple[Callable[[str], str], str]:  # noqa: ANN001
    """A `sample_fn` drawing one completion per prompt from a policy (folder or checkpoint artifact), loaded once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignflow.rollout.candidates import generate_candidates
    from alignflow.rollout.generations import resolve_model_folder

    path, aid, _ = resolve_model_folder(store, ref, "--sample-with")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)

    def sample(prompt: str) -> str:
        return generate_candidates(model, tok, [prompt], n=1, max_new_tokens=max_new_tokens, seed=seed)[0][0]

    return sample, aid


def feedback_to_annotation(
    project: str = typer.Option(..., "--project", help="Annotation project (pairwise) that gets the items."),
    since: str | None = typer.Option(
        None, "--since", help="Only feedback given since then: an ISO 8601 date/time, or 7d / 12h ago."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use at most this many feedback events."),
    kinds: str = typer.Option(
        "thumbs_down,rating,regenerate,abandon",
        "--kinds",
        help="Comma-separated negative kinds that become items (corrections always do).",
    ),
    low_rating: int = typer.Option(
        2, "--low-rating", min=1, max=5, help="A rating at or below this is negative."
    ),
    sample_with: str | None = typer.Option(
        None,
        "--sample-with",
        help="A policy (folder or checkpoint artifact) for a fresh sample when no other arm answered the prompt.",
    ),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="With --sample-with."),
    seed: int = typer.Option(0, "--seed", help="With --sample-with."),
    home: str | None = HOME,
) -> None:
    """Turn negative production feedback into top-priority pairwise items (and corrections into SFT and pairs
    datasets), with lineage from the exported pairs back to the logged responses."""
    from alignflow.cli.common import open_store
    from alignflow.serving.feedback import feedback_to_annotation as run

    store = open_store(home)
    sample_fn, source = _sampler(store, sample_with, max_new_tokens, seed) if sample_with else (None, None)
    negative = tuple(k.strip() for k in kinds.split(",") if k.strip())
    with _sessions(home)() as s:
        res = run(
            s,
            store,
            project,
            since=parse_since(since),
            limit=limit,
            sample_fn=sample_fn,
            sample_source=source,
            negative_kinds=negative,
            low_rating=low_rating,
        )
    said = False
    if res.items:
        console.print(
            f"{len(res.items)} item(s) added to {project} at priority {res.priority} "
            f"from production_feedback {res.artifact}"
        )
        said = True
    if res.linked:
        console.print(f"{len(res.linked)} feedback event(s) matched existing items")
        said = True
    if res.unshowable:
        console.print(f"{len(res.unshowable)} feedback event(s) on replies too long to annotate: no item")
        said = True
    if res.sft:
        console.print(f"corrections: sft {res.sft}, pairs {res.pairs}")
        said = True
    if res.no_alternative:
        why = (
            "the fresh sample repeated the reply or was too long"
            if sample_fn is not None
            else "give --sample-with POLICY for a fresh sample"
        )
        console.print(
            f"{len(res.no_alternative)} negative feedback event(s) left for later: no other arm answered "
            f"their prompt; {why}"
        )
        said = True
    if not said:
        console.print("no new negative feedback or corrections")


def purge_logs(
    retention_days: float | None = typer.Option(
        None,
        "--retention-days",
        min=0.0,
        help="Delete logged responses (and their feedback) older than this many days.",
    ),
    config: str | None = typer.Option(
        None,
        "--config",
        help="Instead of --retention-days: the deploy.yaml whose logging.retention_days applies.",
    ),
    home: str | None = HOME,
) -> None:
    """Delete production logs past their retention period (journaled as serving.purge)."""
    from alignflow.serving.logs import purge_expired

    if (retention_days is None) == (config is None):
        raise AlignflowError("give exactly one of --retention-days N or --config deploy.yaml")
    if config is not None:
        from alignflow.serving.config import load_deploy_config

        retention_days = load_deploy_config(config).logging.retention_days
    with _sessions(home)() as s:
        n = purge_expired(s, retention_days)
    console.print(f"purged {n} logged response(s) older than {retention_days:g} day(s)")


def register(app: typer.Typer) -> None:
    app.command("feedback-to-annotation")(feedback_to_annotation)
    app.command("purge-logs")(purge_logs)
