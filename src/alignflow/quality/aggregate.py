"""Label aggregation through `crowd-kit`: one consensus label, soft label and margin per item.

Methods:
    majority_vote, dawid_skene, glad, mace: classification models over the classes the annotators used.
        For pairwise judgments a tie is its own class ("A", "B", "tie"); the soft label is
        p_a = P(A) + 0.5 * P(tie), i.e. a tie counts half for each side.
    bradley_terry, noisy_bt: pairwise models. Each item's two responses become nodes "<item>::A" and
        "<item>::B"; a decisive vote becomes two wins for the chosen response and a tie one win for each, which
        gives exactly "a tie is half a win" because Bradley-Terry's likelihood is invariant to scaling all
        counts. Rows are fed in DISPLAY order (left = the response shown on the left), so Noisy BT's per-worker
        bias term absorbs position bias. p_a = s_A / (s_A + s_B) for BT (Bradley & Terry 1952, eq. 1) and
        sigmoid(logit s_A - logit s_B) for Noisy BT (Bugakova et al. 2019), whose scores are sigmoids of
        latent utilities.

The output table has columns item_id, dimension, label, p_a, margin, n_votes, method. `label` is the most
probable class; `margin = |2 p_a - 1|` in [0, 1] is how strongly the consensus prefers the winner (0 for an
even split), meant as a per-pair weight or margin for reward-model training with `label` giving the
direction. For non-pairwise labels (ratings as classes) p_a and margin are None.

References:
    Dawid & Skene (1979), Maximum likelihood estimation of observer error-rates using the EM algorithm.
    Whitehill et al. (2009), Whose vote should count more (GLAD). Hovy et al. (2013), Learning whom to trust
    with MACE. Bradley & Terry (1952). Bugakova et al. (2019), Aggregation of pairwise comparisons with
    reduction of biases (Noisy BT).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd

Method = Literal["majority_vote", "dawid_skene", "glad", "mace", "bradley_terry", "noisy_bt"]
CLASSIFICATION_METHODS = ("majority_vote", "dawid_skene", "glad", "mace")
PAIRWISE_METHODS = ("bradley_terry", "noisy_bt")
METHODS = CLASSIFICATION_METHODS + PAIRWISE_METHODS
OUTPUT_COLUMNS = ["item_id", "dimension", "label", "p_a", "margin", "n_votes", "method"]
# crowd-kit's BradleyTerry builds a dense (nodes x nodes) win matrix; items are disjoint components, so fitting
# them in chunks gives the same per-item ratios with bounded memory (each item's ratio is exact after one MM step).
BT_CHUNK_ITEMS = 500


def default_model(method: str, seed: int = 0) -> Any:
    """The crowd-kit model `aggregate` uses for `method`, with alignflow's fixed settings."""
    from crowdkit.aggregation import GLAD, MACE, BradleyTerry, DawidSkene, MajorityVote, NoisyBradleyTerry

    if method == "majority_vote":
        return MajorityVote()
    if method == "dawid_skene":
        return DawidSkene(n_iter=100, tol=1e-5)
    if method == "glad":
        return GLAD(n_iter=100, tol=1e-5, silent=True)
    if method == "mace":
        # One restart, not crowd-kit's several: it initialises every restart from the same integer random_state,
        # so restarts 2..n repeat the first exactly (crowd-kit 1.4.2) and cost n times the one fit's time.
        return MACE(n_restarts=1, n_iter=50, random_state=seed)
    if method == "bradley_terry":
        return BradleyTerry(n_iter=100, tol=1e-5)
    if method == "noisy_bt":
        return NoisyBradleyTerry(n_iter=100, tol=1e-5, random_state=seed)
    raise ValueError(f"unknown aggregation method {method!r}; expected one of {METHODS}")


def to_classification_frame(judgments: pd.DataFrame) -> pd.DataFrame:
    """crowd-kit classification input (`task`, `worker`, `label`) from a validated judgments table."""
    labels = judgments["label"]
    if judgments["kind"].eq("ranking").any():
        raise ValueError("classification aggregation needs pairwise or rating labels, not rankings")
    return pd.DataFrame(
        {
            "task": judgments["item_id"].to_numpy(),
            "worker": judgments["annotator_id"].to_numpy(),
            "label": labels.to_numpy(),
        }
    )


def to_pairwise_frame(judgments: pd.DataFrame) -> pd.DataFrame:
    """crowd-kit pairwise input (`worker`, `left`, `right`, `label` = the winner) from pairwise judgments.

    Display order: left is "<item>::B" when `shown_swapped`. A decisive vote gives two identical rows, a tie one
    row per side (tie = half a win, see the module docstring).
    """
    if not judgments["kind"].eq("pairwise").all():
        raise ValueError("Bradley-Terry aggregation needs pairwise judgments only")
    item = judgments["item_id"].to_numpy(dtype=object)
    node_a = item + "::A"
    node_b = item + "::B"
    swapped = judgments["shown_swapped"].to_numpy(dtype=bool)
    left = np.where(swapped, node_b, node_a)
    right = np.where(swapped, node_a, node_b)
    label = judgments["label"].to_numpy(dtype=object)
    worker = judgments["annotator_id"].to_numpy(dtype=object)
    decisive = label != "tie"
    win = np.where(label == "A", node_a, node_b)
    frames = [
        pd.DataFrame(
            {
                "worker": worker[decisive],
                "left": left[decisive],
                "right": right[decisive],
                "label": win[decisive],
            }
        )
    ] * 2
    ties = ~decisive
    frames += [
        pd.DataFrame({"worker": worker[ties], "left": left[ties], "right": right[ties], "label": left[ties]}),
        pd.DataFrame(
            {"worker": worker[ties], "left": left[ties], "right": right[ties], "label": right[ties]}
        ),
    ]
    return pd.concat(frames, ignore_index=True)


