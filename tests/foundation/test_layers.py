"""The import direction of ``docs/architecture.md``, checked on every import in ``src/alignflow``.

The rules are read from the document itself (its "Layers" and "Deliberate exceptions" tables), so the doc cannot
drift from the code: a new package must be given a layer there, and a new exception must say why.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"
# Only these packages may import the stage scripts (see the doc's "Layers" section).
RECIPE_IMPORTERS = {"cli", "pipeline", "recipes"}


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module, e.g. "alignflow.recipes.ppo"
    imported: str  # dotted module or name, e.g. "alignflow.train.losses"
    line: int
    module_level: bool  # executed at import time (not inside a function, not under TYPE_CHECKING)

    @property
    def where(self) -> str:
        return f"{self.importer.replace('.', '/')}.py:{self.line}"


def _table(doc: str, heading: str) -> list[list[str]]:
    """Rows of the first Markdown table after ``## heading`` (header and rule rows dropped)."""
    section = doc.split(f"## {heading}\n", 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("|") and not re.match(r"^\|[-| ]+\|$", line):
            rows.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return rows[1:]


def load_rules(doc_text: str) -> tuple[dict[str, int], set[tuple[str, str]]]:
    layers = {row[0]: int(row[1]) for row in _table(doc_text, "Layers")}
    exceptions = {(row[0], row[1]) for row in _table(doc_text, "Deliberate exceptions")}
    return layers, exceptions


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, src: Path) -> Iterator[Import]:
    """Every ``alignflow`` import in one file, resolved to absolute names, with whether it runs at import time."""
    module = module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def visit(node: ast.AST, module_level: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(module, alias.name, child.lineno, module_level)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                # ``from alignflow.x import y`` may name a submodule y: count both.
                yield Import(module, target, child.lineno, module_level)
                for alias in child.names:
                    yield Import(module, f"{target}.{alias.name}", child.lineno, module_level)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                yield from visit(child, False)
            else:
                yield from visit(child, module_level)

    yield from (i for i in visit(tree, True) if i.imported.split(".")[0] == "alignflow")


def unit_of(dotted: str, layers: dict[str, int]) -> str | None:
    """The layer-table row a dotted name belongs to: the longest row that prefixes it (``alignflow.`` dropped)."""
    parts = dotted.split(".")[1:]
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in layers:
            return ".".join(parts[:n])
    return None


def direction_violations(src: Path, layers: dict[str, int], exceptions: set[tuple[str, str]]) -> list[str]:
    problems = []
    seen: set[tuple[str, str]] = set()
    for path in sorted((src / "alignflow").rglob("*.py")):
        for imp in imports_of(path, src):
            here, there = unit_of(imp.importer, layers), unit_of(imp.imported, layers)
            if here is None or there is None or here == there:
                continue  # the package root, the same row, or a name such as `alignflow.__version__`
            if (imp.where, there) in seen:
                continue  # `from alignflow.x import y` yields x and x.y: one finding per line and package
            seen.add((imp.where, there))
            sub = ".".join(imp.importer.split(".")[1:3])
            if (here, there) in exceptions or (sub, there) in exceptions:
                continue
            if there == "recipes" and here.split(".")[0] not in RECIPE_IMPORTERS:
                problems.append(
                    f"{imp.where}: {imp.importer} imports {imp.imported}: only cli/pipeline use recipes"
                )
            elif layers[there] >= layers[here]:
                problems.append(
                    f"{imp.where}: {imp.importer} (layer {layers[here]}, {here}) imports {imp.imported} "
                    f"(layer {layers[there]}, {there})"
                )
    return problems


def cycles(src: Path) -> list[list[str]]:
    """Cycles among modules through module-level imports (Tarjan's strongly connected components)."""
    files = {module_name(p, src): p for p in (src / "alignflow").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for m, p in files.items():
        for imp in imports_of(p, src):
            # A submodule naming its own package (``from alignflow.store import db`` inside the store) is how
            # packages are built, not a cycle: Python has the package object before its submodules run.
            ancestor = m.startswith(imp.imported + ".")
            if imp.module_level and imp.imported in files and imp.imported != m and not ancestor:
                graph[m].add(imp.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_every_package_has_a_layer() -> None:
    layers, _ = load_rules(DOC.read_text(encoding="utf-8"))
    packages = {
        p.stem if p.is_file() else p.name
        for p in (SRC / "alignflow").iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")
    }
    rows = {row.split(".")[0] for row in layers}
    assert packages - rows == set(), "give these packages a row in docs/architecture.md's Layers table"
    assert rows - packages == set(), "docs/architecture.md lists packages that do not exist"
    for row in layers:
        assert (SRC / "alignflow" / Path(*row.split("."))).with_suffix(".py").exists() or (
            SRC / "alignflow" / Path(*row.split("."))
        ).is_dir(), f"docs/architecture.md names {row}, which does not exist"


def test_imports_follow_the_documented_direction() -> None:
    layers, exceptions = load_rules(DOC.read_text(encoding="utf-8"))
    assert direction_violations(SRC, layers, exceptions) == []


def test_no_import_cycles() -> None:
    assert cycles(SRC) == []


# ---------------------------------------------------------------------------------------------- the checker itself


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / "alignflow" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


LAYERS = {"errors": 0, "store": 2, "train": 4, "train.high": 6, "recipes": 7, "cli": 10}


@pytest.mark.parametrize(
    ("importer", "text", "expected"),
    [
        ("train/losses.py", "from alignflow.store import Store\n", 0),  # downward: fine
        ("store/api.py", "from alignflow.train.losses import dpo_loss\n", 1),  # upward
        ("store/api.py", "def f():\n    from alignflow.train import losses\n", 1),  # lazy, still upward
        ("train/x.py", "from alignflow.recipes.common import Run\n", 1),  # only cli/pipeline import recipes
        ("cli/x.py", "from alignflow.recipes.sft import run\n", 0),
        ("train/x.py", "from ..store import api\n", 0),  # relative imports are resolved
        ("store/x.py", "from ..train import losses\n", 1),
    ],
)
def test_direction_checker_flags_upward_imports(
    tmp_path: Path, importer: str, text: str, expected: int
) -> None:
    src = _tree(
        tmp_path,
        {"__init__.py": "", "store/__init__.py": "", "train/__init__.py": "", "recipes/__init__.py": "",
         "cli/__init__.py": "", importer: text},
    )  # fmt: skip
    assert len(direction_violations(src, LAYERS, set())) == expected


def test_sub_module_rows_have_their_own_layer(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "train/high.py": "from alignflow.store import api\nfrom alignflow.train import low\n",  # down: fine
            "train/low.py": "def f():\n    from alignflow.train import high\n",  # row train (4) -> train.high (6)
        },
    )
    assert [v.split(":")[0] for v in direction_violations(src, LAYERS, set())] == ["alignflow/train/low.py"]


def test_direction_checker_honours_exceptions(tmp_path: Path) -> None:
    src = _tree(tmp_path, {"store/migrations/env.py": "import alignflow.train.losses\n"})
    assert len(direction_violations(src, LAYERS, set())) == 1
    assert direction_violations(src, LAYERS, {("store.migrations", "train")}) == []


def test_cycle_checker_finds_module_level_cycles_only(tmp_path: Path) -> None:
    src = _tree(
        tmp_path,
        {
            "a.py": "from alignflow import b\n",
            "b.py": "import alignflow.c\n",
            "c.py": "from alignflow.a import x\n",
            "d.py": "def f():\n    from alignflow import e\n",
            "e.py": "from alignflow import d\n",
        },
    )
    assert cycles(src) == [["alignflow.a", "alignflow.b", "alignflow.c"]]


def test_rules_parse_from_the_doc() -> None:
    layers, exceptions = load_rules(DOC.read_text(encoding="utf-8"))
    # the CLI is the top, under only `python -m alignflow` (the entry point torchrun runs), which imports it
    above_cli = {k for k, v in layers.items() if v > layers["cli"]}
    assert layers["errors"] == 0 and above_cli <= {"__main__"}
    assert ("store.migrations", "feedback") in exceptions
