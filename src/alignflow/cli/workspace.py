"""`alignflow workspace init|info|upgrade|gc`."""

from __future__ import annotations

import typer
from rich.table import Table
from sqlalchemy import func, select

from alignflow.cli.common import console, human_bytes
from alignflow.store import Store, db
from alignflow.store.models import Artifact, LineageEdge, Run
from alignflow.workspace import TMP_MAX_AGE_S, Workspace

app = typer.Typer(help="Create, inspect and migrate the workspace (metadata database + artifact root).")

HomeOpt = typer.Option(
    None, "--home", help="Workspace folder (default: $ALIGNFLOW_HOME or ./alignflow-workspace)."
)


@app.command("init")
def init(home: str | None = HomeOpt) -> None:
    """Create the workspace folder and its database (SQLite, or $ALIGNFLOW_DB_URL)."""
    store = Store.open(Workspace.from_env(home))
    console.print(
        f"workspace ready at [bold]{store.workspace.home}[/] (database {_safe_url(store.workspace.db_url)})"
    )


@app.command("info")
def info(home: str | None = HomeOpt) -> None:
    """Show where the workspace lives, its schema revision and what it holds."""
    ws = Workspace.from_env(home)
    engine = db.make_engine(ws.db_url)
    current = db.current_revision(engine)
    table = Table(show_header=False)
    table.add_row("home", str(ws.home))
    table.add_row("database", _safe_url(ws.db_url))
    table.add_row("schema", f"{current or '(not initialised)'} (this alignflow: {db.head_revision()})")
    if current is not None:
        with engine.connect() as conn:
            n_art, size = conn.execute(select(func.count(), func.coalesce(func.sum(Artifact.bytes), 0))).one()
            n_edges = conn.execute(select(func.count()).select_from(LineageEdge)).scalar_one()
            n_runs = conn.execute(select(func.count()).select_from(Run)).scalar_one()
        table.add_row("artifacts", f"{n_art} ({human_bytes(int(size))})")
        table.add_row("lineage edges", str(n_edges))
        table.add_row("runs", str(n_runs))
    console.print(table)


@app.command("upgrade")
def upgrade(home: str | None = HomeOpt) -> None:
    """Apply pending database migrations (Alembic) to the workspace database."""
    ws = Workspace.from_env(home)
    ws.ensure_dirs()
    engine = db.make_engine(ws.db_url)
    before = db.current_revision(engine)
    db.upgrade(engine)
    console.print(f"schema {before or '(empty)'} -> {db.current_revision(engine)}")


@app.command("gc")
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    older_than: float = typer.Option(
        TMP_MAX_AGE_S,
        "--older-than",
        min=0,
        help="Seconds unchanged after which a staging file with no live writer on this host "
        "(written from another host, or by an older alignflow) counts as orphaned.",
    ),
    home: str | None = HomeOpt,
) -> None:
    """Remove orphaned staging files under artifacts/tmp/ (left by killed imports and saves).

    A file whose writer process has exited on this host goes at once; one whose writer is still
    running is always kept; any other goes once unchanged for --older-than seconds. Stored
    artifacts and the database are never touched.
    """
    ws = Workspace.from_env(home)  # not Store.open: opening a store collects orphans itself
    entries = ws.scan_tmp(older_than)
    removed = ws.collect_tmp(older_than, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        console.print(f"{verb} {e.path} ({human_bytes(e.bytes)}): {e.reason}", highlight=False)
    gone = {e.path for e in removed}
    for e in entries:
        if not e.orphan and e.path not in gone:
            console.print(f"kept {e.path} ({human_bytes(e.bytes)}): {e.reason}", highlight=False)
    total = sum(e.bytes for e in removed)
    console.print(f"{verb} {len(removed)} orphaned staging file(s), {human_bytes(total)}, from {ws.tmp_dir}")


def _safe_url(url: str) -> str:
    # Never print a password that may be embedded in a database URL.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url
