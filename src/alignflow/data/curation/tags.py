"""Row tags and the `--where` expression language (a tiny recursive-descent parser, never `eval`).

Grammar (keywords case-insensitive)::

    expr    := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := value [("==" | "!=" | "<" | "<=" | ">" | ">=" | "contains" | "matches") value]
    value   := NUMBER | STRING ('...' or "...") | true | false | null | NAME | "len(" NAME ")" | "(" expr ")"
    NAME    := a column (prompt, chosen, completion, weight, ...), response, row, or meta.KEY

Names are only ever looked up in the row, so an expression can read a row and nothing else. `matches` is a
regex search; `contains` a substring test; comparisons between a number and a non-number are false.
Tags go into each row's `meta.tags` list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from alignflow.data.curation.common import BY_CHOICES, CurationError, load, row_meta, row_text, save_version
from alignflow.store import Store

_TOKEN = re.compile(
    r"""\s*(?:
    (?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
    |(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    |(?P<op>==|!=|<=|>=|<|>|\(|\))
    |(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)
    )""",
    re.X,
)
_CMP = {"==", "!=", "<", "<=", ">", ">=", "contains", "matches"}
_TAG = re.compile(r"^[\w.:-]{1,64}$")

Predicate = Callable[[Mapping[str, Any]], Any]


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise CurationError(f"--where: unexpected character at position {pos}: {text[pos : pos + 10]!r}")
        kind = m.lastgroup or ""
        val = m.group(kind)
        if kind == "name" and val.lower() in (
            "and",
            "or",
            "not",
            "contains",
            "matches",
            "true",
            "false",
            "null",
        ):
            kind, val = "kw", val.lower()
        out.append((kind, val))
        pos = m.end()
    return out


def _lookup(row: Mapping[str, Any], name: str) -> Any:
    if name.startswith("meta."):
        return row_meta(row).get(name[5:])
    if name in BY_CHOICES[1:] or (name == "prompt" and "prompt" not in row):
        return row_text(row, name)
    if name not in row:
        raise CurationError(f"--where: unknown column {name!r}; columns are {', '.join(sorted(row))}")
    return row[name]


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op in ("contains", "matches"):
        if not isinstance(a, str) or not isinstance(b, str):
            return False
        return b in a if op == "contains" else re.search(b, a) is not None
    num = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if not ((isinstance(a, num) and isinstance(b, num)) or (isinstance(a, str) and isinstance(b, str))):
        return False
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise CurationError(f"--where {self.text!r}: the expression ends too early")
        self.i += 1
        return tok

    def expect(self, val: str) -> None:
        tok = self.take()
        if tok[1] != val:
            raise CurationError(f"--where {self.text!r}: expected {val!r}, got {tok[1]!r}")

    def parse(self) -> Predicate:
        pred = self.or_()
        if self.peek() is not None:
            raise CurationError(f"--where {self.text!r}: unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return pred

    def or_(self) -> Predicate:
        parts = [self.and_()]
        while self.peek() == ("kw", "or"):
            self.take()
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def and_(self) -> Predicate:
        parts = [self.not_()]
        while self.peek() == ("kw", "and"):
            self.take()
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def not_(self) -> Predicate:
        if self.peek() == ("kw", "not"):
            self.take()
            inner = self.not_()
            return lambda r: not inner(r)
        return self.compare()

    def compare(self) -> Predicate:
        left = self.value()
        tok = self.peek()
        if tok is not None and tok[1] in _CMP:
            op = self.take()[1]
            right = self.value()
            return lambda r: _compare(op, left(r), right(r))
        return left

    def value(self) -> Predicate:
        kind, val = self.take()
        if kind == "num":
            num = float(val) if any(c in val for c in ".eE") else int(val)
            return lambda r: num
        if kind == "str":
            s = re.sub(r"\\(.)", r"\1", val[1:-1])
            return lambda r: s
        if kind == "kw" and val in ("true", "false", "null"):
            const = {"true": True, "false": False, "null": None}[val]
            return lambda r: const
        if val == "(":
            inner = self.or_()
            self.expect(")")
            return inner
        if kind == "name":
            if val == "len" and self.peek() == ("op", "("):
                self.take()
                k, name = self.take()
                if k != "name":
                    raise CurationError(f"--where {self.text!r}: len() takes a column name, got {name!r}")
                self.expect(")")
                return lambda r: len(_lookup(r, name) or "")
            return lambda r: _lookup(r, val)
        raise CurationError(f"--where {self.text!r}: unexpected {val!r}")


def parse_where(text: str) -> Predicate:
    """Compile a `--where` expression into a row predicate (errors name `--where` and the problem)."""
    if not text or not text.strip():
        raise CurationError("--where: empty expression")
    return _Parser(text).parse()


def tag_rows(rows: Sequence[Mapping[str, Any]], where: str, tag: str) -> tuple[list[dict[str, Any]], int]:
    """Rows with `tag` added to `meta.tags` where the expression holds; returns (rows, number newly tagged)."""
    if not _TAG.match(tag or ""):
        raise CurationError(f"--tag must be 1-64 letters, digits or ._:- characters, got {tag!r}")
    pred = parse_where(where)
    out, n = [], 0
    for r in rows:
        row = dict(r)
        if pred(r):
            meta = row_meta(r)
            tags = list(meta.get("tags") or [])
            if tag not in tags:
                meta["tags"] = [*tags, tag]
                row["meta"] = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
                n += 1
        out.append(row)
    return out, n


def tag_dataset(store: Store, ref: str, where: str, tag: str) -> dict[str, Any]:
    """Tag the rows matching `where` and store the result as a new version."""
    parse_where(where)  # a bad expression fails before anything is read
    aid, kind, name, rows, schema = load(store, ref)
    out, n = tag_rows(rows, where, tag)
    counts = {"rows": len(rows), "tagged": n}
    new_id, created = save_version(
        store, out, schema, kind, [(aid, "input")], name, "tag", {"where": where, "tag": tag}, counts
    )
    return {"input": aid, "output": new_id, "created": created, **counts}
