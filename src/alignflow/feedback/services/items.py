"""Items: normalising and importing rows, the JSONL reader, generation datasets as items, expert routing."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignflow.feedback import engine
from alignflow.feedback.fields import (
    CANDIDATE_ID_CHARS,
    INT32_MAX,
    INT32_MIN,
    ITEM_ID_CHARS,
    MAX_CANDIDATE_CHARS,
    MAX_PROMPT_CHARS,
    first_text_problem,
    text_problem,
)
from alignflow.feedback.journal import record
from alignflow.feedback.models import Item, Project, User
from alignflow.feedback.schema import SchemaSpec
from alignflow.feedback.services.errors import Conflict, Invalid, NotFound
from alignflow.feedback.services.projects import get_project, schema_spec
from alignflow.feedback.services.users import get_user

MAX_META_CHARS = 4096  # an item's meta is bookkeeping (uncertainty figures), not content


def _normalise_item(raw: Any, where: str, spec: SchemaSpec) -> dict[str, Any]:
    """Check one item row (the limits of `fields.py`, the same as the API's `ItemIn`) and normalise it."""
    if not isinstance(raw, dict):
        raise Invalid(f"{where}: expected a JSON object, got {type(raw).__name__}")
    allowed = {"id", "prompt", "candidates", "priority", "gold_label", "ambiguous", "meta"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise Invalid(f"{where}: unknown field(s) {extra}; allowed {sorted(allowed)}")
    for key in ("id", "prompt"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise Invalid(f"{where}: field '{key}' must be a non-empty string")
    if len(raw["id"]) > ITEM_ID_CHARS:
        raise Invalid(f"{where}: field 'id' longer than {ITEM_ID_CHARS} characters")
    if len(raw["prompt"]) > MAX_PROMPT_CHARS:
        raise Invalid(f"{where}: field 'prompt' longer than {MAX_PROMPT_CHARS} characters")
    bad_text = first_text_problem({k: raw[k] for k in ("id", "prompt")})
    if bad_text:
        raise Invalid(f"{where}: field '{bad_text[0]}' {bad_text[1]}")
    cands = raw.get("candidates")
    if not isinstance(cands, list) or not 2 <= len(cands) <= spec.max_candidates:
        raise Invalid(f"{where}: field 'candidates' must be a list of 2..{spec.max_candidates} responses")
    out = [_normalise_candidate(c, f"{where}: candidates[{j}]", j) for j, c in enumerate(cands)]
    if len({c["id"] for c in out}) != len(out):
        raise Invalid(f"{where}: candidate ids repeat")
    gold = raw.get("gold_label")
    if gold is not None:
        if spec.kind == "pairwise":
            ok = isinstance(gold, str) and gold in ("A", "B", "tie")
        else:
            # A list of id strings: a bare string ("ba") or integers would be coerced into a ranking.
            ok = (
                isinstance(gold, list)
                and all(isinstance(g, str) for g in gold)
                and sorted(gold) == sorted(c["id"] for c in out)
            )
        if not ok:
            expect = (
                "'A', 'B' or 'tie'" if spec.kind == "pairwise" else "a list of all candidate ids, best first"
            )
            raise Invalid(f"{where}: field 'gold_label' must be {expect}, got {gold!r}")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not INT32_MIN <= priority <= INT32_MAX:
        raise Invalid(f"{where}: field 'priority' must be an integer in [{INT32_MIN}, {INT32_MAX}]")
    ambiguous = raw.get("ambiguous", False)
    if not isinstance(ambiguous, bool):
        raise Invalid(f"{where}: field 'ambiguous' must be true or false")
    meta = raw.get("meta")
    if meta is not None:
        if not isinstance(meta, dict):
            raise Invalid(f"{where}: field 'meta' must be a JSON object")
        try:
            size = len(json.dumps(meta, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise Invalid(f"{where}: field 'meta' is not JSON ({exc})") from exc
        if size > MAX_META_CHARS:
            raise Invalid(f"{where}: field 'meta' longer than {MAX_META_CHARS} characters as JSON")
    return {
        "external_id": raw["id"],
        "prompt": raw["prompt"],
        "candidates": out,
        "priority": priority,
        "is_gold": gold is not None,
        "gold_label": gold,
        "tier": "expert" if ambiguous else "standard",
        "meta": meta,
    }


def _normalise_candidate(c: Any, where: str, j: int) -> dict[str, Any]:
    if isinstance(c, str):
        c = {"text": c}
    if not isinstance(c, dict) or not isinstance(c.get("text"), str):
        raise Invalid(f"{where} must be a string or an object with a 'text' string")
    extra = sorted(set(c) - {"id", "text", "model", "version", "sampling"})
    if extra:
        raise Invalid(f"{where}: unknown field(s) {extra}")
    if len(c["text"]) > MAX_CANDIDATE_CHARS:
        raise Invalid(f"{where}.text longer than {MAX_CANDIDATE_CHARS} characters")
    c = dict(c)
    for key in ("id", "model", "version"):
        v = c.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            c[key] = v = str(v)  # generation tables may hold numeric model versions or ids
        if v is not None and (not isinstance(v, str) or not v or len(v) > CANDIDATE_ID_CHARS):
            raise Invalid(f"{where}.{key} must be a string of 1..{CANDIDATE_ID_CHARS} characters")
    sampling = c.get("sampling")
    if sampling is not None and not isinstance(sampling, dict):
        raise Invalid(f'{where}.sampling must be an object (e.g. {{"temperature": 0.7}})')
    bad_text = first_text_problem(c)
    if bad_text:
        raise Invalid(f"{where}.{bad_text[0]} {bad_text[1]}")
    return {
        "id": c.get("id") or f"c{j}",
        "text": c["text"],
        "model": c.get("model"),
        "version": c.get("version"),
        "sampling": sampling or {},
    }


def import_items(
    s: Session,
    project: Project | str,
    rows: Iterable[Any],
    source: str = "",
    actor: User | int | str | None = None,
) -> int:
    """Add items; every row is checked before anything is written. Returns how many were added. Commits.

    A row: `{"id", "prompt", "candidates": [{"id", "text", "model", "version", "sampling"}, ...],
    "priority"?, "gold_label"? ("A"/"B"/"tie" or a ranking), "ambiguous"?}`. Candidates may be plain strings.
    """
    p = get_project(s, project)
    spec = schema_spec(s, p)
    # Validate before taking the write lock, so a large import does not stall annotators while it is checked.
    items = [_normalise_item(r, f"{source or 'items'} row {i + 1}", spec) for i, r in enumerate(rows)]
    ids = [it["external_id"] for it in items]
    dup = sorted(x for x, n in Counter(ids).items() if n > 1)
    if dup:
        raise Invalid(f"{source or 'items'}: item id(s) repeat: {dup[:5]}")
    s.rollback()
    engine.begin_write(s)
    try:
        existing: set[str] = set()
        for start in range(0, len(ids), 500):  # bounded IN lists (SQLite caps bound parameters)
            chunk = ids[start : start + 500]
            existing |= set(
                s.scalars(
                    select(Item.external_id).where(Item.project_id == p.id, Item.external_id.in_(chunk))
                )
            )
        if existing:
            raise Conflict(
                f"{source or 'items'}: item id(s) already in project {p.name!r}: {sorted(existing)[:5]}"
            )
        for it in items:
            s.add(Item(project_id=p.id, source=source[:128] or None, **it))
        actor_id = get_user(s, actor).id if actor is not None else None
        record(s, actor_id, "items.import", "project", p.id, {"count": len(items), "source": source})
        s.commit()
        return len(items)
    except Exception:
        s.rollback()
        raise


def read_items_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read an items JSONL file; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise NotFound(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise Invalid(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
    return rows


def items_from_generation(
    table: Any,
    kind: str = "pairwise",
    max_candidates: int | None = None,
    dropped: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Turn a generation dataset (pyarrow/pandas; one row per prompt x response) into item rows.

    Columns: `prompt`, `response` (or `completion`), optional `prompt_id`, `model`, `model_version`, `sampling`
    (dict or JSON string). Rows are grouped by prompt (`prompt_id` when present) in first-seen order, and a
    candidate whose text repeats an earlier one of the same prompt is dropped (a comparison of identical
    replies carries no preference); a prompt left with fewer than two distinct candidates gives no item.

    `kind` is the project's question kind. A ranking project gets one item per prompt with every candidate
    (more than `max_candidates` is an error). A pairwise project gets one item per prompt when it has two
    candidates, with the prompt's id; K > 2 candidates are split into disjoint consecutive pairs
    (c0, c1), (c2, c3), ... with ids ``<prompt_id>/0``, ``<prompt_id>/1``, ..., and for odd K the last candidate
    is paired with the first, so every candidate is judged at least once and no pair is asked twice.

    A reply the platform cannot show (a NUL character or a lone surrogate, which a sampled model can emit, or
    longer than `MAX_CANDIDATE_CHARS`) is left out rather than failing the whole import; each one left out is
    appended to `dropped` (when given) as ``{"prompt_id", "candidate", "reason"}``.
    """
    df = table.to_pandas() if hasattr(table, "to_pandas") else pd.DataFrame(table)
    text_col = (
        "response" if "response" in df.columns else "completion" if "completion" in df.columns else None
    )
    if "prompt" not in df.columns or text_col is None:
        raise Invalid(f"generation dataset: needs columns 'prompt' and 'response'; has {list(df.columns)}")
    groups: dict[str, dict[str, Any]] = {}
    for r in df.to_dict(orient="records"):
        key = str(r.get("prompt_id") or r["prompt"])
        g = groups.setdefault(
            key,
            {"id": key if "prompt_id" in r else f"p{len(groups)}", "prompt": r["prompt"], "candidates": []},
        )
        sampling = r.get("sampling")
        if isinstance(sampling, str):
            sampling = json.loads(sampling)
        if any(c["text"] == r[text_col] for c in g["candidates"]):
            continue
        text = r[text_col]
        problem = (
            "is not a string"
            if not isinstance(text, str)
            else f"is longer than {MAX_CANDIDATE_CHARS} characters"
            if len(text) > MAX_CANDIDATE_CHARS
            else text_problem(text)
        )
        if problem:
            if dropped is not None:
                dropped.append({"prompt_id": g["id"], "candidate": r.get("candidate"), "reason": problem})
            continue
        g["candidates"].append(
            {
                "id": f"c{len(g['candidates'])}",
                "text": r[text_col],
                "model": r.get("model"),
                "version": r.get("model_version"),
                "sampling": sampling or {},
            }
        )
    out: list[dict[str, Any]] = []
    for g in groups.values():
        cands = g["candidates"]
        if len(cands) < 2:
            continue
        if kind != "pairwise":
            if max_candidates is not None and len(cands) > max_candidates:
                raise Invalid(
                    f"generation dataset: prompt {g['id']!r} has {len(cands)} distinct candidates but the "
                    f"project's schema allows {max_candidates}; raise max_candidates or generate fewer"
                )
            out.append(g)
        elif len(cands) == 2:
            out.append(g)
        else:
            pairs = [(i, i + 1) for i in range(0, len(cands) - 1, 2)]
            if len(cands) % 2:
                pairs.append((len(cands) - 1, 0))
            for j, (a, b) in enumerate(pairs):
                out.append(
                    {"id": f"{g['id']}/{j}", "prompt": g["prompt"], "candidates": [cands[a], cands[b]]}
                )
    return out


MemberRewards = Callable[[list[str], list[str]], np.ndarray]  # (prompts, responses) -> (M, N) member rewards


def scorer_member_rewards(scorer: Any) -> MemberRewards:
    """`member_rewards` for :func:`prioritize_items` from a reward-model text scorer
    (:class:`alignflow.models.reward.RewardModelScorer`): the scorer returns only the members' mean and std,
    and the disagreement about a reward *difference* needs each member's reward, so each member scores
    through a copy of the scorer that holds only it (the same text formatting and temperature)."""
    import copy

    def rewards(prompts: list[str], responses: list[str]) -> np.ndarray:
        rows = []
        for member in scorer.members:
            view = copy.copy(scorer)
            view.members = [member]
            rows.append(np.asarray(view(prompts, responses)[0], dtype=np.float64))
        return np.stack(rows)

    return rewards


def prioritize_items(
    rows: list[dict[str, Any]],
    member_rewards: MemberRewards,
    expert_fraction: float = 0.0,
    reward_model: str | None = None,
) -> list[dict[str, Any]]:
    """Item rows with a queue priority, an expert tier and their uncertainty figures from a reward model.

    `member_rewards(prompts, responses)` returns every ensemble member's reward, shape ``(M, N)``. The figures
    are :mod:`alignflow.quality.uncertainty`'s: the disagreement (std across members of the reward
    difference), the margin ``|P(A > B) - 1/2|`` and the moderated-margin priority in [0, 1], of an item's most
    uncertain candidate pair. The queue priority is ``round(1000 * priority)`` (higher is served first), the
    ``round(expert_fraction * N)`` most uncertain items go to the expert tier, and ``meta["uncertainty"]``
    keeps the score, the method, the two figures, the pair and `reward_model` (e.g. its artifact id).
    """
    from alignflow.quality.uncertainty import METHOD, expert_mask, queue_priorities, ranking_uncertainty

    if not rows:
        return []
    priority = np.zeros(len(rows))
    figures: list[dict[str, Any]] = [{} for _ in rows]
    by_size: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_size.setdefault(len(r["candidates"]), []).append(i)
    for size, idx in by_size.items():
        prompts = [rows[i]["prompt"] for i in idx for _ in range(size)]
        texts = [c["text"] if isinstance(c, dict) else c for i in idx for c in rows[i]["candidates"]]
        rewards = np.asarray(member_rewards(prompts, texts), dtype=np.float64)
        if rewards.ndim != 2 or rewards.shape[1] != len(texts):
            raise ValueError(f"member_rewards: expected shape (M, {len(texts)}), got {rewards.shape}")
        u = ranking_uncertainty(rewards.reshape(rewards.shape[0], len(idx), size))
        for k, i in enumerate(idx):
            priority[i] = u.priority[k]
            figures[i] = {
                "method": METHOD,
                "priority": float(u.priority[k]),
                "disagreement": float(u.disagreement[k]),
                "margin": float(u.margin[k]),
                "pair": [int(x) for x in u.pair[k]],
                "members": int(rewards.shape[0]),
                "reward_model": reward_model,
            }
    experts = expert_mask(priority, expert_fraction)
    levels = queue_priorities(priority)
    return [
        {
            **r,
            "priority": int(levels[i]),
            "ambiguous": bool(experts[i]),
            "meta": {**(r.get("meta") or {}), "uncertainty": {**figures[i], "expert": bool(experts[i])}},
        }
        for i, r in enumerate(rows)
    ]


def gold_answer(s: Session, project: Project | str, item_id: str) -> Item:
    """The item `item_id` of `project` (its `is_gold` and `gold_label`, for leads and admins)."""
    p = get_project(s, project)
    item = None
    if len(item_id) <= ITEM_ID_CHARS and not first_text_problem(item_id):
        item = s.scalar(select(Item).where(Item.project_id == p.id, Item.external_id == item_id))
    if item is None:
        raise NotFound(f"no item {item_id!r} in project {p.name!r}")
    return item


def mark_ambiguous(s: Session, item_id: int, actor: User | int | str, ambiguous: bool = True) -> None:
    """Route an item to expert-tier annotators only (or back). Commits."""
    engine.begin_write(s)
    try:
        item = s.get(Item, item_id) if 1 <= item_id <= INT32_MAX else None
        if item is None:
            raise NotFound(f"no item {item_id}")
        item.tier = "expert" if ambiguous else "standard"
        record(s, get_user(s, actor).id, "item.tier", "item", item_id, {"tier": item.tier})
        s.commit()
    except Exception:
        s.rollback()
        raise
