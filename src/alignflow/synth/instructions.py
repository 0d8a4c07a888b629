"""New instructions from a seed set: self-instruct and Evol-Instruct, then duplicate filtering.

- ``self-instruct`` (Wang et al. 2023, "Self-Instruct", §2.2): show the generator ``k`` seed instructions
  sampled at random as "Task 1: ... Task k:" and let it continue with "Task k+1:"; every task it writes is a
  candidate.
- ``evol`` (Xu et al. 2023, "WizardLM", §3.1, in-depth evolving): ask the generator to rewrite one seed
  into a harder version by one operation (add a constraint, deepen, concretise, add reasoning steps); the
  rewrite is the candidate. Rewrites that copy the template's markers are dropped (their §3.2 elimination).

Candidates are then cleaned: empty, too short or too long ones go, and so do duplicates of a seed or of an
earlier candidate, first exactly (on normalised text) and then as near-duplicates with the curation MinHash
filter (:func:`alignflow.data.curation.dedup.near_clusters`, Jaccard of character 3-grams). Every count is in
the result, and the kept ones are stored as a ``prompts`` dataset linked to the seeds and the generator.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from alignflow.data.curation.common import normalize_text, prompt_text
from alignflow.data.curation.dedup import near_clusters
from alignflow.data.formats import SCHEMAS
from alignflow.errors import ConfigError, DataFormatError
from alignflow.judges.generators import Generator, generator_artifact
from alignflow.store import Store

Method = Literal["self-instruct", "evol"]
METHODS = ("self-instruct", "evol")
Progress = Callable[[int, int], None]  # (completed, total) generator calls

EVOL_OPERATIONS = {
    "constraints": "Add one more constraint or requirement to the prompt.",
    "deepen": "If the prompt touches on a specific issue, increase the depth and breadth of the inquiry.",
    "concretize": "Replace general concepts in the prompt with more specific ones.",
    "reasoning": "If the prompt can be solved in a few simple steps, rewrite it to ask for several steps of reasoning.",
}
# WizardLM's in-depth evolving prompt (Xu et al. 2023, appendix), one operation per call.
EVOL_TEMPLATE = (
    "I want you to act as a Prompt Rewriter. Your objective is to rewrite a given prompt into a more complex "
    "version that stays reasonable, understandable and answerable by humans. {operation} The rewritten "
    "prompt may add only 10 to 20 words to the given prompt.\n"
    "#The Given Prompt#:\n{prompt}\n#Rewritten Prompt#:\n"
)
_EVOL_MARKERS = ("#the given prompt#", "#rewritten prompt#", "given prompt", "rewritten prompt")
_TASK = re.compile(r"^\s*(?:task\s*\d+\s*[:.)]|\d+\s*[:.)]|[-*•])\s*", re.IGNORECASE)
_TASK_SPLIT = re.compile(r"\btask\s*\d+\s*:", re.IGNORECASE)


def self_instruct_prompt(examples: Sequence[str]) -> str:
    """Self-Instruct's generation prompt: numbered example tasks, then the next number, open."""
    body = "".join(f"Task {i + 1}: {' '.join(t.split())}\n" for i, t in enumerate(examples))
    return f"Come up with a series of tasks:\n{body}Task {len(examples) + 1}:"


def parse_tasks(text: str) -> list[str]:
    """The tasks in a continuation of :func:`self_instruct_prompt`: its first line continues the open task;
    later ``Task N:``, numbered or bulleted lines are more tasks."""
    out = []
    for part in _TASK_SPLIT.split(text):
        for line in part.splitlines():
            task = _TASK.sub("", line).strip()
            if task:
                out.append(task)
    return out


def evol_prompt(seed_prompt: str, operation: str) -> str:
    return EVOL_TEMPLATE.format(operation=EVOL_OPERATIONS[operation], prompt=seed_prompt.strip())


def parse_evolved(text: str) -> str:
    """The rewrite: the reply up to its first blank line, whitespace collapsed."""
    return " ".join(text.strip().split("\n\n")[0].split())


@dataclass(frozen=True)
class Candidate:
    text: str
    source: dict[str, Any]  # how it was made: seed ids, evol operation, request index


def filter_candidates(
    seeds: Sequence[str],
    candidates: Sequence[Candidate],
    *,
    min_chars: int,
    max_chars: int,
    near: float | None,
) -> tuple[list[Candidate], dict[str, int]]:
    """Candidates that survive the length and duplicate filters (first of each duplicate group), and the
    count dropped by each filter: ``empty``, ``too_short``, ``too_long``, ``template_copy``,
    ``exact_dup_seed``, ``exact_dup_other``, ``near_dup_seed``, ``near_dup_other``."""
    counts = dict.fromkeys(
        (
            "empty",
            "too_short",
            "too_long",
            "template_copy",
            "exact_dup_seed",
            "exact_dup_other",
            "near_dup_seed",
            "near_dup_other",
        ),
        0,
    )
    left: list[Candidate] = []
    for c in candidates:
        t = c.text.strip()
        if not t:
            counts["empty"] += 1
        elif len(t) < min_chars:
            counts["too_short"] += 1
        elif len(t) > max_chars:
            counts["too_long"] += 1
        elif any(m in t.lower() for m in _EVOL_MARKERS):
            counts["template_copy"] += 1
        else:
            left.append(c)
    seed_keys = {normalize_text(s) for s in seeds}
    seen: set[str] = set()
    unique: list[Candidate] = []
    for c in left:
        key = normalize_text(c.text)
        if key in seed_keys:
            counts["exact_dup_seed"] += 1
        elif key in seen:
            counts["exact_dup_other"] += 1
        else:
            seen.add(key)
            unique.append(c)
    if near is None or not unique:
        return unique, counts
    texts = list(seeds) + [c.text for c in unique]
    n_seeds = len(seeds)
    drop: dict[int, str] = {}
    for cluster in near_clusters(texts, near):
        new = [i for i in cluster if i >= n_seeds]
        if len(new) < len(cluster):  # a seed is in the group: every candidate in it only restates a seed
            drop.update(dict.fromkeys(new, "near_dup_seed"))
        else:  # clusters list indices in order: the earliest candidate stays
            drop.update(dict.fromkeys(new[1:], "near_dup_other"))
    for why in drop.values():
        counts[why] += 1
    return [c for i, c in enumerate(unique) if i + n_seeds not in drop], counts


