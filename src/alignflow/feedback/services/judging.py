"""AI judges as annotators: `run_judge` labels a project's tasks as an account of kind "ai".

The judge leases tasks with `next_task`, sees the candidates in the order the task shows them, and answers with
`submit` (or gives a task back with `skip`), exactly as a person does; so gold accuracy, agreement, the QC
policy's position-bias rule and QA sampling apply to it unchanged. With ``orders="both"`` every pair is also
judged reversed (`alignflow.judges.combine_orders`): agreeing verdicts stand, disagreeing ones are submitted as
ties or dropped (skipped). Each verdict's both-order outcome is journaled as ``judge.verdict`` (the response
row has no field for it), which is what the quality report's order-consistency column reads.

Hybrid routing (``route_uncertain_to_humans``): before leasing, every eligible item is judged in both orders;
items that are order-consistent with confidence >= the threshold are labeled by the judge, the others (most
uncertain first, at most ``human_budget`` per judge and project over all runs) are skipped by the judge and
moved to the top of the human queue. Beyond the budget the judge's label stands. Every decision is journaled
as ``judge.route``.

Because a single account holds one lease at a time (`engine.lease` returns the lease it holds), batching is
done ahead of leasing: with ``orders="both"`` the eligible items are judged in batches of ``batch_size`` and
the verdicts are looked up by the texts each task shows. With ``orders="given"`` the verdict must be on the
displayed order, which is only known once leased, so each task is judged on its own.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignflow.feedback import engine
from alignflow.feedback.fields import INT32_MAX
from alignflow.feedback.journal import record
from alignflow.feedback.models import Assignment, Item, JournalEntry, Project, User
from alignflow.feedback.services.errors import Forbidden, Invalid
from alignflow.feedback.services.projects import get_project, schema_spec
from alignflow.feedback.services.tasks import next_task, skip, submit
from alignflow.feedback.services.users import add_ai_user, judge_username
from alignflow.judges.base import Judge, PairVerdict, Verdict, combine_orders, judge_pairs

Progress = Callable[[str, int, int], None]  # (stage, done, total); stages "judging" and "submitting"
_CHOICE = {0: "left", 1: "right", None: "tie"}


@dataclass
class JudgeRunResult:
    """What one `run_judge` did. Counts are of tasks this run handled (a re-run counts only new ones)."""

    username: str
    spec: str
    leased: int = 0
    submitted: int = 0
    gold_submitted: int = 0
    ties_from_inconsistency: int = 0  # orders disagreed, submitted as "tie" (on_inconsistent="tie")
    dropped: int = 0  # orders disagreed, given back unlabeled (on_inconsistent="drop")
    ties_not_allowed: int = 0  # a tie verdict in a schema without ties: given back unlabeled
    outside_fraction: int = 0
    labeled_confident: int = 0  # routing: confident and order-consistent
    kept_over_budget: int = 0  # routing: uncertain, but the human budget was spent
    routed_to_humans: int = 0
    human_budget: int | None = None
    budget_left: int | None = None  # after this run; None = no limit
    routed_items: list[str] = field(default_factory=list)  # external ids, most uncertain first


def in_fraction(project: str, external_id: str, fraction: float) -> bool:
    """Whether an item is in the judge's deterministic ``fraction`` of the project (hash of the item)."""
    if fraction >= 1.0:
        return True
    u = int(hashlib.sha256(f"{project}/{external_id}".encode()).hexdigest()[:8], 16) / 2**32
    return u < fraction


def _uncertainty_key(pv: PairVerdict) -> tuple[int, float]:
    # Inconsistent verdicts first, then the least confident; no confidence counts as a coin flip.
    return (0 if pv.consistent is False else 1, 0.5 if pv.confidence is None else pv.confidence)


def is_confident(pv: PairVerdict, threshold: float) -> bool:
    """Confident and order-consistent: the judge labels the item itself when routing."""
    return pv.consistent is True and pv.confidence is not None and pv.confidence >= threshold


def _strength(confidence: float | None) -> int:
    if confidence is None:
        return 2
    return 1 if confidence < 0.65 else 2 if confidence < 0.85 else 3


