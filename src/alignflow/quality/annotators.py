"""Per-annotator quality figures: gold accuracy, leave-one-out agreement, model skills, position bias,
speed outliers, drift and QA re-rating discrepancy.

Every function takes a validated judgments table (`alignflow.quality.schema.validate_judgments`) and returns a
DataFrame with one row per annotator (or pod); undefined figures are None with a reason in a `note` column.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from alignflow.quality.agreement import _key
from alignflow.quality.schema import nan_to_none


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Agresti & Coull 1998, eq. 2).

    centre = (p + z^2/2n) / (1 + z^2/n), half-width = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    """
    if n <= 0:
        raise ValueError("wilson_interval: n must be positive")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _same(a: Any, b: Any) -> bool:
    return _key(a) == _key(b)


def gold_accuracy(
    judgments: pd.DataFrame, last_n: int | None = None, z: float = 1.959963984540054
) -> pd.DataFrame:
    """Accuracy on gold items per annotator, over each annotator's `last_n` most recent gold judgments.

    Columns: annotator_id, n_gold, gold_correct, gold_accuracy, gold_ci_low, gold_ci_high (Wilson), gold_note.
    Annotators without gold judgments get None and a note.
    """
    gold = judgments[judgments["is_gold"]].copy()
    gold = gold.sort_values("created_at", kind="stable", na_position="first")
    gold["correct"] = [_same(a, b) for a, b in zip(gold["label"], gold["gold_label"], strict=True)]
    rows = []
    for ann in sorted(judgments["annotator_id"].unique()):
        part = gold[gold["annotator_id"] == ann]
        if last_n is not None:
            part = part.tail(last_n)
        n = len(part)
        if n == 0:
            rows.append(
                {
                    "annotator_id": ann,
                    "n_gold": 0,
                    "gold_correct": 0,
                    "gold_accuracy": None,
                    "gold_ci_low": None,
                    "gold_ci_high": None,
                    "gold_note": "no gold judgments",
                }
            )
            continue
        k = int(part["correct"].sum())
        lo, hi = wilson_interval(k, n, z)
        rows.append(
            {
                "annotator_id": ann,
                "n_gold": n,
                "gold_correct": k,
                "gold_accuracy": k / n,
                "gold_ci_low": lo,
                "gold_ci_high": hi,
                "gold_note": "",
            }
        )
    return nan_to_none(pd.DataFrame(rows))


def loo_consensus_agreement(judgments: pd.DataFrame) -> pd.DataFrame:
    """Per judgment: does it match the majority of the OTHER annotators on the same item and dimension?

    Gold items are included. The others' majority must be unique; judgments whose item has no other annotator,
    or whose others are split evenly, get `agrees = None`. Labels are compared as categories (exact match).

    Returns the judgments with columns `loo_label` and `agrees` added.
    """
    df = judgments.copy()
    df["_key"] = [_key(v) for v in df["label"]]
    df["_unit"] = list(zip(df["item_id"], df["dimension"], strict=True))
    counts = df.groupby(["_unit", "_key"]).size()
    by_unit: dict[Any, dict[Any, int]] = {}
    for (unit, key), c in counts.items():
        by_unit.setdefault(unit, {})[key] = int(c)
    loo_labels: list[Any] = []
    agrees: list[Any] = []
    for unit, key in zip(df["_unit"], df["_key"], strict=True):
        others = dict(by_unit[unit])
        others[key] -= 1
        best = max(others.values())
        if best == 0:
            loo_labels.append(None)
            agrees.append(None)
            continue
        winners = [k for k, c in others.items() if c == best]
        if len(winners) > 1:
            loo_labels.append(None)
            agrees.append(None)
            continue
        loo_labels.append(winners[0])
        agrees.append(bool(winners[0] == key))
    df["loo_label"] = loo_labels
    df["agrees"] = agrees
    return df.drop(columns=["_key", "_unit"])


def loo_agreement(judgments: pd.DataFrame) -> pd.DataFrame:
    """Agreement of each annotator with the leave-one-out majority of the others.

    Columns: annotator_id, pod, n_compared, loo_agreement, loo_note.
    """
    df = loo_consensus_agreement(judgments)
    rows = []
    for ann, part in df.groupby("annotator_id", sort=True):
        compared = part["agrees"].dropna()
        pod = part["pod"].dropna()
        row = {"annotator_id": ann, "pod": pod.iat[0] if len(pod) else None, "n_compared": len(compared)}
        if len(compared) == 0:
            row.update(loo_agreement=None, loo_note="no item with a clear majority among other annotators")
        else:
            row.update(loo_agreement=float(compared.astype(bool).mean()), loo_note="")
        rows.append(row)
    return nan_to_none(pd.DataFrame(rows))