@dataclass(frozen=True)
class SynthesisResult:
    output: str | None  # the prompts dataset, None when nothing survived
    report: dict[str, Any]


def seed_rows(store: Store, seeds_id: str) -> list[tuple[str, str]]:
    """``(id, prompt text)`` of each row of a prompt-carrying dataset (a chat's prompt: its turns but the
    last, joined)."""
    info = store.get(seeds_id)
    out = []
    for i, row in enumerate(store.read_dataset(seeds_id).to_pylist()):
        if info.kind == "prompts" and row.get("messages"):  # ends with the user's turn: nothing to cut
            text = "\n".join(m["content"] for m in row["messages"] if m["role"] == "user")
        else:
            text = prompt_text(row)
        if not text.strip():
            raise DataFormatError(
                f"{info.name or seeds_id[:12]}: row {i} (id {row.get('id')}): field 'prompt' is empty"
            )
        out.append((str(row["id"]), text))
    return out


def synthesize(
    store: Store,
    method: Method,
    seeds_id: str,
    generator: Generator,
    *,
    requests: int = 16,
    k: int = 4,
    seed: int = 0,
    max_new_tokens: int = 96,
    temperature: float = 0.9,
    near: float | None = 0.7,
    min_chars: int = 10,
    max_chars: int = 1000,
    name: str | None = None,
    chunk: int = 16,
    progress: Progress | None = None,
) -> SynthesisResult:
    """Make ``requests`` generator calls by ``method``, filter the candidates, store the kept ones.

    ``k``: seed examples per self-instruct request. ``near``: Jaccard threshold for near-duplicates (None:
    exact duplicates only). Lineage: the output links to the seeds (role ``seeds``) and the generator.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if requests < 1 or k < 1 or chunk < 1:
        raise ConfigError(f"requests, k and chunk must be at least 1, got {requests}, {k}, {chunk}")
    if min_chars < 1 or max_chars < min_chars:
        raise ConfigError(f"need 1 <= min_chars <= max_chars, got {min_chars} and {max_chars}")
    seeds = seed_rows(store, seeds_id)
    rng = random.Random(seed)
    asks: list[str] = []
    sources: list[dict[str, Any]] = []
    ops = sorted(EVOL_OPERATIONS)
    for i in range(requests):
        if method == "self-instruct":
            shown = rng.sample(seeds, min(k, len(seeds)))
            asks.append(self_instruct_prompt([t for _, t in shown]))
            sources.append({"request": i, "seeds": [sid for sid, _ in shown]})
        else:
            sid, text = seeds[i % len(seeds)]
            op = rng.choice(ops)
            asks.append(evol_prompt(text, op))
            sources.append({"request": i, "seeds": [sid], "operation": op})
    replies: list[str] = []
    if progress is not None:
        progress(0, requests)
    for j, start in enumerate(range(0, requests, chunk)):
        part = asks[start : start + chunk]
        replies += generator.generate(
            part, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + j
        )
        if progress is not None:
            progress(len(replies), requests)
    candidates = []
    for src, reply in zip(sources, replies, strict=True):
        texts = parse_tasks(reply) if method == "self-instruct" else [parse_evolved(reply)]
        candidates += [Candidate(t, src) for t in texts] or [Candidate("", src)]
    kept, counts = filter_candidates(
        [t for _, t in seeds], candidates, min_chars=min_chars, max_chars=max_chars, near=near
    )
    report: dict[str, Any] = {
        "method": method,
        "generator": generator.spec,
        "seeds": seeds_id,
        "num_seeds": len(seeds),
        "requests": requests,
        "candidates": len(candidates),
        "dropped": counts,
        "kept": len(kept),
        "near_threshold": near,
        "output": None,
    }
    if not kept:
        return SynthesisResult(None, report)
    rows = [
        {
            "id": f"{method}-{seed}-{i}",
            "prompt": c.text,
            "messages": None,
            "meta": json.dumps({"synth": method, **c.source}, sort_keys=True),
        }
        for i, c in enumerate(kept)
    ]
    gen_id = generator_artifact(store, generator, "generator")
    params = {"k": k, "seed": seed, "max_new_tokens": max_new_tokens, "temperature": temperature}
    report["output"] = store.put_dataset(
        pa.Table.from_pylist(rows, schema=SCHEMAS["prompts"]),
        kind="prompts",
        name=name or f"synth-{method}",
        meta={
            "format": "prompts",
            "operation": f"synthesize:{method}",
            "params": {**params, "near": near, "min_chars": min_chars, "max_chars": max_chars},
            "counts": {k_: v for k_, v in report.items() if k_ in ("candidates", "kept")} | counts,
            "generator": generator.spec,
        },
        parents=[(seeds_id, "seeds"), (gen_id, "generator")],
    )
    return SynthesisResult(report["output"], report)


__all__ = [
    "EVOL_OPERATIONS",
    "METHODS",
    "Candidate",
    "SynthesisResult",
    "evol_prompt",
    "filter_candidates",
    "parse_evolved",
    "parse_tasks",
    "seed_rows",
    "self_instruct_prompt",
    "synthesize",
]
