"""Dataset formats with TRL-compatible column names, and the strict file readers behind `data import`.

Normalised rows by kind (every row also has `id` and `meta`, a JSON object of extra fields):

| kind       | accepted input columns                                   | stored columns                          |
|------------|----------------------------------------------------------|-----------------------------------------|
| `sft`      | `prompt` + `completion`, or `messages` [{role, content}] | prompt, completion, messages            |
| `pairs`    | `prompt` + `chosen` + `rejected`; or HH-style `chosen`/`rejected` transcripts sharing the text up to the last `\\n\\nAssistant:`; optional `labels` | prompt, chosen, rejected, weight |
| `rankings` | `prompt` + `completions` + (`ranking` best-first indices, or `scores`, higher is better) | prompt, completions, ranking, scores |
| `prompts`  | TRL's prompt-only format: `prompt` (text, or a conversation [{role, content}] ending with the user's turn), or `messages` ending with the user's turn; MT-bench's `turns` (the first turn is the prompt) | prompt, messages |

A `pairs` row may carry per-dimension labels, `labels`: an object mapping a dimension name (letters, digits,
`_` or `-`; not `overall`, which is the pair's own preference) to P(chosen is better on that dimension) in
[0, 1]: 1 chosen better, 0 rejected better, 0.5 a tie, anything between a soft label. A dimension left out
is unlabelled for that pair. `labels` is validated and kept in `meta` (``meta["labels"]``); multi-head reward
models (`alignflow rm` with `heads:`) train one head per dimension on it. Pairs without it train as before.

A `prompts` row keeps other columns in `meta` (an SFT file imported as prompts keeps its completions there, and
an MT-bench row its `question_id`, `category` and `turns`); its `id` defaults to MT-bench's `question_id`.

A file is validated completely before anything is stored: an error names the file, the line
(or Parquet row) and the field, and nothing is written. Strict JSON: duplicate keys, NaN/Infinity,
lone surrogates and numbers too large for a float are errors, not silently resolved or coerced;
indices must be integers (not `true` or `1.0`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignflow.errors import DataFormatError

KINDS = ("sft", "pairs", "rankings", "prompts")
DEFAULT_MAX_LINE_BYTES = 4 * 1024 * 1024
HH_ASSISTANT = "\n\nAssistant:"
_MAX_REPORTED = 10
_MAX_DEPTH = 64  # nesting deeper than this is not a dataset row (and would strain json.dumps later)
# File signatures that explain an undecodable "JSONL" file better than "invalid UTF-8 at byte 0".
_SIGNATURES = (
    (b"PAR1", "is a Parquet file; give it a .parquet suffix"),
    (b"\x1f\x8b", "is gzip-compressed; decompress it first"),
    (b"\xff\xfe", "is UTF-16 encoded; re-encode it as UTF-8"),
    (b"\xfe\xff", "is UTF-16 encoded; re-encode it as UTF-8"),
)

_FIELDS = {
    "sft": {"id", "prompt", "completion", "messages"},
    "pairs": {"id", "prompt", "chosen", "rejected", "weight"},
    "rankings": {"id", "prompt", "completions", "ranking", "scores"},
    "prompts": {"id", "prompt", "messages"},
}

SCHEMAS = {
    "sft": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("completion", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("meta", pa.string()),
        ]
    ),
    "pairs": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("weight", pa.float64()),
            ("meta", pa.string()),
        ]
    ),
    "rankings": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("completions", pa.list_(pa.string())),
            ("ranking", pa.list_(pa.int64())),
            ("scores", pa.list_(pa.float64())),
            ("meta", pa.string()),
        ]
    ),
    "prompts": pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.string()),
            ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("meta", pa.string()),
        ]
    ),
}


class _RowError(Exception):
    def __init__(self, field: str | None, msg: str) -> None:
        super().__init__(msg)
        self.field = field
        self.msg = msg


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _show(value: Any, limit: int = 40) -> str:
    """A short repr for messages: a 4,000-digit integer or a 1 MB string is not worth echoing."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_readable(path: Path) -> os.stat_result:
    """Stat `path` and say precisely why it cannot be read (a directory is not "file not found")."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataFormatError(
                f"{path}: broken symbolic link (it points to {os.readlink(path)!r}, which does not exist)"
            ) from None
        raise DataFormatError(f"{path}: file not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataFormatError(f"{path}: symbolic link loop (the link never reaches a file)") from None
        if exc.errno == errno.EACCES:
            raise DataFormatError(f"{path}: permission denied (a parent folder is not searchable)") from None
        raise DataFormatError(f"{path}: cannot read: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataFormatError(f"{path}: is a directory; expected a .jsonl or .parquet file")
    if not stat.S_ISREG(st.st_mode):
        raise DataFormatError(f"{path}: not a regular file (a pipe, socket or device); expected a file")
    if not os.access(path, os.R_OK):
        raise DataFormatError(f"{path}: permission denied (the file is not readable by this user)")
    return st


def _parse_line(line: str) -> Any:
    """json.loads, strict: duplicate keys raise _DuplicateKey; NaN/Infinity stay floats for _scan."""
    return json.loads(line, object_pairs_hook=_no_duplicate_keys)


def iter_records(path: Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) from a JSONL or Parquet file; location is `line N` or `row N`.

    Malformed lines raise DataFormatError naming `file:line`.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
            dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
            if dup is None:
                table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataFormatError(f"{path}: not a readable Parquet file: {exc}") from None
        if dup is not None:  # to_pylist would keep the last silently (read_table refuses some cases)
            raise DataFormatError(f"{path}: column {dup!r} appears more than once in the Parquet schema")
        for i, rec in enumerate(table.to_pylist(), start=1):
            yield f"row {i}", rec
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; expected .jsonl or .parquet")
    try:
        f = open(path, "rb")
    except PermissionError:
        raise DataFormatError(f"{path}: permission denied (the file is not readable by this user)") from None
    except OSError as exc:
        raise DataFormatError(f"{path}: cannot read: {exc.strerror}") from None
    with f:
        head = f.read(4)
        for magic, problem in _SIGNATURES:
            if head.startswith(magic):
                raise DataFormatError(f"{path}: not JSON Lines: the file {problem}")
        f.seek(0)
        lineno = 0
        while True:
            try:
                # At most one byte past the limit: a 10 GB line is measured, never held in memory.
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    return
                lineno += 1
                if len(raw) > max_line_bytes:
                    size = len(raw)
                    while not raw.endswith(b"\n") and (raw := f.readline(1 << 20)):
                        size += len(raw)
                    raise DataFormatError(
                        f"{path}:{lineno}: line is {size:,} bytes, over the {max_line_bytes:,}-byte limit "
                        "(raise it with --max-line-bytes if this is intended)"
                    )
            except OSError as exc:
                raise DataFormatError(f"{path}:{lineno + 1}: read error: {exc.strerror}") from None
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: not valid UTF-8 at byte {exc.start} (re-encode the file as UTF-8)"
                ) from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                rec = _parse_line(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}"
                ) from None
            except _DuplicateKey as exc:
                raise DataFormatError(
                    f"{path}:{lineno}: field {exc.key!r}: the key appears twice in one JSON object"
                ) from None
            except RecursionError:
                raise DataFormatError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None
            except ValueError as exc:  # e.g. an integer of more than 4,300 digits
                raise DataFormatError(f"{path}:{lineno}: invalid JSON: {exc}") from None
            yield f"line {lineno}", rec


def _scan(rec: dict[str, Any]) -> None:
    """Reject what JSON cannot carry faithfully, anywhere in a record, naming the field path.

    Lone surrogates (`"\\ud800"`) are not Unicode text: they fail later when hashed or written.
    NaN/Infinity (and 1e400, which parses as inf) are not JSON numbers.
    """
    for key in rec:
        _check_text(key, key)
    stack: list[tuple[str, Any, int]] = [(k, v, 1) for k, v in rec.items()]
    while stack:
        where, value, depth = stack.pop()
        if depth > _MAX_DEPTH:
            top = where.split(".", 1)[0].split("[", 1)[0]
            raise _RowError(top, f"nested more than {_MAX_DEPTH} levels deep")
        if isinstance(value, str):
            _check_text(where, value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise _RowError(where, f"{value} is not a finite number (NaN and Infinity are not JSON numbers)")
        elif isinstance(value, dict):
            for k, v in value.items():
                _check_text(f"{where}.{k}", k)
                stack.append((f"{where}.{k}", v, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value))


def _check_text(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise _RowError(
            where.encode("utf-8", "backslashreplace").decode(),
            f"contains a lone surrogate (\\u{ord(bad):04x} at character {exc.start}), which is not valid "
            "Unicode; write the character itself or a proper surrogate pair",
        ) from None


def _text(rec: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise _RowError(key, f"missing field '{key}'")
    val = rec[key]
    if not isinstance(val, str):
        raise _RowError(key, f"field '{key}' must be a string, got {_type_name(val)}")
    if not allow_empty and not val.strip():
        raise _RowError(key, f"field '{key}' is empty")
    return val


def _number(val: Any, field: str, what: str) -> float:
    """A JSON number as a finite float; bools, strings and ints beyond float range are errors."""
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise _RowError(field, f"{what}, got {_type_name(val)} {_show(val)}")
    try:
        out = float(val)
    except OverflowError:
        raise _RowError(
            field, f"{what}, got an integer too large for a float ({len(str(val))} digits)"
        ) from None
    if not math.isfinite(out):
        raise _RowError(field, f"{what}, got {_show(val)}")
    return out


def _record_id(rec: dict[str, Any], default_id: str) -> str:
    rid = rec.get("id")
    if rid is None:
        return default_id
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise _RowError(
            "id", f"field 'id' must be a string or an integer, got {_type_name(rid)} {_show(rid)}"
        )
    if isinstance(rid, str) and not rid.strip():
        raise _RowError("id", "field 'id' is empty")
    return str(rid)


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-RLHF transcripts into (prompt, chosen reply, rejected reply).

    The prompt is the longest common prefix of the two transcripts that ends with
    `\\n\\nAssistant:` (as TRL's `extract_prompt`): cutting at the last such marker of `chosen`
    alone fails on replies that themselves contain a marker. Replies may be empty (HH has such pairs).
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    while cut >= 0 and cut + len(HH_ASSISTANT) > n:
        cut = chosen.rfind(HH_ASSISTANT, 0, cut)
    if cut < 0:
        raise _RowError("chosen", "HH-style transcripts share no '\\n\\nAssistant:' turn")
    prompt = chosen[: cut + len(HH_ASSISTANT)]
    return prompt, chosen[len(prompt) :].strip(), rejected[len(prompt) :].strip()


def _messages(val: Any, field: str = "messages", last: str = "assistant") -> list[dict[str, str]]:
    """A conversation whose last turn is `last`'s: the assistant's for SFT (the completion to learn), the
    user's for a prompt (the policy writes the reply)."""
    if not isinstance(val, list) or not val:
        got = "an empty list" if val == [] else _type_name(val)
        raise _RowError(field, f"field '{field}' must be a non-empty list of {{role, content}}, got {got}")
    out = []
    for i, m in enumerate(val):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise _RowError(f"{field}[{i}]", "each message needs string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise _RowError(f"{field}[{i}].role", f"unknown role {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != last:
        why = "the completion to learn" if last == "assistant" else "a prompt the policy answers"
        raise _RowError(field, f"the last message must be the {last}'s ({why}), got {out[-1]['role']!r}")
    if not out[-1]["content"].strip():
        raise _RowError(f"{field}[{len(out) - 1}].content", f"the last ({last}) message is empty")
    return out


def _meta(rec: dict[str, Any], kind: str) -> str:
    extra = {k: v for k, v in rec.items() if k not in _FIELDS[kind]}
    return json.dumps(extra, sort_keys=True, ensure_ascii=False, default=str)


def normalize_record(kind: str, rec: Any, default_id: str) -> dict[str, Any]:
    """One input record -> one normalised row of `kind` (raises _RowError)."""
    if kind not in KINDS:
        raise DataFormatError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not isinstance(rec, dict):
        hint = " (JSON Lines means one object per line, not one array)" if isinstance(rec, list) else ""
        raise _RowError(None, f"expected a JSON object, got {_type_name(rec)}{hint}")
    _scan(rec)
    if kind == "prompts" and rec.get("id") is None and rec.get("question_id") is not None:
        try:  # MT-bench's id, held to the rules of an id
            default_id = _record_id({"id": rec["question_id"]}, default_id)
        except _RowError as exc:
            raise _RowError("question_id", exc.msg.replace("'id'", "'question_id'")) from None
    row: dict[str, Any] = {"id": _record_id(rec, default_id)}
    if kind == "sft":
        row.update(_sft(rec))
    elif kind == "pairs":
        row.update(_pair(rec))
    elif kind == "prompts":
        row.update(_prompt_only(rec))
    else:
        row.update(_ranking(rec))
    row["meta"] = _meta(rec, kind)
    return row


def _sft(rec: dict[str, Any]) -> dict[str, Any]:
    if rec.get("messages") is not None:
        both = [k for k in ("prompt", "completion") if rec.get(k) is not None]
        if both:
            # Either would be dropped silently: the stored row keeps only one form.
            raise _RowError(
                both[0], f"give either 'messages' or prompt/completion, not both ('{both[0]}' is set)"
            )
        return {"prompt": None, "completion": None, "messages": _messages(rec["messages"])}
    return {
        "prompt": _text(rec, "prompt", allow_empty=True),
        "completion": _text(rec, "completion"),
        "messages": None,
    }


def _prompt_only(rec: dict[str, Any]) -> dict[str, Any]:
    """TRL's prompt-only row: plain `prompt` text, or a conversation (in `prompt` or `messages`) ending with
    the user's turn; else MT-bench's `turns`, whose first turn is the prompt (the later ones follow the
    model's first answer, so they cannot be asked up front)."""
    given = [k for k in ("prompt", "messages") if rec.get(k) is not None]
    if len(given) == 2:
        raise _RowError("messages", "give either 'prompt' or 'messages', not both ('prompt' is set)")
    if given == ["messages"]:
        return {"prompt": None, "messages": _messages(rec["messages"], last="user")}
    if given == ["prompt"] and isinstance(rec["prompt"], list):  # TRL's conversational prompt-only form
        return {"prompt": None, "messages": _messages(rec["prompt"], field="prompt", last="user")}
    if not given and rec.get("turns") is not None:
        turns = rec["turns"]
        if not isinstance(turns, list) or not turns:
            got = "an empty list" if turns == [] else _type_name(turns)
            raise _RowError(
                "turns", f"field 'turns' must be a non-empty list of strings (MT-bench), got {got}"
            )
        bad = next((i for i, t in enumerate(turns) if not isinstance(t, str)), None)
        if bad is not None:
            raise _RowError(f"turns[{bad}]", f"must be a string, got {_type_name(turns[bad])}")
        if not turns[0].strip():
            raise _RowError("turns[0]", "the first turn (the prompt) is empty")
        return {"prompt": None, "messages": [{"role": "user", "content": turns[0]}]}
    if not given:
        raise _RowError("prompt", "missing field 'prompt' (or 'messages' ending with the user's turn)")
    return {"prompt": _text(rec, "prompt"), "messages": None}


def _pair(rec: dict[str, Any]) -> dict[str, Any]:
    chosen, rejected = _text(rec, "chosen", allow_empty=True), _text(rec, "rejected", allow_empty=True)
    if rec.get("prompt") is None:
        prompt, chosen, rejected = split_hh(chosen, rejected)
    else:
        prompt = _text(rec, "prompt", allow_empty=True)
    # A pair whose replies do not differ carries no preference (and gives the DPO loss log 2 for nothing).
    if chosen.strip() == rejected.strip():
        raise _RowError("rejected", "chosen and rejected replies are identical")
    what = "field 'weight' must be a finite number ≥ 0"
    weight = _number(rec.get("weight", 1.0), "weight", what)
    if weight < 0:
        raise _RowError("weight", f"{what}, got {_show(rec['weight'])}")
    if rec.get("labels") is not None:
        _dimension_labels(rec["labels"])
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "weight": weight}


def _dimension_labels(labels: Any) -> None:
    """Check a pair's `labels`: {dimension: P(chosen better on it) in [0, 1]}."""
    if not isinstance(labels, dict):
        raise _RowError(
            "labels", f"field 'labels' must be an object {{dimension: number}}, got {_type_name(labels)}"
        )
    for name, value in labels.items():
        if not name or not all(ch.isalnum() or ch in "_-" for ch in name) or len(name) > 64:
            raise _RowError(
                "labels", f"dimension name {_show(name)} must be 1-64 letters, digits, '_' or '-'"
            )
        if name == "overall":
            raise _RowError("labels.overall", "'overall' is the pair's own preference (chosen over rejected)")
        what = f"field 'labels.{name}' must be P(chosen better) in [0, 1]"
        v = _number(value, f"labels.{name}", what)
        if not 0.0 <= v <= 1.0:
            raise _RowError(f"labels.{name}", f"{what}, got {_show(value)}")


def _ranking(rec: dict[str, Any]) -> dict[str, Any]:
    prompt = _text(rec, "prompt", allow_empty=True)
    comps = rec.get("completions")
    if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
        got = _type_name(comps) if not isinstance(comps, list) else f"a list of {len(comps)}"
        if isinstance(comps, list) and len(comps) >= 2:
            bad = next(i for i, c in enumerate(comps) if not isinstance(c, str))
            got = f"{_type_name(comps[bad])} at index {bad}"
        raise _RowError("completions", f"field 'completions' must be a list of at least 2 strings, got {got}")
    first: dict[str, int] = {}
    for i, c in enumerate(comps):
        if c in first:
            raise _RowError(
                f"completions[{i}]",
                f"identical to completions[{first[c]}]; a ranking needs distinct candidates",
            )
        first[c] = i
    n = len(comps)
    scores, ranking = rec.get("scores"), rec.get("ranking")
    if ranking is None and scores is None:
        raise _RowError("ranking", "need 'ranking' (best-first indices) or 'scores' (higher is better)")
    if scores is not None:
        if not isinstance(scores, list) or len(scores) != n:
            got = f"{len(scores)} values" if isinstance(scores, list) else _type_name(scores)
            raise _RowError(
                "scores", f"field 'scores' must be {n} finite numbers (one per completion), got {got}"
            )
        scores = [_number(x, f"scores[{i}]", "must be a finite number") for i, x in enumerate(scores)]
    if ranking is None:
        ranking = sorted(range(n), key=lambda i: -scores[i])  # type: ignore[index]
    else:
        if not isinstance(ranking, list):
            raise _RowError(
                "ranking", f"field 'ranking' must be a list of indices, got {_type_name(ranking)}"
            )
        for i, x in enumerate(ranking):
            # bool is an int subclass and 1.0 == 1: both would be coerced silently without this check.
            if isinstance(x, bool) or not isinstance(x, int):
                raise _RowError(f"ranking[{i}]", f"must be an integer index, got {_type_name(x)} {_show(x)}")
        if sorted(ranking) != list(range(n)):
            out = [x for x in ranking if not 0 <= x < n]
            dup = [x for i, x in enumerate(ranking) if x in ranking[:i]]
            why = (
                f"index {out[0]} is out of range"
                if out
                else f"index {dup[0]} appears twice"
                if dup
                else f"it has {len(ranking)} indices for {n} completions"
            )
            raise _RowError("ranking", f"field 'ranking' must be a permutation of 0..{n - 1}: {why}")
        if scores is not None:
            worse = next((k for k in range(n - 1) if scores[ranking[k]] < scores[ranking[k + 1]]), None)
            if worse is not None:
                a, b = ranking[worse], ranking[worse + 1]
                raise _RowError(
                    "ranking",
                    f"disagrees with 'scores': completion {a} is ranked above {b} but scores lower "
                    f"({scores[a]} < {scores[b]})",
                )
    return {"prompt": prompt, "completions": comps, "ranking": list(ranking), "scores": scores}


def load_dataset_file(
    path: str | Path, kind: str, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> tuple[pa.Table, dict[str, int]]:
    """Read and validate a whole file into a normalised Arrow table. Returns (table, stats).

    Every failure is a DataFormatError naming the file (and the line and field when there is one).
    """
    p = Path(path)
    if kind not in KINDS:
        raise DataFormatError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    if max_line_bytes < 1:
        raise DataFormatError(f"max_line_bytes must be at least 1, got {max_line_bytes}")
    _check_readable(p)
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    errors: list[str] = []
    n_errors = 0
    for idx, (where, rec) in enumerate(iter_records(p, max_line_bytes)):
        loc = where.removeprefix("line ")
        try:
            rows.append(normalize_record(kind, rec, default_id=str(idx)))
            lines.append(where)
        except _RowError as exc:
            n_errors += 1
            if len(errors) < _MAX_REPORTED:
                field = f" field '{exc.field}':" if exc.field else ""
                errors.append(f"{p}:{loc}:{field} {exc.msg}")
    if n_errors:
        more = f"\n  ... and {n_errors - len(errors)} more" if n_errors > len(errors) else ""
        raise DataFormatError(
            f"{p}: {n_errors} invalid {kind} record(s), nothing imported:\n  " + "\n  ".join(errors) + more
        )
    if not rows:
        raise DataFormatError(f"{p}: no records (the file is empty)")
    first: dict[str, str] = {}
    for row, where in zip(rows, lines, strict=True):
        if row["id"] in first:
            raise DataFormatError(
                f"{p}:{where.removeprefix('line ')}: field 'id': duplicate record id {_show(row['id'])} "
                f"(first at {first[row['id']]}); ids must be unique within a dataset"
            )
        first[row["id"]] = where
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind])
    return table, {"rows": len(rows)}
