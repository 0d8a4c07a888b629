"""Rules that drop rows; `alignflow data filter ID --rule ...` applies them in order and reports each one's drops.

A rule is `TYPE:key=value,key=value` (a `pattern=` key takes the rest of the rule verbatim, commas included):

| rule | keys | drops a row when |
|---|---|---|
| `length` | `field` (default `row`), `min`, `max`, `unit` = chars, words or tokens (needs a tokenizer) | its length is outside [min, max] |
| `language` | `field` (default `prompt`), `allow` or `deny` = codes joined by `\\|` (ISO 639-1, e.g. `en\\|de`) | lingua's language is not allowed / denied |
| `regex` | `field` (default `row`), `action` = drop (default) or keep, `pattern` | the pattern is found (drop) / not found (keep) |
| `pii` | `field` (default `row`), `types` = `\\|`-joined of email, phone, ip, credit_card, ssn (default all) | a PII pattern is found |
| `score` | one of `field` (a numeric column or `meta.KEY`), `model` (a reward-model folder) or `fn` (`module:function(prompts, responses) -> scores`, e.g. a judge; the caller resolves it, as the CLI does); `min`, `max`; `on` = chosen (default), rejected or margin for pairs | the score is outside [min, max] |
| `agreement` | `field` (a `meta.KEY` holding the agreement in [0, 1]) or `labels` (`\\|`-joined `meta.KEY`s of annotator labels); `min` | agreement with the majority label is below `min` |

Field names: any column, `prompt`, `response` (completion / chosen + rejected / completions), `row`, or `meta.KEY`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignflow.data.curation.common import (
    CurationError,
    Progress,
    field_text,
    load,
    prompt_text,
    response_text,
    row_meta,
    save_version,
)
from alignflow.store import Store

PII_PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "phone": re.compile(r"(?<!\d)(?:\+?\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\d)"),
    "ip": re.compile(r"(?<!\d)(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\d)"),
    "credit_card": re.compile(r"(?<!\d)(?:\d[ -]?){13,16}(?!\d)"),
    "ssn": re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)"),
}
_KEYS = {
    "length": {"field", "min", "max", "unit"},
    "language": {"field", "allow", "deny"},
    "regex": {"field", "action", "pattern"},
    "pii": {"field", "types"},
    "score": {"field", "model", "fn", "min", "max", "on"},
    "agreement": {"field", "labels", "min"},
}


@dataclass(frozen=True)
class Rule:
    text: str
    type: str
    args: dict[str, str]


def parse_rule(text: str) -> Rule:
    """`TYPE:key=value,...` -> Rule; any mistake is a CurationError naming `--rule` and the rule."""
    where = f"--rule {text!r}"
    rtype, sep, body = text.partition(":")
    rtype = rtype.strip()
    if rtype not in _KEYS:
        raise CurationError(f"{where}: unknown rule type {rtype!r}; expected one of {', '.join(_KEYS)}")
    args: dict[str, str] = {}
    rest = body if sep else ""
    while rest:
        key, eq, value = rest.partition("=")
        key = key.strip()
        if not eq or not key:
            raise CurationError(f"{where}: expected key=value, got {rest!r}")
        if key == "pattern":  # a regex may contain commas: it takes the rest of the rule
            args[key], rest = value, ""
        else:
            value, _, rest = value.partition(",")
            args[key] = value.strip()
        if key not in _KEYS[rtype]:
            raise CurationError(
                f"{where}: unknown key {key!r} for a {rtype} rule; expected {', '.join(sorted(_KEYS[rtype]))}"
            )
    rule = Rule(text, rtype, args)
    _validate(rule)
    return rule


def _number(rule: Rule, key: str) -> float | None:
    if key not in rule.args:
        return None
    try:
        return float(rule.args[key])
    except ValueError:
        raise CurationError(f"--rule {rule.text!r}: {key} must be a number, got {rule.args[key]!r}") from None


def _validate(rule: Rule) -> None:
    where = f"--rule {rule.text!r}"
    a = rule.args
    lo, hi = _number(rule, "min"), _number(rule, "max")
    if lo is not None and hi is not None and lo > hi:
        raise CurationError(f"{where}: min {lo} is above max {hi}")
    if rule.type == "length":
        if lo is None and hi is None:
            raise CurationError(f"{where}: give min and/or max")
        if a.get("unit", "chars") not in ("chars", "words", "tokens"):
            raise CurationError(f"{where}: unit must be chars, words or tokens, got {a['unit']!r}")
    elif rule.type == "language":
        from alignflow.data.curation.lang import known_language

        if ("allow" in a) == ("deny" in a):
            raise CurationError(f"{where}: give exactly one of allow= or deny=")
        for code in (a.get("allow") or a.get("deny") or "").split("|"):
            if not known_language(code):
                raise CurationError(f"{where}: {code!r} is not an ISO 639-1 language code lingua knows")
    elif rule.type == "regex":
        if not a.get("pattern"):
            raise CurationError(f"{where}: give pattern=REGEX (last)")
        if a.get("action", "drop") not in ("drop", "keep"):
            raise CurationError(f"{where}: action must be drop or keep, got {a['action']!r}")
        try:
            re.compile(a["pattern"])
        except re.error as exc:
            raise CurationError(f"{where}: invalid regex: {exc}") from None
    elif rule.type == "pii":
        for t in a.get("types", "|".join(PII_PATTERNS)).split("|"):
            if t not in PII_PATTERNS:
                raise CurationError(f"{where}: unknown PII type {t!r}; expected {', '.join(PII_PATTERNS)}")
    elif rule.type == "score":
        sources = [k for k in ("field", "model", "fn") if k in a]
        if len(sources) != 1:
            raise CurationError(f"{where}: give exactly one of field=, model= or fn=")
        if lo is None and hi is None:
            raise CurationError(f"{where}: give min and/or max")
        if a.get("on", "chosen") not in ("chosen", "rejected", "margin"):
            raise CurationError(f"{where}: on must be chosen, rejected or margin, got {a['on']!r}")
    elif rule.type == "agreement":
        if ("field" in a) == ("labels" in a):
            raise CurationError(f"{where}: give exactly one of field= or labels=")
        if lo is None or not 0.0 <= lo <= 1.0:
            raise CurationError(f"{where}: min must be a number in [0, 1]")


def _in_range(x: float | None, lo: float | None, hi: float | None) -> bool:
    if x is None:
        return False
    return (lo is None or x >= lo) and (hi is None or x <= hi)


def _as_float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _field_number(row: Mapping[str, Any], field: str) -> float | None:
    if field.startswith("meta."):
        return _as_float(row_meta(row).get(field[5:]))
    return _as_float(row.get(field))


Scorer = Callable[[list[str], list[str]], Sequence[float]]
"""`(prompts, responses) -> scores`: a reward model or a judge."""


def reward_model_scorer(rule: Rule) -> Scorer:
    """The scorer of a `model=` rule: the reward model(s) in that folder (their mean score)."""
    from alignflow.models.reward import load_reward_scorer

    scorer = load_reward_scorer(rule.args["model"])
    return lambda prompts, responses: scorer(prompts, responses)[0].tolist()


def _model_scores(
    rule: Rule, rows: Sequence[Mapping[str, Any]], scorer_for: Callable[[Rule], Scorer]
) -> list[float]:
    """Scores of each row from the rule's scorer; for pairs `on` picks chosen, rejected or their margin."""
    score = scorer_for(rule)
    prompts = [prompt_text(r) for r in rows]

    def run(responses: list[str]) -> list[float]:
        values = [float(v) for v in score(prompts, responses)]
        if len(values) != len(responses):
            raise CurationError(
                f"--rule {rule.text!r}: the scorer returned {len(values)} scores for {len(responses)} rows"
            )
        return values

    on = rule.args.get("on", "chosen")
    if rows and "chosen" in rows[0]:
        chosen = run([r["chosen"] or "" for r in rows])
        if on == "chosen":
            return chosen
        rejected = run([r["rejected"] or "" for r in rows])
        return rejected if on == "rejected" else [c - r for c, r in zip(chosen, rejected, strict=True)]
    return run([response_text(r) for r in rows])