def _one_dimension(judgments: pd.DataFrame) -> str:
    dims = judgments["dimension"].unique()
    if len(dims) != 1:
        raise ValueError(
            f"aggregate: judgments mix dimensions {sorted(dims)}; aggregate one dimension at a time"
        )
    return str(dims[0])


def _p_a_from_probas(probas: pd.DataFrame) -> np.ndarray:
    cols = probas.columns
    p_a = probas["A"].to_numpy(dtype=float) if "A" in cols else np.zeros(len(probas))
    if "tie" in cols:
        p_a = p_a + 0.5 * probas["tie"].to_numpy(dtype=float)
    return p_a


def fit(judgments: pd.DataFrame, method: Method = "dawid_skene", seed: int = 0) -> tuple[pd.DataFrame, Any]:
    """Fit one crowd-kit model; return the aggregate table (see module docstring) and the fitted model."""
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; expected one of {METHODS}")
    if judgments.empty:
        raise ValueError("aggregate: no judgments")
    dimension = _one_dimension(judgments)
    n_votes = judgments.groupby("item_id").size()
    pairwise = bool(judgments["kind"].eq("pairwise").all())
    model = default_model(method, seed)
    if method in CLASSIFICATION_METHODS:
        model.fit(to_classification_frame(judgments))
        probas = model.probas_.fillna(0.0)
        labels = model.labels_
        items = labels.index.to_numpy()
        p_a = _p_a_from_probas(probas.loc[items]) if pairwise else None
        out = pd.DataFrame({"item_id": items, "label": labels.to_numpy()})
    else:
        pair_frame = to_pairwise_frame(judgments)
        if method == "bradley_terry":
            scores = _fit_bt_chunked(model, pair_frame)
            s_a = scores.reindex(pd.Index(n_votes.index + "::A")).to_numpy(dtype=float)
            s_b = scores.reindex(pd.Index(n_votes.index + "::B")).to_numpy(dtype=float)
            total = s_a + s_b
            p_a = np.divide(s_a, total, out=np.full_like(s_a, 0.5), where=total > 0)
        else:
            model.fit(pair_frame)
            scores = model.scores_
            logit = np.log(scores) - np.log1p(-scores)
            s_a = logit.reindex(pd.Index(n_votes.index + "::A")).to_numpy(dtype=float)
            s_b = logit.reindex(pd.Index(n_votes.index + "::B")).to_numpy(dtype=float)
            p_a = 1.0 / (1.0 + np.exp(-(s_a - s_b)))
        items = n_votes.index.to_numpy()
        label = np.where(p_a > 0.5, "A", np.where(p_a < 0.5, "B", "tie"))
        out = pd.DataFrame({"item_id": items, "label": label})
    out["dimension"] = dimension
    if p_a is not None:
        out["p_a"] = np.clip(p_a, 0.0, 1.0)
        out["margin"] = np.abs(2.0 * out["p_a"] - 1.0)
    else:
        out["p_a"] = None
        out["margin"] = None
    out["n_votes"] = n_votes.reindex(out["item_id"]).to_numpy(dtype=int)
    out["method"] = method
    return out[OUTPUT_COLUMNS].sort_values("item_id", ignore_index=True), model


def _fit_bt_chunked(model: Any, pair_frame: pd.DataFrame) -> pd.Series:
    item = pair_frame["left"].str.rsplit("::", n=1).str[0]
    codes, uniques = pd.factorize(item)
    if len(uniques) <= BT_CHUNK_ITEMS:
        return model.fit(pair_frame).scores_
    parts = []
    for start in range(0, len(uniques), BT_CHUNK_ITEMS):
        mask = (codes >= start) & (codes < start + BT_CHUNK_ITEMS)
        parts.append(model.fit(pair_frame[mask]).scores_)
    return pd.concat(parts)


def aggregate(judgments: pd.DataFrame, method: Method = "dawid_skene", seed: int = 0) -> pd.DataFrame:
    """Aggregate validated judgments (one dimension) into one row per item; see the module docstring.

    For several dimensions, call once per dimension (`aggregate_all` does this).
    """
    return fit(judgments, method, seed)[0]


def aggregate_all(judgments: pd.DataFrame, method: Method = "dawid_skene", seed: int = 0) -> pd.DataFrame:
    """`aggregate` for every (dimension, kind) in the table, concatenated."""
    parts = [
        aggregate(part, method, seed)
        for _, part in judgments.groupby(["dimension", "kind"], sort=True)
        if part["kind"].iat[0] != "ranking"
    ]
    if not parts:
        return pd.DataFrame(columns=OUTPUT_COLUMNS)
    return pd.concat(parts, ignore_index=True)
