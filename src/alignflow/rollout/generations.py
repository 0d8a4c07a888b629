"""Generations datasets: ``K`` candidates per prompt from a policy, with the settings that produced them.

The library behind ``alignflow generate`` (and the sampling half of ``alignflow eval``): resolve a policy (a
model folder or a checkpoint/model artifact) and a prompt set (a file imported as ``prompts``, or a dataset
artifact), sample through :func:`alignflow.rollout.candidates.generate_candidates` (the one rollout sampler,
fast path included), and store the result as a ``generations`` dataset with lineage edges to both.

A generations table has one row per (prompt, candidate), the layout ``alignflow annotate import-items
--artifact`` reads (:func:`alignflow.feedback.services.items_from_generation`, which groups rows by
``prompt_id`` into one item):

| column          | type   | meaning                                                                  |
|-----------------|--------|--------------------------------------------------------------------------|
| `id`            | string | ``<prompt_id>-<candidate>``                                              |
| `prompt_id`     | string | the prompt row's id in the prompt dataset                                |
| `prompt`        | string | the prompt text the policy was given (chat-templated for `messages` rows) |
| `templated`     | bool   | whether a chat template rendered `prompt` (it then carries its own BOS)  |
| `candidate`     | int64  | 0..K-1                                                                   |
| `response`      | string | the decoded completion (special tokens stripped)                         |
| `model`         | string | the policy's name (artifact name or folder name)                         |
| `model_version` | string | the policy's artifact id                                                 |
| `sampling`      | string | JSON: temperature, top_p, max_new_tokens, seed, n                        |
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from alignflow.data.io import import_dataset
from alignflow.data.prompts import Prompt, prompts_from_rows
from alignflow.errors import ConfigError, StoreError
from alignflow.store import Store

# Dataset kinds whose rows carry prompts (prompt-only rows, SFT rows, preference rows).
PROMPT_KINDS = ("prompts", "sft", "pairs", "rankings")
POLICY_KINDS = ("checkpoint", "model")
PROMPT_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")

GENERATIONS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("templated", pa.bool_()),
        ("candidate", pa.int64()),
        ("response", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("sampling", pa.string()),
    ]
)

Progress = Callable[[int, int], None]  # (completed, total) completions


@dataclass(frozen=True)
class Policy:
    """A policy to sample from: the HF folder to load, its artifact id (for lineage) and a display name."""

    ref: str
    path: Path
    artifact_id: str
    name: str


@dataclass(frozen=True)
class PromptSet:
    """The unique prompts of a dataset artifact, in order, each with the id of the first row that holds it."""

    artifact_id: str
    ids: list[str]
    prompts: list[Prompt]


@dataclass(frozen=True)
class Sampling:
    """How candidates are drawn; stored with every row of a generations dataset."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "n": self.n,
        }


def resolve_model_folder(store: Store, ref: str, arg: str) -> tuple[Path, str, str]:
    """``(folder, artifact id, name)`` of a model given as a folder or a checkpoint/model artifact.

    A folder whose content is already stored (an earlier stage's checkpoint) links to that artifact, and so
    to its lineage; another folder is stored once as a ``model``. ``arg`` names the argument in errors.
    """
    p = Path(ref)
    if p.is_dir():
        p = p.resolve()
        aid = store.lookup_directory(p) or store.put_directory(p, kind="model", name=p.name)
        return p, aid, p.name
    if p.exists():
        raise ConfigError(f"{arg} {ref!r}: is a file; expected a model folder or a checkpoint artifact")
    try:
        info = store.get(ref)
    except StoreError:
        raise ConfigError(
            f"{arg} {ref!r}: no such model folder, and no artifact of that id or name in {store.workspace.home}"
        ) from None
    if info.kind not in POLICY_KINDS:
        raise ConfigError(
            f"{arg} {ref!r}: artifact {info.id[:12]} is a {info.kind}; expected a checkpoint or model"
        )
    return store.path(info.id), info.id, info.name or info.id[:12]


def resolve_policy(store: Store, ref: str, arg: str = "POLICY") -> Policy:
    path, aid, name = resolve_model_folder(store, ref, arg)
    return Policy(ref=ref, path=path, artifact_id=aid, name=name)


