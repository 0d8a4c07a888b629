"""Constitutional AI's supervised phase: critique and revise a policy's responses against written principles.

Bai et al. 2022 ("Constitutional AI: Harmlessness from AI Feedback", §3): sample a response, then for each
of ``N`` rounds draw one principle at random, ask a model to critique the current response by that
principle, and ask it to revise the response in the light of the critique. The final revisions are SFT data;
(original, revision) pairs are preference data (§4 builds AI preferences from a feedback model judging two
samples against a sampled principle, which ``judge=`` does here).

A constitution is a YAML file::

    name: support
    version: 1                 # optional; the file's SHA-256 is recorded either way
    principles:
      - name: accurate
        critique: "... {prompt} ... {response} ... Critique:"
        revision: "... {response} ... {critique} ... Revision:"
        judge: "Which reply is more accurate? {prompt}"   # optional: what a judge sees instead of the prompt

Templates take ``{prompt}``, ``{response}`` and (revision only) ``{critique}``; write ``{{`` for a literal
brace. The file itself is stored as a ``constitution`` artifact (its id is the SHA-256 of its bytes, so
a changed file is a new version) and every dataset made from it links to it.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from alignflow.data.formats import SCHEMAS
from alignflow.errors import ConfigError, DataFormatError
from alignflow.judges.generators import Generator, generator_artifact
from alignflow.store import Store

PLACEHOLDERS = {"critique": ("prompt", "response"), "revision": ("prompt", "response", "critique")}
REQUIRED = {"critique": ("response",), "revision": ("response", "critique")}
TOP_KEYS = {"name", "version", "description", "principles"}
PRINCIPLE_KEYS = {"name", "critique", "revision", "judge"}
Progress = Callable[[int, int], None]  # (completed, total) model calls


class ConstitutionError(ConfigError):
    """A constitution file is malformed; the message names the file, the field and its line."""


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    judge: str | None = None


@dataclass(frozen=True)
class Constitution:
    """A parsed constitution. ``sha256`` hashes the file's bytes; ``version`` is the declared version or,
    when none is declared, the first 12 hex digits of ``sha256``."""

    path: Path
    name: str
    version: str
    sha256: str
    principles: tuple[Principle, ...]
    description: str = ""


def _lines(node: yaml.Node, path: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """``{"principles[1].critique": 12, ...}``: the 1-based line of each value in the YAML document."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = str(k.value)
            _lines(v, f"{path}.{key}" if path else key, out)
            out.setdefault(f"{path}.{key}:key" if path else f"{key}:key", k.start_mark.line + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _lines(v, f"{path}[{i}]", out)
    return out


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution file; every error names the file, the field and its line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConstitutionError(f"{p}: cannot read the constitution: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConstitutionError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConstitutionError(f"{p}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    lines = _lines(node) if node is not None else {}

    def fail(field_path: str, msg: str) -> ConstitutionError:
        line = lines.get(field_path) or lines.get(f"{field_path}:key")
        return ConstitutionError(f"{p}{f':{line}' if line else ''}: field '{field_path}': {msg}")

    if not isinstance(data, dict):
        raise ConstitutionError(
            f"{p}: expected a mapping with name and principles, got {type(data).__name__}"
        )
    for key in data:
        if key not in TOP_KEYS:
            raise fail(str(key), f"unknown field; expected {', '.join(sorted(TOP_KEYS))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise fail("name", "must be a non-empty string")
    version = data.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int | float)):
        raise fail("version", f"must be a string or a number, got {type(version).__name__}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise fail("description", "must be a string")
    principles = data.get("principles")
    if not isinstance(principles, list) or not principles:
        raise fail("principles", "must be a non-empty list of {name, critique, revision}")
    out: list[Principle] = []
    seen: set[str] = set()
    for i, item in enumerate(principles):
        at = f"principles[{i}]"
        if not isinstance(item, dict):
            raise fail(at, f"must be a mapping with name, critique, revision; got {type(item).__name__}")
        for key in item:
            if key not in PRINCIPLE_KEYS:
                raise fail(f"{at}.{key}", f"unknown field; expected {', '.join(sorted(PRINCIPLE_KEYS))}")
        pname = item.get("name")
        if not isinstance(pname, str) or not pname.strip():
            raise fail(f"{at}.name", "must be a non-empty string")
        if pname in seen:
            raise fail(f"{at}.name", f"duplicate principle name {pname!r}")
        seen.add(pname)
        templates: dict[str, str] = {}
        for kind, allowed in PLACEHOLDERS.items():
            templates[kind] = _template(item.get(kind), f"{at}.{kind}", allowed, REQUIRED[kind], fail)
        judge = item.get("judge")
        if judge is not None:
            judge = _template(judge, f"{at}.judge", ("prompt",), ("prompt",), fail)
        out.append(Principle(pname, templates["critique"], templates["revision"], judge))
    sha = hashlib.sha256(raw).hexdigest()
    return Constitution(
        path=p,
        name=name.strip(),
        version=str(version) if version is not None else sha[:12],
        sha256=sha,
        principles=tuple(out),
        description=description,
    )


def _template(
    value: Any,
    field_path: str,
    allowed: Sequence[str],
    required: Sequence[str],
    fail: Callable[[str, str], ConstitutionError],
) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(field_path, "must be a non-empty prompt template")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
    except ValueError as exc:
        raise fail(field_path, f"bad template ({exc}); write {{{{ and }}}} for literal braces") from None
    bad = sorted(n for n in names if n not in allowed)
    if bad:
        raise fail(
            field_path,
            f"unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)}; "
            f"allowed: {', '.join('{' + a + '}' for a in allowed)}",
        )
    missing = [r for r in required if r not in names]
    if missing:
        raise fail(field_path, f"must contain {', '.join('{' + m + '}' for m in missing)}")
    return value


# ----------------------------------------------------------------------------------------- the loop


_WORD = re.compile(r"\w+")


def degenerate(text: str, min_chars: int) -> str | None:
    """Why a revision cannot replace a response (``None`` if it can): ``empty``; ``short`` (fewer than
    ``min_chars`` non-space characters); ``undecodable`` (over a third of its characters are U+FFFD, the
    bytes a byte-level model split mid-character); ``repetitive`` (the loop a small model falls into: 8+ words
    of which under a quarter are distinct, or 24+ characters of which under half the 4-grams are distinct)."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if len("".join(stripped.split())) < min_chars:
        return "short"
    if stripped.count("\ufffd") * 3 > len(stripped):
        return "undecodable"
    words = _WORD.findall(stripped.lower())
    if len(words) >= 8 and len(set(words)) / len(words) < 0.25:
        return "repetitive"
    grams = [stripped[i : i + 4] for i in range(len(stripped) - 3)]
    if len(stripped) >= 24 and len(set(grams)) / len(grams) < 0.5:
        return "repetitive"
    return None


@dataclass
class Example:
    """One prompt through the loop: its original response, each round's step, and the current response."""

    id: str
    prompt: str
    original: str
    current: str
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def revised(self) -> bool:
        return self.current.strip() != self.original.strip()


@dataclass(frozen=True)
class ConstitutionResult:
    sft: str | None
    pairs: str | None
    constitution: str
    report: dict[str, Any]
    report_json: str
    report_md: str
    markdown: str


def prompt_rows(store: Store, prompts_id: str) -> list[tuple[str, str]]:
    """``(id, prompt text)`` of each row of a prompt-carrying dataset, first occurrence of each prompt.

    A ``messages`` row is accepted when it is one user turn (optionally after a system turn, which is
    dropped: critique templates quote the prompt as text); longer conversations are refused by row.
    """
    info = store.get(prompts_id)
    out: dict[str, str] = {}
    for i, row in enumerate(store.read_dataset(prompts_id).to_pylist()):
        text = row.get("prompt")
        if not text and row.get("messages"):
            turns = [m for m in row["messages"] if m["role"] != "system"]
            if info.kind == "sft" and turns and turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if len(turns) != 1 or turns[0]["role"] != "user":
                raise DataFormatError(
                    f"{info.name or prompts_id[:12]}: row {i} (id {row.get('id')}): field 'messages': "
                    "only single-turn prompts can be critiqued and revised"
                )
            text = turns[0]["content"]
        if not text or not text.strip():
            raise DataFormatError(
                f"{info.name or prompts_id[:12]}: row {i} (id {row.get('id')}): field 'prompt' is empty"
            )
        out.setdefault(text, str(row["id"]))
    return [(rid, text) for text, rid in out.items()]


def _chunked(
    gen: Generator,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chunk: int,
    tick: Callable[[int], None],
) -> list[str]:
    """``gen.generate`` in chunks so a progress bar moves; chunk ``j`` is seeded ``seed + j``."""
    out: list[str] = []
    for j, start in enumerate(range(0, len(prompts), chunk)):
        part = prompts[start : start + chunk]
        out += gen.generate(part, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + j)
        tick(len(part))
    return out


def run_constitution(
    store: Store,
    policy: Generator,
    prompts: str,
    constitution: str | Path,
    critic: Generator | None = None,
    rounds: int = 1,
    seed: int = 0,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    critic_temperature: float = 0.0,
    min_chars: int = 8,
    limit: int | None = None,
    judge: Any = None,
    scorer: Callable[[list[str], list[str]], Sequence[float]] | None = None,
    name: str | None = None,
    chunk: int = 16,
    progress: Progress | None = None,
) -> ConstitutionResult:
    """Critique and revise ``policy``'s response to each prompt for ``rounds`` rounds; store the results.

    ``prompts``: a dataset artifact id (see :func:`alignflow.rollout.generations.resolve_prompts`).
    ``critic`` writes critiques and revisions (default: the policy itself, as in Bai et al.); greedy by
    default (``critic_temperature=0``) so a run is reproducible. A degenerate revision (:func:`degenerate`)
    is not taken: the response stays what it was and the report counts it. ``judge``: a judge (see
    :func:`alignflow.judges.load_judge`) that decides each pair in both orders against a sampled principle;
    without it the revision is the chosen reply. ``scorer(prompts, responses) -> scores``: an optional
    reference score (the demo's gold utility, say) reported for the originals and the final texts, which
    says whether "revised" meant "better".

    Returns the SFT dataset (prompt, completion = final revision) and the pairs dataset (chosen = revision,
    rejected = original, or as the judge decided); either is None when no example was revised. Both link
    to the constitution file artifact, the policy, the critic and the prompts.
    """
    if rounds < 1:
        raise ConfigError(f"rounds must be at least 1, got {rounds}")
    if chunk < 1:
        raise ConfigError(f"chunk must be at least 1, got {chunk}")
    const = load_constitution(constitution)
    critic = critic or policy
    rows = prompt_rows(store, prompts)[:limit]
    if not rows:
        raise DataFormatError(f"--prompts {prompts[:12]}: no prompts")
    n = len(rows)
    total = n * (1 + 2 * rounds)
    done = 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    texts = [t for _, t in rows]
    first = _chunked(
        policy,
        texts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        chunk=chunk,
        tick=tick,
    )
    examples = [Example(rid, t, r, r) for (rid, t), r in zip(rows, first, strict=True)]
    rng = random.Random(seed)
    rejected_reasons: dict[str, int] = {}
    for r in range(rounds):
        chosen = [rng.choice(const.principles) for _ in examples]
        critique_req = [
            p.critique.format(prompt=e.prompt, response=e.current)
            for p, e in zip(chosen, examples, strict=True)
        ]
        critiques = _chunked(
            critic,
            critique_req,
            max_new_tokens=max_new_tokens,
            temperature=critic_temperature,
            seed=seed + 1000 * (2 * r + 1),
            chunk=chunk,
            tick=tick,
        )
        revision_req = [
            p.revision.format(prompt=e.prompt, response=e.current, critique=c.strip())
            for p, e, c in zip(chosen, examples, critiques, strict=True)
        ]
        revisions = _chunked(
            critic,
            revision_req,
            max_new_tokens=max_new_tokens,
            temperature=critic_temperature,
            seed=seed + 1000 * (2 * r + 2),
            chunk=chunk,
            tick=tick,
        )
        for e, p, c, rev in zip(examples, chosen, critiques, revisions, strict=True):
            why = degenerate(rev, min_chars)
            e.steps.append(
                {
                    "round": r + 1,
                    "principle": p.name,
                    "critique": c,
                    "revision": rev,
                    "rejected": why,
                    "overlap": round(overlap(e.current, rev), 4),
                }
            )
            if why is None:
                e.current = rev.strip()
            else:
                rejected_reasons[why] = rejected_reasons.get(why, 0) + 1

    const_id = store.put_file(
        const.path,
        kind="constitution",
        name=const.name,
        meta={
            "version": const.version,
            "sha256": const.sha256,
            "principles": [p.name for p in const.principles],
        },
    )
    policy_id = generator_artifact(store, policy, "policy")
    critic_id = generator_artifact(store, critic, "critic")
    parents = [(const_id, "constitution"), (policy_id, "policy"), (prompts, "prompts")]
    if critic_id != policy_id:
        parents.append((critic_id, "critic"))
    common = {
        "constitution": const.name,
        "constitution_version": const.version,
        "constitution_sha256": const.sha256,
        "policy": policy.spec,
        "critic": critic.spec,
        "rounds": rounds,
        "seed": seed,
    }
    revised = [e for e in examples if e.revised]
    base = name or f"constitution-{const.name}"

    sft_id = None
    if revised:
        sft_rows = [
            {
                "id": e.id,
                "prompt": e.prompt,
                "completion": e.current,
                "messages": None,
                "meta": json.dumps({"principles": [s["principle"] for s in e.steps]}, sort_keys=True),
            }
            for e in revised
        ]
        sft_id = store.put_dataset(
            pa.Table.from_pylist(sft_rows, schema=SCHEMAS["sft"]),
            kind="sft",
            name=f"{base}-sft",
            meta={**common, "format": "sft", "operation": "constitution"},
            parents=parents,
        )

    judged: dict[str, Any] = {}
    pair_rows = []
    if revised and judge is not None:
        from alignflow.judges import judge_pairs

        jrng = random.Random(seed + 1)
        principles = [jrng.choice(const.principles) for _ in revised]
        items = [
            (p.judge.format(prompt=e.prompt) if p.judge else e.prompt, e.original, e.current)
            for p, e in zip(principles, revised, strict=True)
        ]
        verdicts = judge_pairs(judge, items, orders="both", on_inconsistent="drop")
        judged = {"revision_preferred": 0, "original_preferred": 0, "tie_or_inconsistent": 0}
        for e, p, v in zip(revised, principles, verdicts, strict=True):
            if v.winner is None:
                judged["tie_or_inconsistent"] += 1
                continue
            judged["revision_preferred" if v.winner == 1 else "original_preferred"] += 1
            good, bad = (e.current, e.original) if v.winner == 1 else (e.original, e.current)
            meta = {"principle": p.name, "judge": judge.spec, "confidence": v.confidence, "source": "judge"}
            pair_rows.append((e.id, e.prompt, good, bad, meta))
    else:
        for e in revised:
            meta = {"principles": [s["principle"] for s in e.steps], "source": "revision"}
            pair_rows.append((e.id, e.prompt, e.current, e.original, meta))

    pairs_id = None
    if pair_rows:
        rows_out = [
            {
                "id": i,
                "prompt": p,
                "chosen": c,
                "rejected": r,
                "weight": 1.0,
                "meta": json.dumps(m, sort_keys=True),
            }
            for i, p, c, r, m in pair_rows
        ]
        pair_parents = parents + ([(_judge_record(store, judge), "judge")] if judge else [])
        pairs_id = store.put_dataset(
            pa.Table.from_pylist(rows_out, schema=SCHEMAS["pairs"]),
            kind="pairs",
            name=f"{base}-pairs",
            meta={
                **common,
                "format": "pairs",
                "operation": "constitution",
                "judge": getattr(judge, "spec", None),
            },
            parents=pair_parents,
        )

    report = _report(const, examples, rejected_reasons, judged, common, sft_id, pairs_id, const_id)
    if scorer is not None:
        ps = [e.prompt for e in examples]
        before = [float(x) for x in scorer(ps, [e.original for e in examples])]
        after = [float(x) for x in scorer(ps, [e.current for e in examples])]
        report["score"] = {
            "mean_original": _mean(before, 4),
            "mean_final": _mean(after, 4),
            "improved": sum(a > b for a, b in zip(after, before, strict=True)),
            "worsened": sum(a < b for a, b in zip(after, before, strict=True)),
        }
    markdown = report_markdown(report)
    out_parents = [(a, role) for a, role in ((sft_id, "sft"), (pairs_id, "pairs")) if a] or parents
    report_json = store.put_json(report, kind="report", name=f"{base}-report.json", parents=out_parents)
    report_md = _put_text(store, markdown, f"{base}-report.md", out_parents)
    return ConstitutionResult(sft_id, pairs_id, const_id, report, report_json, report_md, markdown)


def _judge_record(store: Store, judge: Any) -> str:
    """A ``judge-spec`` record of the judge's spec, for lineage."""
    return store.put_json({"spec": judge.spec}, kind="judge-spec", name=str(judge.spec)[:120])


def _put_text(store: Store, text: str, name: str, parents: list[tuple[str, str]]) -> str:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_text(text, encoding="utf-8")
        return store.put_file(path, kind="report", name=name, parents=parents)


def _mean(xs: Sequence[float], digits: int = 2) -> float | None:
    return round(sum(xs) / len(xs), digits) if xs else None


def overlap(before: str, after: str) -> float:
    """Jaccard similarity of the two texts' character 3-gram sets (the near-duplicate filter's measure): a
    revision that edits the response keeps much of it; an unrelated text keeps almost nothing."""
    from alignflow.data.curation.dedup import shingles

    a, b = shingles(before), shingles(after)
    return len(a & b) / len(a | b) if a | b else 1.0


def _report(
    const: Constitution,
    examples: Sequence[Example],
    rejected: dict[str, int],
    judged: dict[str, Any],
    common: dict[str, Any],
    sft_id: str | None,
    pairs_id: str | None,
    const_id: str,
) -> dict[str, Any]:
    """What the loop did, in counts a reader can check: how many revisions were taken and changed the text,
    how many were refused and why, lengths before and after, and a few examples."""
    steps = [s for e in examples for s in e.steps]
    taken = [s for s in steps if s["rejected"] is None]
    revised = [e for e in examples if e.revised]
    by_principle: dict[str, dict[str, int]] = {}
    for s in steps:
        d = by_principle.setdefault(s["principle"], {"steps": 0, "taken": 0})
        d["steps"] += 1
        d["taken"] += s["rejected"] is None
    return {
        **common,
        "constitution_artifact": const_id,
        "sft": sft_id,
        "pairs": pairs_id,
        "prompts": len(examples),
        "revision_steps": len(steps),
        "revisions_taken": len(taken),
        "revisions_refused": dict(sorted(rejected.items())),
        "examples_changed": len(revised),
        "share_changed": round(len(revised) / len(examples), 4) if examples else 0.0,
        "by_principle": by_principle,
        "mean_chars_original": _mean([len(e.original) for e in examples]),
        "mean_chars_final": _mean([len(e.current) for e in examples]),
        "mean_chars_final_changed": _mean([len(e.current) for e in revised]),
        "mean_words_original": _mean([len(e.original.split()) for e in examples]),
        "mean_words_final": _mean([len(e.current.split()) for e in examples]),
        "mean_overlap_taken": _mean([s["overlap"] for s in taken], 4),
        "revisions_copying_critique": sum(
            bool(s["critique"].strip()) and s["revision"].strip() == s["critique"].strip() for s in steps
        ),
        "judge": judged or None,
        "examples": [
            {"id": e.id, "prompt": e.prompt, "original": e.original, "steps": e.steps, "final": e.current}
            for e in (revised or list(examples))[:3]
        ],
    }


def caveats(report: dict[str, Any]) -> list[str]:
    """Plain statements the numbers support, so a reader does not take "changed" for "improved"."""
    out = [
        "- A taken revision is one that is not empty, short, undecodable or repetitive; nothing checks that "
        "it follows the critique or the principle. Read the examples, or pass a judge or a reference score."
    ]
    steps = report["revision_steps"] or 1
    refused = sum(report["revisions_refused"].values())
    if refused / steps >= 0.5:
        out.append(
            f"- {refused} of {report['revision_steps']} revisions were degenerate: the critic mostly cannot "
            "write a usable reply to these requests (a model this small does not follow instructions)."
        )
    ov = report.get("mean_overlap_taken")
    if ov is not None and ov < 0.2:
        out.append(
            f"- Taken revisions share little with the text they revise (mean 3-gram Jaccard {ov}): they are "
            "new texts rather than edits, so the pairs teach 'prefer the critic's text', not the principle."
        )
    sc = report.get("score")
    if sc and sc["mean_final"] is not None and sc["mean_original"] is not None:
        a, b = sc["mean_original"], sc["mean_final"]
        verb = "raised" if b > a else "lowered" if b < a else "did not change"
        out.append(f"- The loop {verb} the reference score ({a} -> {b}).")
    if report["revisions_copying_critique"]:
        out.append(
            f"- {report['revisions_copying_critique']} revisions repeat their critique word for word: the critic "
            "continues the request's text instead of answering it."
        )
    return out


def _quote(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return "`" + text.replace("`", "'") + "`" if text else "*(empty)*"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a short markdown page."""
    refused = ", ".join(f"{k} {v}" for k, v in report["revisions_refused"].items()) or "none"
    lines = [
        f"# Constitution run: {report['constitution']} (version {report['constitution_version']})",
        "",
        f"- constitution sha256: `{report['constitution_sha256']}`",
        f"- policy: `{report['policy']}`; critic: `{report['critic']}`; rounds: {report['rounds']}",
        f"- prompts: {report['prompts']}; critique-revision steps: {report['revision_steps']}",
        f"- revisions taken: {report['revisions_taken']}; refused: {refused}",
        f"- examples whose final text differs from the original: {report['examples_changed']} "
        f"({100 * report['share_changed']:.1f}%)",
        f"- mean length (chars) original -> final: {report['mean_chars_original']} -> {report['mean_chars_final']}",
        f"- mean overlap of a taken revision with the text it revised (character 3-gram Jaccard): "
        f"{report['mean_overlap_taken']}",
        f"- SFT dataset: `{report['sft'] or 'none (nothing revised)'}`; "
        f"pairs dataset: `{report['pairs'] or 'none'}`",
        "",
        "| principle | steps | taken |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['steps']} | {v['taken']} |" for k, v in sorted(report["by_principle"].items())]
    if report.get("judge"):
        j = report["judge"]
        lines += [
            "",
            f"Judge: revision preferred {j['revision_preferred']}, original preferred {j['original_preferred']}, "
            f"tie or order-inconsistent (dropped) {j['tie_or_inconsistent']}.",
        ]
    if report.get("score"):
        sc = report["score"]
        lines += [
            "",
            f"Reference score (mean): original {sc['mean_original']} -> final {sc['mean_final']}; "
            f"{sc['improved']} examples improved, {sc['worsened']} worsened.",
        ]
    lines += ["", "## What this says about the critic", "", *caveats(report), "", "## Examples", ""]
    for ex in report["examples"]:
        lines += [
            f"### {ex['id']}",
            "",
            f"- prompt: {_quote(ex['prompt'])}",
            f"- original: {_quote(ex['original'])}",
        ]
        for s in ex["steps"]:
            status = "taken" if s["rejected"] is None else f"refused ({s['rejected']})"
            lines += [
                f"- round {s['round']} ({s['principle']}): critique {_quote(s['critique'])}",
                f"  revision {_quote(s['revision'])} - {status}",
            ]
        lines += [f"- final: {_quote(ex['final'])}", ""]
    return "\n".join(lines) + "\n"


__all__ = [
    "Constitution",
    "ConstitutionError",
    "ConstitutionResult",
    "Principle",
    "caveats",
    "degenerate",
    "load_constitution",
    "overlap",
    "prompt_rows",
    "report_markdown",
    "run_constitution",
]
