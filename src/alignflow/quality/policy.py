"""QC policy: typed per-project rules turned into actions on annotators by a pure function.

Action vocabulary (what the annotation platform enforces; this module only decides):
    coach: send feedback / guideline material; no change to what the annotator may do.
    restrict: stop assigning new non-gold work until the issue is resolved; existing labels are down-weighted
        or excluded by the caller.
    recertify: the annotator must pass a qualification (gold) round again before regular work.
    suspend: remove from the project pending human review; issued when an annotator triggers restrict-level
        rules from at least `suspend_after` different rules in one evaluation.

`evaluate_policy(judgments, policy)` returns `QCAction`s; persisting them to the journal and enforcing them
belong to the platform (`alignflow.feedback`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field
from scipy import stats

from alignflow.quality import annotators as ann

Action = Literal["coach", "restrict", "recertify", "suspend"]
ACTIONS: tuple[str, ...] = ("coach", "restrict", "recertify", "suspend")
_SEVERITY = {"coach": 0, "recertify": 1, "restrict": 2, "suspend": 3}


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True


class GoldRule(_Rule):
    """Gold accuracy below `min_accuracy` over the last `window` gold items (at least `min_items`).

    With `alpha` set, the accuracy must also be significantly below `min_accuracy`: the one-sided exact binomial
    p-value P(X <= correct | n, min_accuracy) must be < alpha. On 10-20 gold items a bare point estimate flags
    about one good annotator in ten (measured on `simulate_pool`), so the test is on by default; `alpha: null`
    uses the point estimate alone.
    """

    min_accuracy: float = Field(0.7, ge=0, le=1)
    window: int = Field(50, ge=1)
    min_items: int = Field(10, ge=1)
    alpha: float | None = Field(0.05, gt=0, lt=1)
    actions: list[Action] = ["restrict", "recertify"]


class AgreementRule(_Rule):
    """Leave-one-out agreement more than `below_pod_median` under the median of the annotator's pod."""

    below_pod_median: float = Field(0.2, ge=0, le=1)
    min_items: int = Field(20, ge=1)
    actions: list[Action] = ["coach"]


class SkillRule(_Rule):
    """Dawid-Skene expected accuracy below `min_skill` (spammers sit near chance, flippers below it)."""

    min_skill: float = Field(0.62, ge=0, le=1)
    min_items: int = Field(20, ge=1)
    actions: list[Action] = ["restrict"]


class PositionBiasRule(_Rule):
    """Displayed-left rate outside [0.5 - max_deviation, 0.5 + max_deviation] with binomial p < `alpha`.

    Restricts by default: at a 70%+ left rate most of the annotator's choices carry display order, not quality.
    """

    max_deviation: float = Field(0.2, ge=0, le=0.5)
    alpha: float = Field(0.01, gt=0, lt=1)
    actions: list[Action] = ["coach", "restrict"]


class SpeedRule(_Rule):
    """Median time per task with robust z below -`threshold` (too fast to have read the responses)."""

    threshold: float = Field(3.5, gt=0)
    actions: list[Action] = ["coach"]


class DriftRule(_Rule):
    """Recent agreement dropped by more than `min_drop` versus own history, one-sided p < `alpha`."""

    min_drop: float = Field(0.1, ge=0, le=1)
    alpha: float = Field(0.01, gt=0, lt=1)
    recent_fraction: float = Field(0.3, gt=0, lt=1)
    actions: list[Action] = ["coach"]


class ReviewRule(_Rule):
    """QA re-rating discrepancy above `max_discrepancy` over at least `min_items` reviewed judgments."""

    max_discrepancy: float = Field(0.3, ge=0, le=1)
    min_items: int = Field(5, ge=1)
    actions: list[Action] = ["coach"]