def skill_estimates(
    judgments: pd.DataFrame, methods: tuple[str, ...] = ("dawid_skene", "mace")
) -> pd.DataFrame:
    """Model-based annotator skills from crowd-kit (one dimension at a time).

    dawid_skene: ds_skill = sum_c prior_c * P(report c | true c), the expected accuracy under the fitted
        confusion matrix (Dawid & Skene 1979).
    mace: mace_competence = posterior probability of not spamming (Hovy et al. 2013, theta_j).
    noisy_bt: nbt_skill and nbt_bias (probability of choosing the displayed-left item), pairwise only.
    Columns: annotator_id plus one column per figure.
    """
    from alignflow.quality.aggregate import fit

    out = pd.DataFrame({"annotator_id": sorted(judgments["annotator_id"].unique())}).set_index("annotator_id")
    for method in methods:
        _, model = fit(judgments, method)  # type: ignore[arg-type]
        if method == "dawid_skene":
            errors = model.errors_
            priors = model.priors_
            skill = {}
            for ann in out.index:
                total = 0.0
                for c, prior in priors.items():
                    key = (ann, c)
                    total += float(prior) * (float(errors.loc[key, c]) if key in errors.index else 0.0)
                skill[ann] = total
            out["ds_skill"] = pd.Series(skill)
        elif method == "mace":
            workers = pd.unique(judgments["annotator_id"])
            out["mace_competence"] = pd.Series(model.spamming_[:, 1], index=workers)
        elif method == "noisy_bt":
            out["nbt_skill"] = model.skills_
            out["nbt_bias"] = model.biases_
        else:
            raise ValueError(f"skill_estimates: no skill figure for method {method!r}")
    return nan_to_none(out.reset_index())


def position_bias(judgments: pd.DataFrame) -> pd.DataFrame:
    """Rate of choosing the displayed-left response among decisive pairwise judgments, with a two-sided exact
    binomial test against 0.5.

    Left was chosen when (label == "A") differs from `shown_swapped` (A is on the left unless swapped).
    Columns: annotator_id, n_decisive, left_rate, left_p_value, position_note.
    """
    df = judgments[(judgments["kind"] == "pairwise") & (judgments["label"] != "tie")]
    left = (df["label"] == "A").to_numpy() != df["shown_swapped"].to_numpy(dtype=bool)
    df = df.assign(_left=left)
    rows = []
    for ann in sorted(judgments["annotator_id"].unique()):
        part = df[df["annotator_id"] == ann]
        n = len(part)
        if n == 0:
            rows.append(
                {
                    "annotator_id": ann,
                    "n_decisive": 0,
                    "left_rate": None,
                    "left_p_value": None,
                    "position_note": "no decisive pairwise judgments",
                }
            )
            continue
        k = int(part["_left"].sum())
        p = float(stats.binomtest(k, n, 0.5).pvalue)
        rows.append(
            {"annotator_id": ann, "n_decisive": n, "left_rate": k / n, "left_p_value": p, "position_note": ""}
        )
    return nan_to_none(pd.DataFrame(rows))


def duration_outliers(judgments: pd.DataFrame, threshold: float = 3.5) -> pd.DataFrame:
    """Annotators whose median time per task is an outlier: robust z of the median log duration.

    z = 0.6745 (x - median(x)) / MAD(x) over annotators, with x the annotator's median log duration
    (Iglewicz & Hoaglin 1993 modified z-score). Columns: annotator_id, n_timed, median_duration_s,
    duration_z, too_fast, too_slow, duration_note.
    """
    df = judgments[judgments["duration_s"].notna() & (judgments["duration_s"] > 0)]
    med = df.groupby("annotator_id")["duration_s"].agg(["size", "median"])
    out = pd.DataFrame({"annotator_id": sorted(judgments["annotator_id"].unique())}).set_index("annotator_id")
    out["n_timed"] = med["size"].reindex(out.index).fillna(0).astype(int)
    out["median_duration_s"] = med["median"].reindex(out.index)
    logs = np.log(med["median"])
    mad = float(np.median(np.abs(logs - np.median(logs)))) if len(logs) else 0.0
    notes, zs = [], []
    for ann in out.index:
        if ann not in logs.index:
            zs.append(None)
            notes.append("no durations")
        elif mad == 0.0:
            zs.append(None)
            notes.append(
                "median absolute deviation is 0 (fewer than 3 timed annotators or identical medians)"
            )
        else:
            zs.append(0.6745 * float(logs[ann] - np.median(logs)) / mad)
            notes.append("")
    out["duration_z"] = zs
    out["too_fast"] = [z is not None and z < -threshold for z in zs]
    out["too_slow"] = [z is not None and z > threshold for z in zs]
    out["median_duration_s"] = [None if pd.isna(v) else float(v) for v in out["median_duration_s"]]
    out["duration_note"] = notes
    return nan_to_none(out.reset_index())


