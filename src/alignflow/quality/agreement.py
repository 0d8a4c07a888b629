"""Inter-annotator agreement coefficients as pure functions, plus helpers that group a judgments table.

Array conventions: a *reliability matrix* has shape (n_raters, n_units) with `None`/NaN for a missing value;
a *label pair* is two equal-length sequences (one per rater, aligned by unit); a *count table* has shape
(n_units, n_categories) holding how many raters chose each category.

Scalar functions return a float or `Undefined(reason)` (e.g. kappa when chance agreement is 1); table
helpers put `None` plus a reason in a `<stat>_note` column. Nothing returns NaN.

References:
    Cohen (1960), A coefficient of agreement for nominal scales, Educ. Psychol. Meas. 20(1).
    Fleiss (1971), Measuring nominal scale agreement among many raters, Psychol. Bull. 76(5).
    Krippendorff (2011), Computing Krippendorff's alpha-reliability, Annenberg School Working Paper
        (coincidence-matrix form, eqs. for o_ck, n_c and the metric differences delta^2).
    Kendall (1938), A new measure of rank correlation, Biometrika 30.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from alignflow.quality.schema import Undefined, nan_to_none, split_value

Level = Literal["nominal", "ordinal", "interval", "ranking"]

__all__ = [
    "percent_agreement",
    "cohen_kappa",
    "cohen_kappa_matrix",
    "fleiss_kappa",
    "fleiss_table",
    "krippendorff_alpha",
    "kendall_tau_distance",
    "reliability_matrix",
    "agreement_summary",
    "agreement_by",
    "agreement_over_time",
]


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return False


def percent_agreement(data: Sequence[Sequence[Any]] | np.ndarray) -> float | Undefined:
    """Mean pairwise percent agreement over units with at least two values.

    For unit u with m_u values, agreement is the share of its m_u(m_u-1)/2 rater pairs that agree; the result
    is the mean over units. With two raters this is the plain share of units where they agree.

    Args:
        data: reliability matrix, shape (n_raters, n_units), missing values as None/NaN. Values may be lists
            (rankings), compared for exact equality.
    """
    columns = list(zip(*data, strict=True)) if len(data) else []
    scores = []
    for column in columns:
        values = [_key(v) for v in column if not _missing_value(v)]
        m = len(values)
        if m < 2:
            continue
        agree = sum(a == b for a, b in itertools.combinations(values, 2))
        scores.append(agree / (m * (m - 1) / 2))
    if not scores:
        return Undefined("no unit has two or more judgments")
    return float(np.mean(scores))


def _missing_value(v: Any) -> bool:
    if isinstance(v, (list, tuple, np.ndarray)):
        return False
    return _missing(v)


def _key(v: Any) -> Hashable:
    if isinstance(v, (list, tuple, np.ndarray)):
        return tuple(str(x) for x in v)
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def cohen_kappa(
    labels_a: Sequence[Any], labels_b: Sequence[Any], weights: Literal["linear", "quadratic"] | None = None
) -> float | Undefined:
    """Cohen's kappa between two raters, kappa = (p_o - p_e) / (1 - p_e) (Cohen 1960, eq. 1).

    With `weights`, the weighted form kappa_w = 1 - sum(w * O) / sum(w * E) with w_ij = |i-j| or (i-j)^2 over
    the sorted categories (Cohen 1968), as in `sklearn.metrics.cohen_kappa_score`.

    Args:
        labels_a, labels_b: shape (n_units,), the two raters' labels on the same units. Missing values (None/NaN)
            drop the unit.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(
            f"cohen_kappa: rater label sequences differ in length ({len(labels_a)} vs {len(labels_b)})"
        )
    pairs = [(a, b) for a, b in zip(labels_a, labels_b, strict=True) if not _missing(a) and not _missing(b)]
    if not pairs:
        return Undefined("the two raters share no units")
    cats = sorted({_key(x) for p in pairs for x in p}, key=_sort_key)
    index = {c: i for i, c in enumerate(cats)}
    k = len(cats)
    confusion = np.zeros((k, k))
    for a, b in pairs:
        confusion[index[_key(a)], index[_key(b)]] += 1
    n = confusion.sum()
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0)) / n
    if weights is None:
        w = 1.0 - np.eye(k)
    else:
        diff = np.abs(np.subtract.outer(np.arange(k), np.arange(k))).astype(float)
        w = diff if weights == "linear" else diff**2
    denom = float((w * expected).sum())
    if denom == 0.0:
        return Undefined(f"chance agreement is 1: both raters used a single identical category ({cats[0]!r})")
    return float(1.0 - (w * confusion).sum() / denom)