class QCPolicy(BaseModel):
    """A project's QC policy; each rule can be disabled with `enabled: false`. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    gold: GoldRule = GoldRule()
    agreement: AgreementRule = AgreementRule()
    skill: SkillRule = SkillRule()
    position_bias: PositionBiasRule = PositionBiasRule()
    speed: SpeedRule = SpeedRule()
    drift: DriftRule = DriftRule()
    review: ReviewRule = ReviewRule()
    suspend_after: int = Field(
        2, ge=1, description="restrict-level rules triggered at once that escalate to suspend"
    )


class QCAction(BaseModel):
    """One decision: `action` for `annotator_id` because of `rule`, with the metric values that triggered it."""

    annotator_id: str
    action: Action
    rule: str
    reason: str
    metrics: dict[str, Any]


def _num(v: Any) -> float | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return float(v)


def evaluate_policy(judgments: pd.DataFrame, policy: QCPolicy | None = None) -> list[QCAction]:
    """Apply `policy` to validated judgments (one dimension for the skill rule; others use all rows).

    Pure: reads only its arguments. Returns actions ordered by annotator, then severity.
    """
    policy = policy or QCPolicy()
    actions: list[QCAction] = []

    def emit(annotator: str, rule: str, acts: list[Action], reason: str, metrics: dict[str, Any]) -> None:
        for act in acts:
            actions.append(
                QCAction(annotator_id=annotator, action=act, rule=rule, reason=reason, metrics=metrics)
            )

    if policy.gold.enabled:
        r = policy.gold
        for row in ann.gold_accuracy(judgments, last_n=r.window).itertuples():
            acc = _num(row.gold_accuracy)
            if acc is None or row.n_gold < r.min_items or acc >= r.min_accuracy:
                continue
            p = float(stats.binom.cdf(row.gold_correct, row.n_gold, r.min_accuracy))
            if r.alpha is not None and p >= r.alpha:
                continue
            emit(
                row.annotator_id,
                "gold",
                r.actions,
                f"gold accuracy {acc:.0%} < {r.min_accuracy:.0%} over the last {row.n_gold} gold items (p={p:.2g})",
                {
                    "gold_accuracy": acc,
                    "n_gold": int(row.n_gold),
                    "p_value": p,
                    "ci_low": row.gold_ci_low,
                    "ci_high": row.gold_ci_high,
                },
            )

    if policy.agreement.enabled:
        r = policy.agreement
        table = ann.loo_agreement(judgments)
        table = table[(table["n_compared"] >= r.min_items) & table["loo_agreement"].notna()]
        pods = table["pod"].astype(object).where(table["pod"].notna(), "(none)")
        for pod, part in table.groupby(pods):
            median = float(part["loo_agreement"].astype(float).median())
            for row in part.itertuples():
                if row.loo_agreement < median - r.below_pod_median:
                    emit(
                        row.annotator_id,
                        "agreement",
                        r.actions,
                        f"agreement {row.loo_agreement:.0%} is more than {r.below_pod_median:.2f} below pod "
                        f"{pod} median {median:.0%}",
                        {
                            "loo_agreement": float(row.loo_agreement),
                            "pod_median": median,
                            "pod": pod,
                            "n_compared": int(row.n_compared),
                        },
                    )

    if (
        policy.skill.enabled
        and judgments["dimension"].nunique() == 1
        and not judgments["kind"].eq("ranking").any()
    ):
        r = policy.skill
        counts = judgments.groupby("annotator_id").size()
        if judgments["annotator_id"].nunique() >= 2:
            for row in ann.skill_estimates(judgments, ("dawid_skene",)).itertuples():
                if counts[row.annotator_id] >= r.min_items and row.ds_skill < r.min_skill:
                    emit(
                        row.annotator_id,
                        "skill",
                        r.actions,
                        f"Dawid-Skene skill {row.ds_skill:.2f} < {r.min_skill:.2f}",
                        {"ds_skill": float(row.ds_skill), "n_judgments": int(counts[row.annotator_id])},
                    )

    if policy.position_bias.enabled:
        r = policy.position_bias
        for row in ann.position_bias(judgments).itertuples():
            rate = _num(row.left_rate)
            if rate is not None and abs(rate - 0.5) > r.max_deviation and row.left_p_value < r.alpha:
                emit(
                    row.annotator_id,
                    "position_bias",
                    r.actions,
                    f"chose the displayed-left response {rate:.0%} of {row.n_decisive} times (p={row.left_p_value:.2g})",
                    {
                        "left_rate": rate,
                        "p_value": float(row.left_p_value),
                        "n_decisive": int(row.n_decisive),
                    },
                )

    if policy.speed.enabled:
        r = policy.speed
        for row in ann.duration_outliers(judgments, r.threshold).itertuples():
            if row.too_fast:
                emit(
                    row.annotator_id,
                    "speed",
                    r.actions,
                    f"median {row.median_duration_s:.1f}s per task, robust z {row.duration_z:.1f}",
                    {"median_duration_s": float(row.median_duration_s), "duration_z": float(row.duration_z)},
                )

    if policy.drift.enabled:
        r = policy.drift
        for row in ann.drift(judgments, r.recent_fraction).itertuples():
            p = _num(row.drift_p_value)
            if p is not None and p < r.alpha and row.agree_history - row.agree_recent > r.min_drop:
                emit(
                    row.annotator_id,
                    "drift",
                    r.actions,
                    f"recent agreement {row.agree_recent:.0%} vs {row.agree_history:.0%} before (p={p:.2g})",
                    {"agree_recent": row.agree_recent, "agree_history": row.agree_history, "p_value": p},
                )

    if policy.review.enabled:
        r = policy.review
        for row in ann.reviewer_discrepancy(judgments).itertuples():
            rate = _num(row.discrepancy_rate)
            if rate is not None and row.n_reviewed >= r.min_items and rate > r.max_discrepancy:
                emit(
                    row.annotator_id,
                    "review",
                    r.actions,
                    f"QA reviewers disagreed on {rate:.0%} of {row.n_reviewed} reviewed judgments",
                    {"discrepancy_rate": rate, "n_reviewed": int(row.n_reviewed)},
                )

    restrict_rules: dict[str, set[str]] = {}
    for a in actions:
        if a.action == "restrict":
            restrict_rules.setdefault(a.annotator_id, set()).add(a.rule)
    for annotator, rules in restrict_rules.items():
        if len(rules) >= policy.suspend_after:
            emit(
                annotator,
                "escalation",
                ["suspend"],
                f"restrict-level rules triggered: {', '.join(sorted(rules))}",
                {"rules": sorted(rules)},
            )
    actions.sort(key=lambda a: (a.annotator_id, _SEVERITY[a.action], a.rule))
    return actions


def flagged_annotators(
    actions: list[QCAction], levels: tuple[str, ...] = ("restrict", "suspend")
) -> set[str]:
    """Annotators with at least one action in `levels` (default: those whose work is stopped)."""
    return {a.annotator_id for a in actions if a.action in levels}
