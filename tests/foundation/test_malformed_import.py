"""`alignflow data import` on a corpus of malformed files: each one a clean error through the real CLI.

Every case runs `alignflow.cli.main.main()` (the console-script entry point) with a real argv and
checks the contract: exit status 2, one `error:` message of the form `file:line: field 'x': problem`
(file-level problems: `file: problem`), no traceback, and nothing written: no dataset in the store
and no staging file left in `artifacts/tmp/`.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.cli.main import main
from alignflow.store import Store

GOOD_PAIR = {"prompt": "q", "chosen": "yes", "rejected": "no"}
GOOD_SFT = {"prompt": "Hi", "completion": "Hello"}
GOOD_RANK = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}
HH = "\n\nHuman: hi\n\nAssistant:"


def jl(*rows: object) -> bytes:
    """JSON Lines from objects (dicts are dumped; str/bytes rows are written verbatim)."""
    out = b""
    for r in rows:
        if isinstance(r, bytes):
            out += r + b"\n"
        elif isinstance(r, str):
            out += r.encode() + b"\n"
        else:
            out += json.dumps(r).encode() + b"\n"
    return out


def pair(**kw: object) -> dict:
    return {**GOOD_PAIR, **kw}


def parquet(table: pa.Table) -> Callable[[Path], None]:
    return lambda p: pq.write_table(table, p)


def truncated_parquet(p: Path) -> None:
    pq.write_table(pa.Table.from_pylist([GOOD_PAIR] * 50), p)
    p.write_bytes(p.read_bytes()[:-40])


def symlink_loop(p: Path) -> None:
    other = p.with_name("loop-b.jsonl")
    os.symlink(other, p)
    os.symlink(p, other)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    content: bytes | Callable[[Path], None]
    where: str | None  # "3" or "row 2" (a line or Parquet row); None for a file-level problem
    field: str | None
    problem: str | tuple[str, ...]  # the problem text, or alternatives
    suffix: str = ".jsonl"
    args: tuple[str, ...] = ()


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES = [
    # --- the file itself
    Case("empty-file", "pairs", b"", None, None, "no records"),
    Case("blank-lines-only", "pairs", b"\n  \n\t\n", None, None, "no records"),
    Case("bom-only", "pairs", b"\xef\xbb\xbf\n", None, None, "no records"),
    # A folder is read as a Hugging Face save_to_disk dataset when the curation module is present.
    Case("directory", "pairs", lambda p: p.mkdir(), None, None, ("is a directory", "not a Hugging Face save_to_disk folder")),
    Case("symlink-loop", "pairs", symlink_loop, None, None, "symbolic link loop"),
    Case("broken-symlink", "pairs", lambda p: os.symlink(p.with_name("gone.jsonl"), p), None, None, "broken"),
    Case("missing-file", "pairs", lambda p: None, None, None, "file not found"),
    Case("unreadable", "pairs", b"", None, None, "permission denied"),  # content set in the test
    Case("csv-suffix", "pairs", b"prompt,chosen,rejected\n", None, None, "unsupported file type '.csv'", ".csv"),
    Case("utf16", "pairs", json.dumps(GOOD_PAIR).encode("utf-16"), None, None, "UTF-16"),
    Case("gzip-named-jsonl", "pairs", gzip.compress(jl(GOOD_PAIR)), None, None, "gzip-compressed"),
    Case(
        "parquet-named-jsonl",
        "pairs",
        parquet(pa.Table.from_pylist([GOOD_PAIR])),
        None,
        None,
        "is a Parquet file; give it a .parquet suffix",
    ),
    Case("jsonl-named-parquet", "pairs", jl(GOOD_PAIR), None, None, "not a readable Parquet file", ".parquet"),
    Case("truncated-parquet", "pairs", truncated_parquet, None, None, "not a readable Parquet file", ".parquet"),
    Case(
        "huge-line",
        "pairs",
        jl(GOOD_PAIR, pair(chosen="x" * 5000)),
        "2",
        None,
        "over the 1,000-byte limit",
        args=("--max-line-bytes", "1000"),
    ),
    # --- lines that are not JSON objects
    Case("truncated-last-line", "pairs", jl(GOOD_PAIR, GOOD_PAIR) + b'{"prompt": "q", "cho', "3", None, "invalid JSON"),
    Case("invalid-utf8", "pairs", jl(GOOD_PAIR, '{"prompt": "caf\u00e9"}'.encode("latin-1")), "2", None, "UTF-8"),
    Case("bom-mid-file", "pairs", jl(GOOD_PAIR, b"\xef\xbb\xbf" + json.dumps(GOOD_PAIR).encode()), "2", None, "BOM"),
    Case("nul-byte", "pairs", jl(b'{"prompt": "q\x00", "chosen": "a", "rejected": "b"}'), "1", None, "invalid JSON"),
    Case("array-row", "pairs", jl([GOOD_PAIR, GOOD_PAIR]), "1", None, "one object per line"),
    Case("string-row", "pairs", jl(GOOD_PAIR, "just text"), "2", None, "invalid JSON"),
    Case("json-string-row", "pairs", jl(GOOD_PAIR, '"a string"'), "2", None, "expected a JSON object, got str"),
    Case("number-row", "pairs", jl(GOOD_PAIR, "42"), "2", None, "expected a JSON object, got int"),
    Case("null-row", "pairs", jl(GOOD_PAIR, "null"), "2", None, "expected a JSON object, got null"),
    Case("duplicate-key", "pairs", jl('{"prompt": "q", "chosen": "a", "chosen": "b", "rejected": "c"}'), "1", "chosen", "twice"),
    Case(
        "duplicate-nested-key",
        "pairs",
        jl('{"prompt": "q", "chosen": "a", "rejected": "c", "extra": {"k": 1, "k": 2}}'),
        "1",
        "k",
        "twice",
    ),
    Case("int-over-4300-digits", "pairs", jl('{"prompt": "q", "chosen": "a", "rejected": "b", "n": ' + "9" * 5000 + "}"), "1", None, "4300 digits"),
    Case("nested-100000-deep", "pairs", jl('{"x": ' + _nested(100_000) + "}"), "1", None, "nested too deeply"),
    Case("nested-100-deep", "pairs", jl(pair(extra=json.loads(_nested(100)))), "1", "extra", "nested more than 64"),
    # --- pairs: per-field problems
    Case("lone-surrogate", "pairs", jl('{"prompt": "q", "chosen": "a\\ud800b", "rejected": "c"}'), "1", "chosen", "lone surrogate"),
    Case("lone-surrogate-in-key", "pairs", jl('{"prompt": "q", "chosen": "a", "rejected": "c", "\\udc00": 1}'), "1", "\\udc00", "lone surrogate"),
    Case("weight-1e400-integer", "pairs", jl('{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 1' + "0" * 400 + "}"), "1", "weight", "too large for a float"),
    Case("weight-1e400-float", "pairs", jl('{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 1e400}'), "1", "weight", "not a finite number"),
    Case("weight-nan", "pairs", jl('{"prompt": "q", "chosen": "a", "rejected": "b", "weight": NaN}'), "1", "weight", "not a finite number"),
    Case("weight-infinity", "pairs", jl(GOOD_PAIR, '{"prompt": "q", "chosen": "a", "rejected": "b", "weight": -Infinity}'), "2", "weight", "not a finite number"),
    Case("weight-negative", "pairs", jl(pair(weight=-0.5)), "1", "weight", "≥ 0"),
    Case("weight-string", "pairs", jl(pair(weight="1.0")), "1", "weight", "got str"),
    Case("weight-bool", "pairs", jl(pair(weight=True)), "1", "weight", "got bool"),
    Case("nan-in-extra-field", "pairs", jl('{"prompt": "q", "chosen": "a", "rejected": "b", "score": NaN}'), "1", "score", "not a finite number"),
    Case("chosen-equals-rejected", "pairs", jl(GOOD_PAIR, pair(chosen="same", rejected="same")), "2", "rejected", "identical"),
    Case("chosen-equals-rejected-whitespace", "pairs", jl(pair(chosen="same", rejected=" same\n")), "1", "rejected", "identical"),
    Case("hh-identical", "pairs", jl({"chosen": HH + " ok", "rejected": HH + " ok"}), "1", "rejected", "identical"),
    Case("hh-no-assistant", "pairs", jl({"chosen": "Human: a", "rejected": "Human: b"}), "1", "chosen", "no '\\n\\nAssistant:' turn"),
    Case("missing-rejected", "pairs", jl(GOOD_PAIR, {"prompt": "q", "chosen": "a"}), "2", "rejected", "missing field"),
    Case("chosen-int", "pairs", jl(pair(chosen=3)), "1", "chosen", "must be a string, got int"),
    Case("prompt-list", "pairs", jl(pair(prompt=["q"])), "1", "prompt", "must be a string, got list"),
    Case("chosen-messages-list", "pairs", jl(pair(chosen=[{"role": "assistant", "content": "a"}])), "1", "chosen", "got list"),
    Case("id-list", "pairs", jl(pair(id=[1])), "1", "id", "string or an integer, got list"),
    Case("id-float", "pairs", jl(pair(id=1.5)), "1", "id", "got float"),
    Case("id-bool", "pairs", jl(pair(id=True)), "1", "id", "got bool"),
    Case("id-empty", "pairs", jl(pair(id="  ")), "1", "id", "is empty"),
    Case("duplicate-id", "pairs", jl(pair(id="a"), pair(id="b", prompt="q2"), pair(id="a", prompt="q3")), "3", "id", "(first at line 1)"),
    Case("crlf-missing-field", "pairs", jl(GOOD_PAIR).replace(b"\n", b"\r\n") + b'{"prompt": "q"}\r\n', "2", "chosen", "missing field"),
    # --- sft
    Case("sft-bad-role", "sft", jl({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "a"}]}), "1", "messages[0].role", "unknown role 'human'"),
    Case("sft-markup-role", "sft", jl({"messages": [{"role": "[/]", "content": "hi"}, {"role": "assistant", "content": "a"}]}), "1", "messages[0].role", "unknown role '[/]'"),
    Case("sft-not-ending-assistant", "sft", jl({"messages": [{"role": "user", "content": "hi"}]}), "1", "messages", "last message must be the assistant"),
    Case("sft-empty-messages", "sft", jl({"messages": []}), "1", "messages", "got an empty list"),
    Case("sft-messages-string", "sft", jl({"messages": "hi"}), "1", "messages", "got str"),
    Case("sft-message-no-content", "sft", jl({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}), "1", "messages[0]", "string 'role' and 'content'"),
    Case("sft-message-content-int", "sft", jl({"messages": [{"role": "assistant", "content": 5}]}), "1", "messages[0]", "string 'role' and 'content'"),
    Case("sft-empty-assistant", "sft", jl({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}), "1", "messages[1].content", "is empty"),
    Case("sft-messages-and-prompt", "sft", jl({**GOOD_SFT, "messages": [{"role": "assistant", "content": "a"}]}), "1", "prompt", "not both"),
    Case("sft-empty-completion", "sft", jl(GOOD_SFT, {"prompt": "Hi", "completion": ""}), "2", "completion", "is empty"),
    Case("sft-missing-completion", "sft", jl({"prompt": "Hi"}), "1", "completion", "missing field"),
    Case("sft-pairs-file", "sft", jl(GOOD_PAIR), "1", "completion", "missing field"),
    # --- rankings
    Case("ranking-bools", "rankings", jl({**GOOD_RANK, "completions": ["a", "b"], "ranking": [True, False]}), "1", "ranking[0]", "got bool"),
    Case("ranking-floats", "rankings", jl({**GOOD_RANK, "completions": ["a", "b"], "ranking": [1.0, 0.0]}), "1", "ranking[0]", "got float"),
    Case("ranking-duplicate-index", "rankings", jl({**GOOD_RANK, "ranking": [0, 0, 1]}), "1", "ranking", "index 0 appears twice"),
    Case("ranking-out-of-range", "rankings", jl({**GOOD_RANK, "ranking": [0, 1, 3]}), "1", "ranking", "index 3 is out of range"),
    Case("ranking-negative-index", "rankings", jl({**GOOD_RANK, "ranking": [0, 1, -1]}), "1", "ranking", "index -1 is out of range"),
    Case("ranking-too-short", "rankings", jl({**GOOD_RANK, "ranking": [0, 1]}), "1", "ranking", "2 indices for 3"),
    Case("ranking-string", "rankings", jl({**GOOD_RANK, "ranking": "0,1,2"}), "1", "ranking", "list of indices, got str"),
    Case("ranking-disagrees-with-scores", "rankings", jl({**GOOD_RANK, "ranking": [0, 1, 2], "scores": [0.1, 0.9, 0.5]}), "1", "ranking", "disagrees with 'scores'"),
    Case("scores-wrong-length", "rankings", jl({"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}), "1", "scores", "got 1 values"),
    Case("scores-nan", "rankings", jl('{"prompt": "p", "completions": ["a", "b"], "scores": [1.0, NaN]}'), "1", "scores[1]", "not a finite number"),
    Case("scores-bool", "rankings", jl({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, False]}), "1", "scores[1]", "got bool"),
    Case("completions-one", "rankings", jl({"prompt": "p", "completions": ["a"], "ranking": [0]}), "1", "completions", "got a list of 1"),
    Case("completions-non-string", "rankings", jl({"prompt": "p", "completions": ["a", 2], "ranking": [0, 1]}), "1", "completions", "got int at index 1"),
    Case("completions-duplicate", "rankings", jl({"prompt": "p", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}), "1", "completions[2]", "identical to completions[0]"),
    Case("rankings-no-order", "rankings", jl({"prompt": "p", "completions": ["a", "b"]}), "1", "ranking", "need 'ranking'"),
    # --- Parquet
    Case("parquet-wrong-type", "pairs", parquet(pa.table({"prompt": ["q"], "chosen": [1], "rejected": ["b"]})), "row 1", "chosen", "got int", ".parquet"),
    Case("parquet-missing-column", "pairs", parquet(pa.table({"prompt": ["q", "r"], "chosen": ["a", "b"]})), "row 1", "rejected", "missing field", ".parquet"),
    Case("parquet-nan-weight", "pairs", parquet(pa.table({"prompt": ["q"], "chosen": ["a"], "rejected": ["b"], "weight": [float("nan")]})), "row 1", "weight", "not a finite number", ".parquet"),
    Case("parquet-float-ranking", "rankings", parquet(pa.table({"prompt": ["p"], "completions": [["a", "b"]], "ranking": [[1.0, 0.0]]})), "row 1", "ranking[0]", "got float", ".parquet"),
    Case("parquet-duplicate-column", "pairs", parquet(pa.Table.from_arrays([pa.array(["q"]), pa.array(["a"]), pa.array(["b"]), pa.array(["c"])], names=["prompt", "chosen", "rejected", "chosen"])), None, None, "column 'chosen' appears more than once", ".parquet"),
    Case("parquet-zero-rows", "pairs", parquet(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())]))), None, None, "no records", ".parquet"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_file_is_a_clean_error(
    case: Case,
    tmp_path: Path,
    sqlite_workspace,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    path = tmp_path / f"{case.id}{case.suffix}"
    if callable(case.content):
        case.content(path)
    else:
        path.write_bytes(case.content)
    if case.id == "unreadable":
        path.write_bytes(jl(GOOD_PAIR))
        path.chmod(0)
        if os.geteuid() == 0:  # root reads any file; answer as the kernel would for anyone else
            monkeypatch.setattr(
                "alignflow.data.formats.os.access", lambda p, mode: os.stat(p).st_mode & 0o444 != 0
            )

    monkeypatch.setattr(
        sys, "argv", ["alignflow", "data", "import", str(path), "--kind", case.kind, *case.args]
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    expected = f"{path}:{case.where}:" if case.where else f"{path}: "
    if case.field:
        expected += f" field '{case.field}':"
    assert expected in err, err
    line = next(ln for ln in err.splitlines() if expected in ln)
    problems = case.problem if isinstance(case.problem, tuple) else (case.problem,)
    assert any(p in line[line.index(expected) + len(expected) :] for p in problems), err

    store = Store.open(sqlite_workspace)
    try:
        assert store.find() == []
        assert list(sqlite_workspace.tmp_dir.iterdir()) == []
        assert [p for p in sqlite_workspace.artifact_root.rglob("*") if p.is_file()] == []
    finally:
        store.close()


def test_the_corpus_covers_every_kind_and_enough_files() -> None:
    assert len(CASES) >= 40
    assert {c.kind for c in CASES} >= {"sft", "pairs", "rankings"}
    assert len({c.id for c in CASES}) == len(CASES)


def test_strictness_keeps_good_files_importable(tmp_path: Path, sqlite_workspace) -> None:
    # The checks above must not reject what is valid: CRLF, a leading BOM, integer weights, ties in
    # scores, an integer id, empty replies in a prompt-style pair, NUL escaped inside a string.
    path = tmp_path / "good.jsonl"
    rows = [
        pair(id=7, weight=2),
        pair(prompt="q2", chosen="", rejected="no"),
        pair(prompt="q3", chosen="a\u0000b"),
    ]
    path.write_bytes(b"\xef\xbb\xbf" + jl(*rows).replace(b"\n", b"\r\n"))
    store = Store.open(sqlite_workspace)
    from alignflow.data.io import import_dataset

    got = store.read_dataset(import_dataset(store, path, "pairs")).to_pylist()
    assert (
        [r["id"] for r in got] == ["7", "1", "2"] and got[0]["weight"] == 2.0 and got[2]["chosen"] == "a\x00b"
    )
    ranks = tmp_path / "ranks.jsonl"
    ranks.write_bytes(
        jl({"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 1, 0], "ranking": [1, 0, 2]})
    )
    row = store.read_dataset(import_dataset(store, ranks, "rankings")).to_pylist()[0]
    assert row["ranking"] == [1, 0, 2] and row["scores"] == [1.0, 1.0, 0.0]
    store.close()


def test_former_tracebacks_in_a_separate_process(tmp_path: Path, sqlite_workspace) -> None:
    # The two inputs that used to end in a Python traceback (exit 1), through the real entry point;
    # both are record errors, so one run reports both.
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"prompt": "q", "chosen": "a\\ud800", "rejected": "b"}\n'
        '{"prompt": "q", "chosen": "a", "rejected": "b", "weight": 1' + "0" * 400 + "}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "alignflow.cli.main", "data", "import", str(path), "--kind", "pairs"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "2 invalid pairs record(s)" in proc.stderr
    assert f"{path}:1: field 'chosen': contains a lone surrogate" in proc.stderr
    assert (
        f"{path}:2: field 'weight': field 'weight' must be a finite number ≥ 0, got an integer too large"
        in proc.stderr
    )