def _agreement(row: Mapping[str, Any], keys: list[str]) -> float | None:
    meta = row_meta(row)
    labels = [meta.get(k[5:] if k.startswith("meta.") else k) for k in keys]
    labels = [x for x in labels if x is not None]
    if not labels:
        return None
    return Counter(labels).most_common(1)[0][1] / len(labels)


def _no_fn(rule: Rule) -> Scorer:
    if "model" in rule.args:
        return reward_model_scorer(rule)
    raise CurationError(
        f"--rule {rule.text!r}: fn= scorers are resolved by the caller (the CLI imports them)"
    )


def rule_mask(
    rule: Rule,
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any = None,
    scorer_for: Callable[[Rule], Scorer] = _no_fn,
) -> list[bool]:
    """True for each row the rule keeps. `scorer_for(rule)` gives a score rule's model or `fn=` scorer."""
    a = rule.args
    lo, hi = _number(rule, "min"), _number(rule, "max")
    if rule.type == "length":
        texts = [field_text(r, a.get("field", "row")) for r in rows]
        unit = a.get("unit", "chars")
        if unit == "tokens":
            if tokenizer is None:
                raise CurationError(f"--rule {rule.text!r}: unit=tokens needs --tokenizer")
            lengths = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        else:
            lengths = [len(t) if unit == "chars" else len(t.split()) for t in texts]
        return [_in_range(n, lo, hi) for n in lengths]
    if rule.type == "language":
        from alignflow.data.curation.lang import detect_languages

        codes = (a.get("allow") or a.get("deny") or "").split("|")
        langs = detect_languages([field_text(r, a.get("field", "prompt")) for r in rows], extra=codes)
        if "allow" in a:
            allowed = set(a["allow"].split("|"))
            return [x in allowed for x in langs]
        denied = set(a["deny"].split("|"))
        return [x not in denied for x in langs]
    if rule.type == "regex":
        pat = re.compile(a["pattern"])
        found = [pat.search(field_text(r, a.get("field", "row"))) is not None for r in rows]
        return [not f for f in found] if a.get("action", "drop") == "drop" else found
    if rule.type == "pii":
        pats = [PII_PATTERNS[t] for t in a.get("types", "|".join(PII_PATTERNS)).split("|")]
        return [not any(p.search(field_text(r, a.get("field", "row"))) for p in pats) for r in rows]
    if rule.type == "score":
        if "field" in a:
            scores = [_field_number(r, a["field"]) for r in rows]
        else:
            scores = _model_scores(rule, rows, scorer_for)
        return [_in_range(s, lo, hi) for s in scores]
    if rule.type == "agreement":
        if "field" in a:
            values = [_field_number(r, a["field"]) for r in rows]
        else:
            keys = a["labels"].split("|")
            values = [_agreement(r, keys) for r in rows]
        return [_in_range(v, lo, None) for v in values]
    raise CurationError(f"--rule {rule.text!r}: unknown rule type {rule.type!r}")


