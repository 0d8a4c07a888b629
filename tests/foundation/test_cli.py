"""The CLI: every command documented, end-to-end import/ls/show/export/lineage, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer
from typer.testing import CliRunner

from alignflow.cli.main import app

runner = CliRunner()


def _walk(cmd, path: tuple[str, ...] = ()):
    # typer vendors its own click; walk by duck type rather than click's classes.
    yield path, cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _walk(sub, (*path, name))


def test_every_command_and_option_has_help_text() -> None:
    root = typer.main.get_command(app)
    seen = []
    for path, cmd in _walk(root):
        seen.append(" ".join(path))
        assert (cmd.help or "").strip(), f"`alignflow {' '.join(path)}` has no help text"
        for param in cmd.params:
            if getattr(param, "param_type_name", "") == "option" and param.name not in (
                "help",
                "install_completion",
                "show_completion",
            ):
                assert (param.help or "").strip(), (
                    f"`alignflow {' '.join(path)}` option --{param.name} has no help"
                )
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, result.output
    for expected in (
        "workspace init",
        "workspace info",
        "workspace upgrade",
        "data import",
        "data ls",
        "data show",
        "data export",
        "lineage",
    ):
        assert expected in seen


def test_import_ls_show_export_lineage(tmp_path: Path, sqlite_workspace) -> None:
    src = tmp_path / "pairs.jsonl"
    src.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n" for i in range(4))
    )
    r = runner.invoke(app, ["workspace", "init"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "import", str(src), "--kind", "pairs", "--name", "toy", "--tag", "v1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["data", "ls", "--kind", "pairs"])
    assert "toy" in r.output and "4" in r.output
    r = runner.invoke(app, ["data", "show", "toy", "--rows", "1"])
    assert '"q0"' in r.output
    out = tmp_path / "back.jsonl"
    r = runner.invoke(app, ["data", "export", "toy", str(out)])
    assert r.exit_code == 0 and len(out.read_text().splitlines()) == 4

    from alignflow.store import Store

    store = Store.open(sqlite_workspace)
    toy = store.get("toy").id
    child = store.put_dataset([{"x": 1}], kind="pairs", name="filtered", parents=[(toy, "source")])
    for fmt, needle in (("tree", "<-source- pairs toy"), ("dot", "->"), ("json", '"role": "source"')):
        r = runner.invoke(app, ["lineage", child[:12], "--format", fmt])
        assert r.exit_code == 0 and needle in r.output, r.output
    r = runner.invoke(app, ["workspace", "info"])
    assert "artifacts" in r.output and "2 (" in r.output


def test_errors_are_one_line_without_traceback(tmp_path: Path, sqlite_workspace) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "alignflow.cli.main", "data", "import", str(bad), "--kind", "pairs"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"{bad}:1: field 'rejected': missing field 'rejected'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_cli_starts_without_importing_torch() -> None:
    # `alignflow --help`, `serve` and the `--nproc` launcher need no torch; importing it costs 1-2 s per start
    # (and `serve --workers N` pays it again in every worker process).
    code = (
        "import sys, alignflow.cli.main, alignflow.train.torchrun_env\n"
        "print(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'transformers'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
