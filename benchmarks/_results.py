"""Shared by the benchmark scripts: machine facts and writing a section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def versions(*pkgs: str) -> str:
    out = []
    for p in pkgs:
        try:
            out.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def summarize(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(key: str, title: str, body: str, pkgs: tuple[str, ...] = ()) -> None:
    """Replace (or append) the section `key` of RESULTS.md, stamped with date, machine and versions."""
    stamp = f"_{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {machine()}"
    if pkgs:
        stamp += f" · {versions(*pkgs)}"
    stamp += "_"
    section = f"<!-- {key}:start -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- {key}:end -->"
    text = (
        RESULTS.read_text()
        if RESULTS.exists()
        else "# Benchmark results\n\nWritten by the scripts in this folder; re-run them to refresh.\n"
    )
    pattern = re.compile(rf"<!-- {re.escape(key)}:start -->.*?<!-- {re.escape(key)}:end -->", re.S)
    text = pattern.sub(section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(text)
