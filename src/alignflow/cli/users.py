"""`alignflow users add|list|disable|enable|token|revoke-token`: accounts of the annotation platform."""

from __future__ import annotations

import os
import sys

import typer
from rich.table import Table

from alignflow.cli.common import console

app = typer.Typer(help="Manage annotation platform users (admin, lead, reviewer, annotator) and API tokens.")

HOME = typer.Option(None, "--home", help="Workspace folder (default $ALIGNFLOW_HOME).")


def _sessions(home: str | None):
    from alignflow.feedback.services import connect
    from alignflow.workspace import Workspace

    return connect(Workspace.from_env(home))


@app.command("add")
def add(
    username: str = typer.Argument(..., help="Login name (letters, digits, '-', '_')."),
    role: str = typer.Option(..., "--role", help="admin | lead | reviewer | annotator."),
    pod: str | None = typer.Option(
        None, "--pod", help="Team name; a lead manages the annotators of their pod."
    ),
    tier: str = typer.Option(
        "standard", "--tier", help="standard | expert (experts also get ambiguous items)."
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input."
    ),
    home: str | None = HOME,
) -> None:
    """Create a user. The password comes from --password-stdin, $ALIGNFLOW_PASSWORD, or a hidden prompt."""
    from alignflow.feedback import services

    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = os.environ.get("ALIGNFLOW_PASSWORD") or typer.prompt(
            "password", hide_input=True, confirmation_prompt=True
        )
    with _sessions(home)() as s:
        u = services.add_user(s, username, password, role, pod=pod, tier=tier)
        console.print(f"created {u.role} [bold]{u.username}[/] (id {u.id})")


@app.command("list")
def list_(home: str | None = HOME) -> None:
    """List users with role, pod, tier, QC state and whether disabled."""
    from alignflow.feedback import services

    table = Table("id", "username", "role", "pod", "tier", "qc", "disabled")
    with _sessions(home)() as s:
        for u in services.list_users(s):
            table.add_row(
                str(u.id), u.username, u.role, u.pod or "", u.tier, u.qc_state, "yes" if u.disabled else ""
            )
    console.print(table)


@app.command("disable")
def disable(
    username: str = typer.Argument(..., help="The user to disable."), home: str | None = HOME
) -> None:
    """Disable a user: their sessions end and their tokens stop working at once."""
    from alignflow.feedback import services

    with _sessions(home)() as s:
        services.set_disabled(s, username, True)
    console.print(f"disabled {username}")


@app.command("enable")
def enable(
    username: str = typer.Argument(..., help="The user to enable again."), home: str | None = HOME
) -> None:
    """Enable a disabled user (their old sessions stay ended)."""
    from alignflow.feedback import services

    with _sessions(home)() as s:
        services.set_disabled(s, username, False)
    console.print(f"enabled {username}")


@app.command("token")
def token(
    username: str = typer.Argument(..., help="Whose token."),
    name: str = typer.Option("cli", "--name", help="A label to recognise the token by."),
    scope: list[str] = typer.Option(
        ["annotate", "read"], "--scope", help="annotate | review | manage | read (repeatable)."
    ),
    home: str | None = HOME,
) -> None:
    """Issue an API token and print it once (only its hash is stored)."""
    from alignflow.feedback import services

    with _sessions(home)() as s:
        row, raw = services.create_token(s, None, username, name, list(scope))
    console.print(f"token id {row.id} for {username} (scopes {', '.join(row.scopes)}):")
    print(raw)


@app.command("revoke-token")
def revoke_token(
    token_id: int = typer.Argument(..., help="The token id printed by `users token`."),
    home: str | None = HOME,
) -> None:
    """Revoke an API token; it stops working at once."""
    from alignflow.feedback import services

    with _sessions(home)() as s:
        services.revoke_token(s, None, token_id)
    console.print(f"revoked token {token_id}")
