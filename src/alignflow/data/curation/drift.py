"""Distribution shift between two sets of texts: two-sample tests on MiniLM embeddings.

- MMD (Gretton et al. 2012, JMLR 13, eq. 3 with a Gaussian kernel, bandwidth = median pairwise distance of
  the pooled sample) with a permutation test: p = (1 + #{permuted statistic ≥ observed}) / (1 + B).
- Classifier two-sample test (Lopez-Paz & Oquab 2017): a ridge-regularised linear classifier trained on a
  random half of each sample scores the other half; the p-value is the one-sided Mann-Whitney test of the
  held-out scores (new vs reference), its effect size the held-out AUC (0.5 = no shift).
- The clusters that moved: k-means on the pooled embeddings, each cluster's share in REF and NEW.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from alignflow.data.curation.common import BY_CHOICES, CurationError, load, row_text
from alignflow.store import Store


def _sq_dists(Z: np.ndarray) -> np.ndarray:
    sq = (Z * Z).sum(1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (Z @ Z.T), 0.0)


def mmd_test(X: np.ndarray, Y: np.ndarray, n_perm: int = 500, seed: int = 0) -> dict[str, float]:
    """MMD² (Gaussian kernel, V-statistic without the diagonal terms) of X (n, D) vs Y (m, D) and its permutation p-value.

    The statistic of a split is aᵀ K₀ a with a_i = 1/n for the first group and −1/m for the second and K₀ the
    kernel matrix with a zero diagonal; all B permutations are one (N, N) @ (N, B) product.
    """
    n, m = len(X), len(Y)
    if n < 2 or m < 2:
        raise CurationError("drift needs at least 2 rows on each side")
    Z = np.concatenate([X, Y]).astype(np.float64)
    D2 = _sq_dists(Z)
    iu = np.triu_indices(len(Z), 1)
    bandwidth2 = float(np.median(D2[iu])) or 1.0
    K = np.exp(-D2 / bandwidth2)
    np.fill_diagonal(K, 0.0)
    a = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    rng = np.random.default_rng(seed)
    A = np.stack([a] + [rng.permutation(a) for _ in range(n_perm)], axis=1)  # (N, B+1)
    stats = np.einsum("ib,ib->b", A, K @ A)
    observed = float(stats[0])
    p = (1.0 + float((stats[1:] >= observed).sum())) / (1.0 + n_perm)
    return {"mmd2": observed, "p_value": p, "bandwidth": float(np.sqrt(bandwidth2))}


def classifier_test(X: np.ndarray, Y: np.ndarray, seed: int = 0, ridge: float = 1.0) -> dict[str, float]:
    """Held-out AUC of a ridge linear classifier separating Y (label 1) from X (label 0), and its p-value.

    X: (n, D), Y: (m, D). The classifier is w = (ZᵀZ + λI)⁻¹ Zᵀ(y − ½) on a random half of each sample.
    """
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    ix, iy = rng.permutation(len(X)), rng.permutation(len(Y))
    hx, hy = len(X) // 2, len(Y) // 2
    if min(hx, hy, len(X) - hx, len(Y) - hy) < 1:
        raise CurationError("drift needs at least 2 rows on each side")
    Ztr = np.concatenate([X[ix[:hx]], Y[iy[:hy]]]).astype(np.float64)
    ytr = np.concatenate([np.zeros(hx), np.ones(hy)]) - 0.5
    mu = Ztr.mean(0)
    Ztr = np.concatenate([Ztr - mu, np.ones((len(Ztr), 1))], axis=1)
    w = np.linalg.solve(Ztr.T @ Ztr + ridge * np.eye(Ztr.shape[1]), Ztr.T @ ytr)
    sx = np.concatenate([X[ix[hx:]] - mu, np.ones((len(X) - hx, 1))], axis=1) @ w
    sy = np.concatenate([Y[iy[hy:]] - mu, np.ones((len(Y) - hy, 1))], axis=1) @ w
    u = mannwhitneyu(sy, sx, alternative="greater")
    return {"auc": float(u.statistic) / (len(sx) * len(sy)), "p_value": float(u.pvalue)}


def kmeans(Z: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> np.ndarray:
    """Cluster labels (N,) of Z (N, D) by Lloyd's algorithm from k-means++ seeds."""
    rng = np.random.default_rng(seed)
    k = min(k, len(Z))
    centers = [Z[rng.integers(len(Z))]]
    for _ in range(1, k):
        d = np.min(((Z[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(Z[rng.choice(len(Z), p=d / d.sum())] if d.sum() > 0 else Z[rng.integers(len(Z))])
    C = np.array(centers)
    labels = np.zeros(len(Z), dtype=int)
    for _ in range(iters):
        labels = np.argmin(((Z[:, None, :] - C[None]) ** 2).sum(-1), axis=1)
        newC = np.array([Z[labels == j].mean(0) if (labels == j).any() else C[j] for j in range(k)])
        if np.allclose(newC, C):
            break
        C = newC
    return labels


def moved_clusters(
    X: np.ndarray, Y: np.ndarray, texts_x: Sequence[str], texts_y: Sequence[str], k: int = 8, seed: int = 0
) -> list[dict[str, Any]]:
    """k-means clusters of the pooled embeddings, largest change of share first, with an example text each."""
    Z = np.concatenate([X, Y])
    labels = kmeans(Z, k, seed)
    lx, ly = labels[: len(X)], labels[len(X) :]
    texts = list(texts_x) + list(texts_y)
    out = []
    for j in np.unique(labels):
        members = np.nonzero(labels == j)[0]
        centre = Z[members].mean(0)
        example = texts[int(members[np.argmax(Z[members] @ centre)])]
        share_x, share_y = float((lx == j).mean()), float((ly == j).mean())
        out.append(
            {
                "cluster": int(j),
                "ref_share": share_x,
                "new_share": share_y,
                "change": share_y - share_x,
                "example": example[:200],
            }
        )
    return sorted(out, key=lambda c: -abs(c["change"]))


def drift_report(
    X: np.ndarray,
    Y: np.ndarray,
    texts_x: Sequence[str] = (),
    texts_y: Sequence[str] = (),
    alpha: float = 0.05,
    n_perm: int = 500,
    seed: int = 0,
    clusters: int = 8,
) -> dict[str, Any]:
    """Both tests on embeddings X (n, D) of REF and Y (m, D) of NEW; `drift` is whether either p < alpha/2
    (Bonferroni over the two tests)."""
    if not 0.0 < alpha < 1.0:
        raise CurationError(f"--alpha must be in (0, 1), got {alpha}")
    mmd = mmd_test(X, Y, n_perm, seed)
    clf = classifier_test(X, Y, seed)
    report: dict[str, Any] = {
        "ref_rows": len(X),
        "new_rows": len(Y),
        "alpha": alpha,
        "mmd": mmd,
        "classifier": clf,
        "drift": bool(min(mmd["p_value"], clf["p_value"]) < alpha / 2),
    }
    if texts_x and texts_y and clusters > 1:
        report["clusters"] = moved_clusters(X, Y, texts_x, texts_y, clusters, seed)
    return report


def drift_datasets(
    store: Store,
    ref: str,
    new: str,
    by: str = "prompt",
    new_by: str | None = None,
    max_rows: int = 2000,
    alpha: float = 0.05,
    n_perm: int = 500,
    seed: int = 0,
    progress: Any = None,
) -> dict[str, Any]:
    """Drift between two dataset versions (up to `max_rows` seeded random rows of each), stored as a
    `drift-report` artifact with lineage edges to both; returns the report (with its id)."""
    from alignflow.data.curation.dedup import embed

    for arg, val in (("--by", by), ("--new-by", new_by or by)):
        if val not in BY_CHOICES:
            raise CurationError(f"{arg} must be one of {', '.join(BY_CHOICES)}, got {val!r}")
    if max_rows < 4:
        raise CurationError(f"--max-rows must be at least 4, got {max_rows}")
    rid, _, _, rows_r, _ = load(store, ref)
    nid, _, _, rows_n, _ = load(store, new)
    rng = np.random.default_rng(seed)
    texts = []
    for rows, b in ((rows_r, by), (rows_n, new_by or by)):
        idx = sorted(rng.choice(len(rows), size=min(max_rows, len(rows)), replace=False).tolist())
        texts.append([row_text(rows[i], b) for i in idx])
    X = embed(texts[0], progress=progress)
    Y = embed(texts[1], progress=progress)
    report = drift_report(X, Y, texts[0], texts[1], alpha=alpha, n_perm=n_perm, seed=seed)
    report.update(ref=rid, new=nid, by=by, new_by=new_by or by)
    report["id"] = store.put_json(
        report, kind="drift-report", name=f"drift-{rid[:8]}-{nid[:8]}", parents=[(rid, "ref"), (nid, "new")]
    )
    return report


def is_drift(report: dict[str, Any], fail_above: float | None = None) -> bool:
    """The gate's verdict: either test significant, or (with `fail_above`) the classifier AUC above that bar."""
    return bool(report["drift"] or (fail_above is not None and report["classifier"]["auc"] > fail_above))


DRIFT_STAGE_PARAMS = {
    "ref",
    "new",
    "by",
    "new_by",
    "alpha",
    "fail_above",
    "on_drift",
    "max_rows",
    "permutations",
    "seed",
}


def drift_stage(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A pipeline gate (``call: alignflow.data.curation.drift:drift_stage``): drift between ``params.ref`` and
    ``params.new`` (dataset ids or names, e.g. ``${data.train}``); on drift the stage fails
    (``on_drift: fail``, the default: the pipeline stops before training on shifted data) or logs a warning
    (``on_drift: warn``). Outputs the report id, the verdict and both tests' p-values."""
    unknown = set(params) - DRIFT_STAGE_PARAMS
    if unknown:
        raise CurationError(
            f"{ctx.stage}: unknown drift parameter(s) {sorted(unknown)}; known: {sorted(DRIFT_STAGE_PARAMS)}"
        )
    for key in ("ref", "new"):
        if not params.get(key):
            raise CurationError(f"{ctx.stage}: params.{key} is required (a dataset id or name)")
    action = params.get("on_drift", "fail")
    if action not in ("fail", "warn"):
        raise CurationError(f"{ctx.stage}: params.on_drift must be fail or warn, got {action!r}")
    report = drift_datasets(
        ctx.store,
        str(params["ref"]),
        str(params["new"]),
        by=params.get("by", "prompt"),
        new_by=params.get("new_by"),
        max_rows=int(params.get("max_rows", 2000)),
        alpha=float(params.get("alpha", 0.05)),
        n_perm=int(params.get("permutations", 500)),
        seed=int(params.get("seed", 0)),
    )
    drifted = is_drift(report, params.get("fail_above"))
    summary = (
        f"MMD p = {report['mmd']['p_value']:.4f}, classifier AUC {report['classifier']['auc']:.3f} "
        f"(p = {report['classifier']['p_value']:.4g}); report {report['id'][:12]}"
    )
    if drifted and action == "fail":
        raise CurationError(f"{ctx.stage}: drift between {params['ref']} and {params['new']}: {summary}")
    if drifted:
        ctx.log(f"warning: {ctx.stage}: drift between {params['ref']} and {params['new']}: {summary}")
    return {
        "report": report["id"],
        "drift": drifted,
        "mmd_p_value": report["mmd"]["p_value"],
        "classifier_auc": report["classifier"]["auc"],
    }
