"""`alignflow deploy serve | keys add|list|revoke` (and S4's `feedback-to-annotation`, `purge-logs`): the
OpenAI-compatible gateway over policy versions, and its API keys."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from alignflow.cli import deploy_feedback
from alignflow.cli.common import console

app = typer.Typer(
    help="Serve policy versions over an OpenAI-compatible HTTP gateway, with experiments, API keys, limits, "
    "metrics and production feedback.",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="API keys of the gateway (stored as SHA-256; a key is shown once).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

HOME = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME).")


def _sessions(home: str | None):  # noqa: ANN202
    from alignflow.feedback.services import connect
    from alignflow.workspace import Workspace

    return connect(Workspace.from_env(home))


@app.command("serve")
def serve(
    config: Path = typer.Option(..., "--config", help="deploy.yaml (see examples/deploy.yaml)."),
    host: str | None = typer.Option(
        None, "--host", help="Interface to listen on (default: the config's host)."
    ),
    port: int | None = typer.Option(None, "--port", help="TCP port (default: the config's port)."),
    override: list[str] = typer.Option(
        [], "--set", help="Dotted override, e.g. --set limits.max_tokens=256."
    ),
    log_level: str = typer.Option("warning", "--log-level", help="Uvicorn log level."),
    home: str | None = HOME,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/feedback, /healthz and /metrics.

    One process: rate limits are kept in its memory, and builtin engines batch within it."""
    import uvicorn

    from alignflow.cli.common import open_store
    from alignflow.serving.app import make_app
    from alignflow.serving.config import load_deploy_config

    cfg = load_deploy_config(config, override)
    store = open_store(home)
    gateway = make_app(cfg, store)
    bind_host, bind_port = host or cfg.host, cfg.port if port is None else port
    versions = ", ".join(f"{m.name}={gateway.state.gateway.version(m.name)}" for m in cfg.models)
    console.print(f"serving {escape(versions)} on http://{bind_host}:{bind_port}/v1", highlight=False)
    try:
        uvicorn.run(gateway, host=bind_host, port=bind_port, log_level=log_level)
    finally:
        store.close()


@keys_app.command("add")
def keys_add(
    name: str = typer.Argument(..., help="Who the key is for (1-64 characters)."),
    rate: int | None = typer.Option(
        None, "--rate", min=1, help="Requests per minute (default: the config's limits.rate_per_minute)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print {id, name, rate_per_minute, key} as JSON."),
    home: str | None = HOME,
) -> None:
    """Create a key and print it once; only its SHA-256 is stored."""
    from alignflow.serving import keys

    with _sessions(home)() as s:
        row, raw = keys.create_key(s, name, rate)
    if as_json:
        typer.echo(
            json.dumps({"id": row.id, "name": row.name, "rate_per_minute": row.rate_per_minute, "key": raw})
        )
        return
    limit = f"{row.rate_per_minute}/min" if row.rate_per_minute else "the config's default rate"
    console.print(f"created key {row.id} for {escape(row.name)} ({limit}); it is shown once, store it now:")
    typer.echo(raw)


@keys_app.command("list")
def keys_list(
    as_json: bool = typer.Option(False, "--json", help="Print the keys as a JSON list."),
    home: str | None = HOME,
) -> None:
    """List keys (id, name, rate, created, revoked); the keys themselves are not stored and cannot be shown."""
    from alignflow.serving import keys

    with _sessions(home)() as s:
        rows = keys.list_keys(s)
    records = [
        {
            "id": r.id,
            "name": r.name,
            "rate_per_minute": r.rate_per_minute,
            "created_at": r.created_at.isoformat(),
            "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        }
        for r in rows
    ]
    if as_json:
        typer.echo(json.dumps(records))
        return
    table = Table("id", "name", "rate/min", "created", "revoked")
    for r in records:
        table.add_row(
            str(r["id"]),
            escape(r["name"]),
            str(r["rate_per_minute"] or "default"),
            r["created_at"][:19],
            (r["revoked_at"] or "")[:19],
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: int = typer.Argument(..., help="The key's id (see `deploy keys list`)."), home: str | None = HOME
) -> None:
    """Revoke a key: requests with it get 401 from then on."""
    from alignflow.serving import keys

    with _sessions(home)() as s:
        row = keys.revoke_key(s, key_id)
    console.print(f"revoked key {row.id} ({escape(row.name)})")


deploy_feedback.register(app)