def apply_rules(
    rows: Sequence[Mapping[str, Any]],
    rules: Sequence[Rule],
    tokenizer: Any = None,
    progress: Progress = None,
    scorer_for: Callable[[Rule], Scorer] = _no_fn,
) -> tuple[list[bool], list[dict[str, Any]]]:
    """Apply rules in order (a rule sees only the rows the earlier ones kept); returns (keep, per-rule drops)."""
    keep = [True] * len(rows)
    report = []
    for rule in rules:
        idx = [i for i, k in enumerate(keep) if k]
        mask = rule_mask(rule, [rows[i] for i in idx], tokenizer, scorer_for)
        dropped = 0
        for i, k in zip(idx, mask, strict=True):
            if not k:
                keep[i] = False
                dropped += 1
        report.append({"rule": rule.text, "dropped": dropped, "examined": len(idx)})
        if progress:
            progress(1)
    return keep, report


def filter_dataset(
    store: Store,
    ref: str,
    rules: Sequence[str],
    tokenizer: Any = None,
    progress: Progress = None,
    load_tokenizer: Callable[[], Any] | None = None,
    scorer_for: Callable[[Rule], Scorer] = _no_fn,
) -> dict[str, Any]:
    """Parse every rule first (a bad one fails before anything is read or written), apply them, and store the
    kept rows as a new version. Returns the report with each rule's drop count."""
    if not rules:
        raise CurationError("give at least one --rule")
    parsed = [parse_rule(r) for r in rules]
    if tokenizer is None and any(p.type == "length" and p.args.get("unit") == "tokens" for p in parsed):
        if load_tokenizer is None:
            raise CurationError("a length rule with unit=tokens needs --tokenizer")
        tokenizer = load_tokenizer()
    aid, kind, name, rows, schema = load(store, ref)
    keep, per_rule = apply_rules(rows, parsed, tokenizer, progress, scorer_for)
    out = [r for r, k in zip(rows, keep, strict=True) if k]
    counts = {"rows_in": len(rows), "rows_out": len(out), "per_rule": per_rule}
    new_id, created = save_version(
        store, out, schema, kind, [(aid, "input")], name, "filter", {"rules": list(rules)}, counts
    )
    return {"input": aid, "output": new_id, "created": created, **counts}