def _sort_key(v: Any) -> tuple[int, Any]:
    # Numbers sort numerically, everything else as text, so mixed categories never raise.
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, str(v))


def fleiss_table(data: Sequence[Sequence[Any]] | np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Turn a reliability matrix (n_raters, n_units) into a count table (n_units, n_categories) and categories.

    Units with fewer than two values are dropped (they carry no agreement information).
    """
    columns = [[_key(v) for v in col if not _missing_value(v)] for col in zip(*data, strict=True)]
    columns = [c for c in columns if len(c) >= 2]
    cats = sorted({v for c in columns for v in c}, key=_sort_key)
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(columns), len(cats)), dtype=float)
    for u, col in enumerate(columns):
        for v in col:
            table[u, index[v]] += 1
    return table, cats


def fleiss_kappa(table: np.ndarray) -> float | Undefined:
    """Fleiss' kappa from a count table, kappa = (P_bar - P_e) / (1 - P_e) (Fleiss 1971, eqs. 2-9).

    P_i = (sum_j n_ij^2 - n) / (n (n - 1)) per unit, P_bar their mean, p_j = sum_i n_ij / (N n) and
    P_e = sum_j p_j^2. Every unit must have the same number n of ratings, as the statistic assumes.

    Args:
        table: shape (n_units, n_categories), counts n_ij.
    """
    table = np.asarray(table, dtype=float)
    if table.ndim != 2 or table.shape[0] == 0:
        return Undefined("no units")
    per_unit = table.sum(axis=1)
    n = per_unit[0]
    if not np.all(per_unit == n):
        raise ValueError(
            f"fleiss_kappa: every unit needs the same number of ratings; got between {per_unit.min():g} and "
            f"{per_unit.max():g} (use krippendorff_alpha for missing data)"
        )
    if n < 2:
        return Undefined("fewer than two ratings per unit")
    n_units = table.shape[0]
    p_unit = ((table**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_unit.mean()
    p_j = table.sum(axis=0) / (n_units * n)
    p_e = float((p_j**2).sum())
    if p_e >= 1.0:
        return Undefined("all ratings fall in one category, so chance agreement is 1")
    return float((p_bar - p_e) / (1.0 - p_e))


def kendall_tau_distance(rank_a: Sequence[Any], rank_b: Sequence[Any], normalize: bool = True) -> float:
    """Kendall tau distance between two rankings of the same ids (best first): the number of discordant pairs.

    Normalised by n(n-1)/2 to [0, 1] when `normalize` (0 = identical order, 1 = reversed).
    """
    a, b = [str(x) for x in rank_a], [str(x) for x in rank_b]
    if sorted(a) != sorted(b):
        raise ValueError(f"kendall_tau_distance: rankings cover different ids: {a} vs {b}")
    pos = {x: i for i, x in enumerate(b)}
    order = [pos[x] for x in a]
    n = len(order)
    discordant = sum(1 for i, j in itertools.combinations(range(n), 2) if order[i] > order[j])
    if not normalize:
        return float(discordant)
    return discordant / (n * (n - 1) / 2) if n > 1 else 0.0


def krippendorff_alpha(
    data: Sequence[Sequence[Any]] | np.ndarray,
    level: Level | Callable[[Any, Any], float] = "nominal",
) -> float | Undefined:
    """Krippendorff's alpha for any number of raters with missing data (Krippendorff 2011).

    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c,k} o_ck delta^2_ck / sum_{c,k} n_c n_k delta^2_ck, where
    o_ck = sum_u (number of c-k pairs in unit u) / (m_u - 1) is the coincidence matrix over pairable units
    (m_u >= 2 values), n_c = sum_k o_ck and n = sum_c n_c. The difference function delta^2 is
    nominal: [c != k]; interval: (c - k)^2; ordinal: (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2 over the sorted
    values; ranking: the normalised Kendall tau distance between two rankings (a metric in [0, 1]).
    A callable `level` is used as delta^2 directly.

    Args:
        data: reliability matrix, shape (n_raters, n_units); None/NaN mark missing values.
    """
    columns = (
        [[v for v in col if not _missing_value(v)] for col in zip(*data, strict=True)] if len(data) else []
    )
    columns = [c for c in columns if len(c) >= 2]
    if not columns:
        return Undefined("no unit has two or more judgments")
    keyed = [[_key(v) for v in c] for c in columns]
    values = sorted({v for c in keyed for v in c}, key=_sort_key)
    if len(values) == 1:
        return Undefined(f"all judgments have the same value ({values[0]!r}); expected disagreement is 0")
    index = {v: i for i, v in enumerate(values)}
    k = len(values)
    coincidence = np.zeros((k, k))
    for col in keyed:
        m = len(col)
        counts = np.bincount([index[v] for v in col], minlength=k).astype(float)
        # Pairs within a unit, ordered, excluding self-pairs: counts_c * counts_k - [c == k] * counts_c.
        coincidence += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = coincidence.sum(axis=0)
    n = n_c.sum()
    delta2 = _delta2(values, n_c, level)
    d_e = float((np.outer(n_c, n_c) * delta2).sum())
    if d_e == 0.0:
        return Undefined("expected disagreement is 0")
    return float(1.0 - (n - 1) * (coincidence * delta2).sum() / d_e)


def _delta2(values: list[Any], n_c: np.ndarray, level: Level | Callable[[Any, Any], float]) -> np.ndarray:
    k = len(values)
    if callable(level):
        return np.array([[float(level(a, b)) for b in values] for a in values])
    if level == "nominal":
        return 1.0 - np.eye(k)
    if level == "interval":
        try:
            x = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"krippendorff_alpha: interval level needs numeric values, got {values[:5]}"
            ) from exc
        return np.subtract.outer(x, x) ** 2
    if level == "ordinal":
        cum = np.cumsum(n_c)
        # sum_{g=c..k} n_g for c <= k is cum[k] - cum[c] + n_c[c].
        i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        between = cum[hi] - cum[lo] + n_c[lo]
        return (between - (n_c[i] + n_c[j]) / 2.0) ** 2
    if level == "ranking":
        return np.array([[kendall_tau_distance(a, b) for b in values] for a in values])
    raise ValueError(
        f"krippendorff_alpha: unknown level {level!r}; expected nominal, ordinal, interval or ranking"
    )


def cohen_kappa_matrix(matrix: pd.DataFrame, min_overlap: int = 1) -> pd.DataFrame:
    """Cohen's kappa for every pair of raters in a (raters x units) frame from `reliability_matrix`.

    Returns a long table with columns rater_a, rater_b, n_shared, kappa (float or None), kappa_note.
    """
    rows = []
    raters = list(matrix.index)
    for a, b in itertools.combinations(raters, 2):
        va, vb = matrix.loc[a].to_numpy(dtype=object), matrix.loc[b].to_numpy(dtype=object)
        shared = [i for i in range(len(va)) if not _missing_value(va[i]) and not _missing_value(vb[i])]
        if len(shared) < min_overlap:
            value: float | Undefined = Undefined(f"only {len(shared)} shared units (< {min_overlap})")
        else:
            value = cohen_kappa([_key(va[i]) for i in shared], [_key(vb[i]) for i in shared])
        kappa, note = split_value(value)
        rows.append({"rater_a": a, "rater_b": b, "n_shared": len(shared), "kappa": kappa, "kappa_note": note})
    return nan_to_none(pd.DataFrame(rows, columns=["rater_a", "rater_b", "n_shared", "kappa", "kappa_note"]))


def reliability_matrix(judgments: pd.DataFrame, label_column: str = "label") -> pd.DataFrame:
    """Pivot a validated judgments table (one dimension) into a raters x units object frame (None = missing)."""
    if judgments["dimension"].nunique() > 1:
        raise ValueError(
            "reliability_matrix: judgments mix dimensions "
            f"{sorted(judgments['dimension'].unique())}; select one dimension first"
        )
    raters = sorted(judgments["annotator_id"].unique())
    units = sorted(judgments["item_id"].unique())
    r_index = {r: i for i, r in enumerate(raters)}
    u_index = {u: i for i, u in enumerate(units)}
    out = np.full((len(raters), len(units)), None, dtype=object)
    for r, u, v in zip(judgments["annotator_id"], judgments["item_id"], judgments[label_column], strict=True):
        out[r_index[r], u_index[u]] = v
    return pd.DataFrame(
        out, index=pd.Index(raters, name="annotator_id"), columns=pd.Index(units, name="item_id")
    )


_LEVEL_BY_KIND: dict[str, Level] = {"pairwise": "nominal", "rating": "interval", "ranking": "ranking"}


def agreement_summary(judgments: pd.DataFrame, level: Level | None = None) -> dict[str, Any]:
    """Agreement figures for one dimension of a validated judgments table.

    Returns a dict: n_items, n_annotators, n_judgments, percent_agreement, fleiss_kappa (only when every item
    has the same number of judgments, nominal data), alpha (level by kind: pairwise nominal, rating interval,
    ranking Kendall distance unless `level` is given), each with a `<name>_note` reason when undefined.
    """
    kinds = judgments["kind"].unique()
    if len(kinds) > 1:
        raise ValueError(f"agreement_summary: mixed judgment kinds {sorted(kinds)}; select one kind first")
    kind = kinds[0] if len(kinds) else "pairwise"
    level = level or _LEVEL_BY_KIND[kind]
    out: dict[str, Any] = {
        "n_items": int(judgments["item_id"].nunique()),
        "n_annotators": int(judgments["annotator_id"].nunique()),
        "n_judgments": len(judgments),
        "level": level,
    }
    if out["n_annotators"] < 2:
        reason = f"only {out['n_annotators']} annotator(s)"
        for name in ("percent_agreement", "fleiss_kappa", "alpha"):
            out[name], out[f"{name}_note"] = None, reason
        return out
    matrix = reliability_matrix(judgments).to_numpy(dtype=object)
    out["percent_agreement"], out["percent_agreement_note"] = split_value(percent_agreement(matrix))
    if kind == "ranking":
        out["fleiss_kappa"], out["fleiss_kappa_note"] = None, "not defined for rankings"
    else:
        table, _ = fleiss_table(matrix)
        sizes = set(table.sum(axis=1).tolist())
        if len(sizes) > 1:
            out["fleiss_kappa"], out["fleiss_kappa_note"] = None, "items have unequal numbers of judgments"
        else:
            out["fleiss_kappa"], out["fleiss_kappa_note"] = split_value(fleiss_kappa(table))
    out["alpha"], out["alpha_note"] = split_value(krippendorff_alpha(matrix, level))
    return out


def agreement_by(judgments: pd.DataFrame, by: str | list[str], level: Level | None = None) -> pd.DataFrame:
    """`agreement_summary` per group and dimension (e.g. `by="pod"`, or a `project` column).

    Judgments whose group value is missing form the group "(none)".
    """
    keys = [by] if isinstance(by, str) else list(by)
    df = judgments.copy()
    for key in keys:
        if key not in df.columns:
            raise ValueError(f"agreement_by: no column {key!r} in judgments (have {list(df.columns)})")
        df[key] = df[key].astype(object).where(df[key].notna(), "(none)")
    rows = []
    for group, part in df.groupby(keys + ["dimension", "kind"], sort=True, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        row = dict(zip(keys + ["dimension", "kind"], group, strict=True))
        row.update(agreement_summary(part, level))
        rows.append(row)
    return nan_to_none(pd.DataFrame(rows))


def agreement_over_time(
    judgments: pd.DataFrame, freq: str = "7D", level: Level | None = None
) -> pd.DataFrame:
    """`agreement_summary` per time window of `created_at` (pandas frequency string, e.g. "1D", "7D").

    An item belongs to the window of its first judgment, so all of its judgments are compared together.
    """
    if judgments["created_at"].isna().all():
        raise ValueError("agreement_over_time: no created_at timestamps in judgments")
    df = judgments[judgments["created_at"].notna()].copy()
    first = df.groupby("item_id")["created_at"].transform("min")
    df["window"] = first.dt.floor(freq)
    return agreement_by(df, "window", level)