def _dimension_choice(pv: PairVerdict, dim: str, overall: str, allow_tie: bool) -> str:
    """The judge's per-dimension answer when it gave one (both orders combined), else its overall answer."""
    fwd = pv.forward.dimensions.get(dim, -1)
    if fwd == -1:
        return overall
    if pv.reverse is not None:
        rev = pv.reverse.dimensions.get(dim, -1)
        if rev == -1:
            return overall
        back = None if rev is None else 1 - rev
        fwd = fwd if back == fwd else None
    choice = _CHOICE[fwd]
    return overall if choice == "tie" and not allow_tie else choice


def _answer(pv: PairVerdict, spec: Any, schema_version: int, judge_spec: str, seconds: float) -> dict:
    choice = _CHOICE[pv.winner]
    if pv.consistent is None:
        how = "one order asked"
    elif pv.consistent:
        how = "both orders agreed"
    else:
        how = "the two orders disagreed, so a tie"
    conf = "" if pv.confidence is None else f", confidence {pv.confidence:.2f}"
    rationale = f"AI judge {judge_spec}: {how}{conf}."
    if pv.forward.rationale:
        rationale += " " + pv.forward.rationale.strip()
    return {
        "schema_version": schema_version,
        "choice": choice,
        "strength": None if choice == "tie" else _strength(pv.confidence),
        "dimensions": {d: _dimension_choice(pv, d, choice, spec.allow_tie) for d in spec.dimensions},
        "rationale": rationale[:4000],
        "duration_s": round(min(max(seconds, 0.0), 86_400.0), 6),
    }


def _journal(s: Session, actor_id: int, entries: list[tuple[str, str, object, dict]]) -> None:
    engine.begin_write(s)
    try:
        for action, entity, entity_id, data in entries:
            record(s, actor_id, action, entity, entity_id, data)
        s.commit()
    except Exception:
        s.rollback()
        raise


def _eligible_items(s: Session, p: Project, u: User, fraction: float) -> list[Item]:
    """Items the account could still be given (what `engine.lease` would consider), in its fraction."""
    seen = select(Assignment.item_id).where(Assignment.user_id == u.id, Assignment.kind == "annotate")
    q = select(Item).where(Item.project_id == p.id, Item.id.not_in(seen)).order_by(Item.id)
    if u.tier != "expert":
        q = q.where(Item.tier == "standard")
    items = [it for it in s.scalars(q) if it.is_gold or it.slots_taken < p.overlap]
    return [it for it in items if in_fraction(p.name, it.external_id, fraction)]


def _routed_before(s: Session, u: User, p: Project) -> int:
    rows = s.scalars(
        select(JournalEntry.data).where(JournalEntry.action == "judge.route", JournalEntry.actor_id == u.id)
    )
    return sum(1 for d in rows if d.get("project_id") == p.id and d.get("route") == "human")


def _raise_priority(
    s: Session, actor_id: int, item_id: int, priority: int, expert: bool, data: dict[str, Any]
) -> None:
    engine.begin_write(s)
    try:
        item = s.get(Item, item_id)
        item.priority = priority
        if expert:
            item.tier = "expert"
        record(s, actor_id, "judge.route", "item", item_id, {**data, "priority": priority, "tier": item.tier})
        s.commit()
    except Exception:
        s.rollback()
        raise


