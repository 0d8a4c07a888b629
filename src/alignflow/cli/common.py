"""Helpers shared by CLI commands."""

from __future__ import annotations

from rich.console import Console

from alignflow.store import Store
from alignflow.workspace import Workspace

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def open_store(home: str | None = None) -> Store:
    return Store.open(Workspace.from_env(home))


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