def drift(judgments: pd.DataFrame, recent_fraction: float = 0.3, min_each: int = 10) -> pd.DataFrame:
    """Recent leave-one-out agreement vs the annotator's own earlier history: a two-proportion z-test.

    Each annotator's compared judgments (see `loo_consensus_agreement`) are ordered by `created_at`; the last
    `recent_fraction` form the recent window. z = (p_recent - p_hist) / sqrt(p (1 - p) (1/n_r + 1/n_h)) with the
    pooled p; the p-value is one-sided (a drop). Columns: annotator_id, n_history, agree_history, n_recent,
    agree_recent, drift_z, drift_p_value, drift_note.
    """
    df = loo_consensus_agreement(judgments)
    df = df[df["agrees"].notna()].sort_values("created_at", kind="stable", na_position="first")
    rows = []
    for ann in sorted(judgments["annotator_id"].unique()):
        part = df[df["annotator_id"] == ann]["agrees"].astype(bool).to_numpy()
        n_recent = int(round(len(part) * recent_fraction))
        hist, recent = part[: len(part) - n_recent], part[len(part) - n_recent :]
        row: dict[str, Any] = {
            "annotator_id": ann,
            "n_history": len(hist),
            "n_recent": len(recent),
            "agree_history": None,
            "agree_recent": None,
            "drift_z": None,
            "drift_p_value": None,
        }
        if len(hist) < min_each or len(recent) < min_each:
            row["drift_note"] = f"needs >= {min_each} compared judgments in each window"
            rows.append(row)
            continue
        ph, pr = float(hist.mean()), float(recent.mean())
        pooled = (hist.sum() + recent.sum()) / (len(hist) + len(recent))
        se = math.sqrt(pooled * (1 - pooled) * (1 / len(hist) + 1 / len(recent)))
        row.update(agree_history=ph, agree_recent=pr)
        if se == 0.0:
            row["drift_note"] = "agreement is constant (0 or 1) in both windows"
        else:
            z = (pr - ph) / se
            row.update(drift_z=z, drift_p_value=float(stats.norm.cdf(z)), drift_note="")
        rows.append(row)
    return nan_to_none(pd.DataFrame(rows))


def reviewer_discrepancy(judgments: pd.DataFrame, by: str = "annotator_id") -> pd.DataFrame:
    """Share of QA-reviewed judgments whose `reviewer_label` differs from the annotator's label, per `by`
    ("annotator_id" or "pod"). Columns: <by>, n_reviewed, discrepancy_rate, review_note.
    """
    if by not in judgments.columns:
        raise ValueError(f"reviewer_discrepancy: no column {by!r}")
    reviewed = judgments[
        [v is not None and not (isinstance(v, float) and math.isnan(v)) for v in judgments["reviewer_label"]]
    ]
    groups = judgments[by].astype(object).where(judgments[by].notna(), "(none)")
    rows = []
    for key in sorted(groups.unique(), key=str):
        part = reviewed[groups.loc[reviewed.index] == key]
        if len(part) == 0:
            rows.append(
                {by: key, "n_reviewed": 0, "discrepancy_rate": None, "review_note": "no reviewed judgments"}
            )
            continue
        diff = [not _same(a, b) for a, b in zip(part["label"], part["reviewer_label"], strict=True)]
        rows.append(
            {by: key, "n_reviewed": len(part), "discrepancy_rate": float(np.mean(diff)), "review_note": ""}
        )
    return nan_to_none(pd.DataFrame(rows))


def annotator_table(
    judgments: pd.DataFrame, gold_last_n: int | None = 50, skills: bool = True
) -> pd.DataFrame:
    """All per-annotator figures of this module joined on annotator_id (skills need one dimension)."""
    base = judgments.groupby("annotator_id").agg(
        n_judgments=("item_id", "size"), pod=("pod", lambda s: next((v for v in s if v is not None), None))
    )
    parts = [
        gold_accuracy(judgments, gold_last_n),
        loo_agreement(judgments).drop(columns=["pod"]),
        position_bias(judgments),
        duration_outliers(judgments),
        drift(judgments),
        reviewer_discrepancy(judgments),
    ]
    if skills and judgments["dimension"].nunique() == 1 and not judgments["kind"].eq("ranking").any():
        parts.append(skill_estimates(judgments))
    out = base.reset_index()
    for part in parts:
        out = out.merge(part, on="annotator_id", how="left")
    return nan_to_none(out)