def run_judge(
    s: Session,
    project: Project | int | str,
    judge: Judge,
    username: str | None = None,
    *,
    fraction: float = 1.0,
    orders: str = "both",
    on_inconsistent: str = "tie",
    route_uncertain_to_humans: bool = False,
    confidence_threshold: float = 0.75,
    human_budget: int | None = None,
    route_to_experts: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
    actor: User | int | str | None = None,
) -> JudgeRunResult:
    """Label `project`'s tasks with `judge` as the ai account `username` (created on first use; default
    `judge_username(judge.spec)`). Commits as it goes (every submit and skip is its own transaction), so an
    interrupted run keeps what it did, and a re-run resumes: the submit's ``client_id`` is derived from the
    assignment, and an item the account already answered or gave back is never leased to it again.

    Args:
        fraction: judge only this deterministic share of the items (`in_fraction`); the rest are given back.
        orders: "both" also asks each pair reversed; "given" only in the displayed order.
        on_inconsistent: "tie" submits a tie when the two orders disagree; "drop" gives the task back.
        route_uncertain_to_humans: see the module docstring; needs ``orders="both"``.
        confidence_threshold: the combined confidence at or above which a consistent verdict is confident.
        human_budget: most items this judge routes to people in this project, over all runs (None: no limit).
        route_to_experts: routed items also go to the expert tier.
        batch_size: pairs per judge call when judging ahead (``orders="both"``).
        seed: seeds the lease draws (display orders, gold mixing), so a run is reproducible.

    Raises:
        Invalid: bad arguments, or the project's schema is not pairwise; Conflict: `username` belongs to a
            person or another judge; Forbidden: the account is disabled or suspended by QC.
    """
    if not 0.0 < fraction <= 1.0:
        raise Invalid(f"fraction: must be in (0, 1], got {fraction}", "fraction")
    if orders not in ("both", "given"):
        raise Invalid(f"orders: must be 'both' or 'given', got {orders!r}", "orders")
    if on_inconsistent not in ("tie", "drop"):
        raise Invalid(f"on_inconsistent: must be 'tie' or 'drop', got {on_inconsistent!r}", "on_inconsistent")
    if route_uncertain_to_humans and orders != "both":
        raise Invalid("routing uncertain items to humans needs orders='both' (order-consistency)", "orders")
    if not 0.5 <= confidence_threshold <= 1.0:
        raise Invalid(f"confidence_threshold: must be in [0.5, 1], got {confidence_threshold}")
    if human_budget is not None and human_budget < 0:
        raise Invalid(f"human_budget: must be >= 0, got {human_budget}", "human_budget")
    if batch_size < 1:
        raise Invalid(f"batch_size: must be >= 1, got {batch_size}", "batch_size")
    p = get_project(s, project)
    spec = schema_spec(s, p)
    if spec.kind != "pairwise":
        raise Invalid(
            f"project {p.name!r}: AI judges answer pairwise schemas only, this one is {spec.kind!r}"
        )
    u = add_ai_user(s, username or judge_username(judge.spec), judge.spec, actor)
    result = JudgeRunResult(username=u.username, spec=u.judge_spec or "", human_budget=human_budget)
    report = progress or (lambda stage, done, total: None)

    # Judge ahead, in batches, in both orders; verdicts keyed by (prompt, first shown, second shown).
    cache: dict[tuple[str, str, str], Verdict] = {}
    ahead: dict[int, PairVerdict] = {}
    eligible = _eligible_items(s, p, u, fraction)
    per_pair_s = 0.0
    if orders == "both" and eligible:
        for start in range(0, len(eligible), batch_size):
            batch = eligible[start : start + batch_size]
            triples = [(it.prompt, it.candidates[0]["text"], it.candidates[1]["text"]) for it in batch]
            t0 = time.perf_counter()
            verdicts = judge_pairs(judge, triples, "both", on_inconsistent)  # type: ignore[arg-type]
            per_pair_s = (time.perf_counter() - t0) / len(batch)
            for it, (prompt, a, b), pv in zip(batch, triples, verdicts, strict=True):
                cache[(prompt, a, b)] = pv.forward
                cache[(prompt, b, a)] = pv.reverse  # type: ignore[assignment]
                ahead[it.id] = pv
            report("judging", min(start + batch_size, len(eligible)), len(eligible))

    routed: dict[int, int] = {}  # item id -> rank (0 = most uncertain)
    uncertain: set[int] = set()
    if route_uncertain_to_humans:
        candidates = [
            it for it in eligible if not it.is_gold and not is_confident(ahead[it.id], confidence_threshold)
        ]
        candidates.sort(key=lambda it: (_uncertainty_key(ahead[it.id]), it.id))
        uncertain = {it.id for it in candidates}
        left = None if human_budget is None else max(0, human_budget - _routed_before(s, u, p))
        chosen = candidates if left is None else candidates[:left]
        routed = {it.id: rank for rank, it in enumerate(chosen)}
        result.routed_items = [it.external_id for it in chosen]
        result.budget_left = left
    top = int(s.scalar(select(func.max(Item.priority)).where(Item.project_id == p.id)) or 0)

    rng = random.Random(seed)
    total = len(eligible)
    while True:
        try:
            task = next_task(s, u, p, rng)
        except Forbidden as exc:
            raise Forbidden(f"judge account {u.username!r} in project {p.name!r}: {exc}") from exc
        if task is None:
            break
        result.leased += 1
        report("submitting", result.leased, max(total, result.leased))
        aid = task["assignment_id"]
        item = s.get(Item, s.get(Assignment, aid).item_id)
        base = {
            "project_id": p.id,
            "item_id": item.id,
            "external_id": item.external_id,
            "judge": u.judge_spec,
        }
        if not in_fraction(p.name, item.external_id, fraction):
            skip(s, u, aid, f"outside the judge's fraction {fraction:g} of the items")
            result.outside_fraction += 1
            continue
        if item.id in routed:
            pv = ahead[item.id]
            rank = routed[item.id]
            data = {
                **base,
                "route": "human",
                "reason": "order-inconsistent"
                if pv.consistent is False
                else "below the confidence threshold",
                "confidence": pv.confidence,
                "consistent": pv.consistent,
                "rank": rank,
            }
            skip(s, u, aid, f"routed to humans: {data['reason']}")
            _raise_priority(
                s, u.id, item.id, min(INT32_MAX, top + len(routed) - rank), route_to_experts, data
            )
            result.routed_to_humans += 1
            if result.budget_left is not None:
                result.budget_left -= 1
            continue

        shown = (task["prompt"], task["candidates"][0]["text"], task["candidates"][1]["text"])
        flipped = (shown[0], shown[2], shown[1])
        if orders == "both" and shown in cache and flipped in cache:
            pv = combine_orders(cache[shown], cache[flipped], on_inconsistent)  # type: ignore[arg-type]
            seconds = per_pair_s
        else:
            t0 = time.perf_counter()
            pv = judge_pairs(judge, [shown], orders, on_inconsistent)[0]  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
        entries: list[tuple[str, str, object, dict]] = []
        if route_uncertain_to_humans and not item.is_gold:
            confident = item.id not in uncertain and is_confident(pv, confidence_threshold)
            if confident:
                reason = "confident and order-consistent"
            elif item.id in ahead:
                reason = "uncertain, but the human budget is spent"
            else:
                reason = "uncertain, but leased after the routing pass (new or freed item)"
            entries.append(
                ("judge.route", "item", item.id, {**base, "route": "judge", "reason": reason,
                                                  "confidence": pv.confidence, "consistent": pv.consistent})
            )  # fmt: skip
            if confident:
                result.labeled_confident += 1
            else:
                result.kept_over_budget += 1
        # Journaled before the submit: a crash in between leaves the lease, which the re-run resumes.
        entries.append(
            ("judge.verdict", "assignment", aid, {**base, "orders": orders, "consistent": pv.consistent,
                                                 "confidence": pv.confidence, "dropped": pv.dropped,
                                                 "label": pv.label, "is_gold": bool(item.is_gold)})
        )  # fmt: skip
        _journal(s, u.id, entries)
        if pv.dropped:
            skip(s, u, aid, "AI judge: the two orders disagreed (dropped)")
            result.dropped += 1
            continue
        if pv.winner is None and not spec.allow_tie:
            skip(s, u, aid, "AI judge: a tie, and this schema does not allow ties")
            result.ties_not_allowed += 1
            continue
        payload = _answer(pv, spec, task["schema_version"], u.judge_spec or "", seconds)
        res = submit(s, u, aid, payload, client_id=f"judge-{aid}")
        if res.created:
            result.submitted += 1
            result.gold_submitted += int(item.is_gold)
            result.ties_from_inconsistency += int(pv.consistent is False)
    return result