def resolve_prompts(store: Store, ref: str, arg: str = "--prompts") -> str:
    """The artifact id of a prompt set: a JSONL/Parquet file or a Hugging Face dataset folder (imported as a
    ``prompts`` dataset, strictly validated), or a dataset artifact of a kind that carries prompts."""
    p = Path(ref)
    if (p.suffix.lower() in PROMPT_SUFFIXES and p.exists()) or p.is_dir():  # a folder: HF `save_to_disk`
        return import_dataset(store, p, "prompts")
    if p.exists():
        raise ConfigError(f"{arg} {ref!r}: expected a .jsonl or .parquet file, or a dataset artifact")
    try:
        info = store.get(ref)
    except StoreError:
        raise ConfigError(
            f"{arg} {ref!r}: no such file, and no artifact of that id or name in {store.workspace.home}"
        ) from None
    if info.kind not in PROMPT_KINDS:
        raise ConfigError(
            f"{arg} {ref!r}: artifact {info.id[:12]} is a {info.kind}; expected a dataset of kind "
            + ", ".join(PROMPT_KINDS)
        )
    return info.id


def load_prompt_set(store: Store, artifact_id: str, tok: Any, limit: int | None = None) -> PromptSet:
    """The unique prompts of a dataset artifact as the policy's tokenizer renders them (chat template for
    ``messages`` rows), with their row ids; the first ``limit`` only when given."""
    info = store.get(artifact_id)
    rows = store.read_dataset(artifact_id).to_pylist()
    prompts = prompts_from_rows(rows, info.kind, tok, info.name or artifact_id[:12])  # errors name the row
    if len(prompts) == len(rows):
        ids = [str(r["id"]) for r in rows]
    else:  # repeated prompts (e.g. several pairs per prompt): each keeps the id of its first row
        first: dict[str, str] = {}
        for r in rows:
            first.setdefault(prompts_from_rows([r], info.kind, tok, "")[0].text, str(r["id"]))
        ids = [first[p.text] for p in prompts]
    if limit is not None:
        prompts, ids = prompts[:limit], ids[:limit]
    return PromptSet(artifact_id, ids, prompts)


def sample_texts(
    model: Any,
    tok: Any,
    prompts: Sequence[Prompt],
    sampling: Sampling,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """``sampling.n`` completions per prompt (``out[i][j]``), through the rollout sampler."""
    from alignflow.rollout.candidates import generate_candidates

    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    return generate_candidates(
        model,
        tok,
        prompts,
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        seed=sampling.seed,
        batch_size=batch_size,
        progress=progress,
    )


def generations_table(
    prompt_set: PromptSet, candidates: Sequence[Sequence[str]], policy: Policy, sampling: Sampling
) -> pa.Table:
    """One row per (prompt, candidate) in the layout of the module docstring."""
    settings = json.dumps(sampling.as_dict(), sort_keys=True)
    rows = [
        {
            "id": f"{pid}-{j}",
            "prompt_id": pid,
            "prompt": prompt.text,
            "templated": prompt.templated,
            "candidate": j,
            "response": text,
            "model": policy.name,
            "model_version": policy.artifact_id,
            "sampling": settings,
        }
        for pid, prompt, texts in zip(prompt_set.ids, prompt_set.prompts, candidates, strict=True)
        for j, text in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=GENERATIONS_SCHEMA)


def generate_dataset(
    store: Store,
    policy_ref: str,
    prompts_ref: str,
    sampling: Sampling,
    *,
    batch_size: int = 64,
    name: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Sample ``sampling.n`` candidates per prompt and store them as a ``generations`` dataset; return its id.

    Lineage: edges from the policy (role ``policy``) and the prompt dataset (role ``prompts``).
    ``progress(completed, total)`` is called after each sampled batch.
    """
    from alignflow.models import load_policy, load_tokenizer

    policy = resolve_policy(store, policy_ref)
    prompts_id = resolve_prompts(store, prompts_ref)
    tok = load_tokenizer(policy.path, padding_side="left")
    prompt_set = load_prompt_set(store, prompts_id, tok)
    model = load_policy(policy.path, dtype="float32")
    total = len(prompt_set.prompts) * sampling.n
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    candidates = sample_texts(model, tok, prompt_set.prompts, sampling, batch_size, advance)
    table = generations_table(prompt_set, candidates, policy, sampling)
    return store.put_dataset(
        table,
        kind="generations",
        name=name or f"generations-{policy.name}",
        meta={
            "policy": policy.artifact_id,
            "prompts": prompts_id,
            "num_prompts": len(prompt_set.prompts),
            "sampling": sampling.as_dict(),
            "format": "generations",
        },
        parents=[(policy.artifact_id, "policy"), (prompts_id, "prompts")],
    )


__all__ = [
    "GENERATIONS_SCHEMA",
    "PROMPT_KINDS",
    "Policy",
    "PromptSet",
    "Sampling",
    "generate_dataset",
    "generations_table",
    "load_prompt_set",
    "resolve_model_folder",
    "resolve_policy",
    "resolve_prompts",
    "sample_texts",
]
