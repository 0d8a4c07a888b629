"""Stage functions of the iterative pipeline (`examples/iterative.yaml`): the quickstart's domain for N rounds.

Each round: the current policy samples candidate pairs → (from the round `active_from_round` on) the previous
round's reward-model ensemble scores them and the most uncertain are annotated first and, for the top
`expert_fraction`, by the expert tier only (:mod:`alignflow.quality.uncertainty`) → the simulated pool answers
through the annotation platform's services → QC, aggregation, export → the round's pairs are appended to the
previous rounds' (the reward model retrains on the cumulative data) → RM → PPO continues from the previous
round's policy with the SFT model as its KL reference (both set in the YAML). After the rounds, every round's
policy is evaluated on gold utility (`alignflow.domains.quickstart:evaluate`, baseline round 1) and
:func:`summarize` puts the rounds side by side with the annotation-efficiency curve (reward-model gold
accuracy against the cumulative number of labels and their cost).

The base model, the data, the simulated annotators and the evaluation are the quickstart's, imported from
:mod:`alignflow.domains.quickstart`; this module adds only what a round needs.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from typing import Any

import numpy as np

from alignflow.domains import quickstart as qs
from alignflow.domains import support
from alignflow.pipeline import StageContext

# The quickstart's pool, with its experts in the platform's expert tier: items routed to experts reach them only.
POOL = [{**spec, "tier": "expert" if spec["type"] == "expert" else "standard"} for spec in qs.DEFAULT_POOL]
COST_PER_LABEL = {"expert": 1.0, "standard": 0.25}  # relative cost of one answer per tier


def _open_project(s: Any, name: str, items: list, params: dict[str, Any]) -> qs.Pool:
    """The project, its items and the pool's accounts (in their tiers)."""
    from alignflow.feedback import auth, services

    services.create_project(
        s,
        name,
        qs.GUIDELINE,
        {"kind": "pairwise", "dimensions": list(support.DIMENSIONS)},
        overlap=params.get("overlap", 3),
        gold_rate=params.get("gold_rate", 0.1),
        qa_rate=0.0,
    )
    services.import_items(s, name, items, source=params["prompts"])
    pool: qs.Pool = []
    for spec in params.get("pool", POOL):
        for k in range(spec["count"]):
            uname = f"{name}-{spec['type']}-{k}"
            auth.create_user(
                s, uname, uuid.uuid4().hex, "annotator", pod="sim", tier=spec.get("tier", "standard")
            )
            pool.append((uname, spec))
    s.commit()
    return pool


def _member_rewards(scorer: Any, prompts: list[str], responses: list[str]) -> np.ndarray:
    """Each ensemble member's reward, ``(M, N)``: the scorer itself returns only their mean and std, and the
    disagreement about a reward *difference* needs the members one by one (a view of the scorer per member)."""
    rows = []
    for member in scorer.members:
        view = copy.copy(scorer)
        view.members = [member]
        rows.append(view(prompts, responses)[0].numpy())
    return np.stack(rows)


def _route(
    items: list[dict[str, Any]], params: dict[str, Any], rng: random.Random
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Choose the `n_items` to annotate this round and set their queue priority and tier.

    Active (a reward model given): the items of highest uncertainty priority, the top `expert_fraction` of
    them for experts only; otherwise a random sample, no experts-only items.
    """
    from alignflow.quality.uncertainty import METHOD, expert_mask, pair_uncertainty, queue_priorities

    n = min(params["n_items"], len(items))
    rm_dir = params.get("reward_model_dir")
    if not rm_dir:
        chosen = rng.sample(items, n)
        return chosen, {"routing": "random", "n_expert_items": 0, "mean_priority": None}
    from alignflow.models.reward import load_reward_scorer

    scorer = load_reward_scorer(rm_dir)
    prompts = [it["prompt"] for it in items]
    # The reward model trained on pairs whose replies start with a space (see quickstart._training_pairs).
    ra = _member_rewards(scorer, prompts, [" " + it["candidates"][0]["text"] for it in items])
    rb = _member_rewards(scorer, prompts, [" " + it["candidates"][1]["text"] for it in items])
    u = pair_uncertainty(ra, rb)  # every field (len(items),)
    top = np.argsort(-u.priority, kind="stable")[:n]
    experts = expert_mask(u.priority[top], params.get("expert_fraction", 0.0))
    levels = queue_priorities(u.priority[top])
    chosen = []
    for j, i in enumerate(top):
        chosen.append({**items[i], "priority": int(levels[j]), "ambiguous": bool(experts[j])})
    stats = {
        "routing": METHOD,
        "n_expert_items": int(experts.sum()),
        "mean_priority": float(u.priority[top].mean()),
        "mean_priority_all": float(u.priority.mean()),
        "mean_disagreement": float(u.disagreement[top].mean()),
    }
    return chosen, stats


def _cumulative(
    ctx: StageContext, previous: str | None, pairs_id: str, pairs: list[dict[str, Any]], r: int
) -> tuple[str, int]:
    """This round's pairs appended to the previous rounds' (ids prefixed by the round), with lineage to both."""
    rows = ctx.store.read_dataset(previous).to_pylist() if previous else []
    rows += [{**p, "id": f"r{r}-{p['id']}"} for p in pairs]
    parents = [(pairs_id, "round_pairs")] + ([(previous, "previous_rounds")] if previous else [])
    aid = ctx.store.put_dataset(
        rows, kind="pairs", name="iterative-preferences", parents=parents, tags=["iterative"]
    )
    return aid, len(rows)


def collect_feedback(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """One round's feedback on the current policy's samples, routed by the previous reward model from
    `active_from_round` on; returns this round's pairs and the cumulative pairs the RM trains on."""
    from alignflow.feedback import export, qc, services

    r = int(params["round"])
    seed = params.get("seed", 0) * 1000 + r
    rng = random.Random(seed)
    per_round = params["candidates_per_round"]
    all_prompts = qs._prompts_of(ctx, params["prompts"])
    prompts = all_prompts[(r - 1) * per_round : r * per_round]  # fresh prompts every round
    if len(prompts) < per_round:
        raise ValueError(
            f"round {r} needs prompts {(r - 1) * per_round}..{r * per_round} but the dataset has {len(all_prompts)}"
        )
    temperature = params.get("temperature", 1.0)
    samples = qs.generate(
        params["policy_dir"],
        prompts,
        n=2,
        temperature=temperature,
        max_new_tokens=params.get("max_new_tokens", 48),
        seed=seed,
    )
    # The platform refuses text with NUL characters, which a weak policy can sample: those pairs are left out.
    candidates = [
        it
        for it in qs._candidate_items(prompts, samples, params["policy"], temperature)
        if not any("\x00" in c["text"] for c in it["candidates"])
    ]
    active = params.get("active_from_round") is not None and r >= params["active_from_round"]
    routing_params = {**params, "reward_model_dir": params.get("reward_model_dir") if active else None}
    items, routing = _route(candidates, routing_params, rng)
    items += qs._gold_items(max(1, int(len(items) * params.get("gold_fraction", 0.1))), rng)

    name = f"iterative-r{r}-{uuid.uuid4().hex[:8]}"
    with services.connect(ctx.store.workspace)() as s:
        pool = _open_project(s, name, items, params)
        qs._annotate(s, name, pool, rng)
        qc.evaluate_and_apply(s, name, actor=None)
        exported = export.export_project(s, ctx.store, name, method=params.get("aggregation", "dawid_skene"))
        judgments = services.load_judgments(s, name)

    overall = judgments[judgments["dimension"] == "overall"]
    tiers = {u: spec.get("tier", "standard") for u, spec in pool}
    cost_per_label = params.get("cost_per_label", COST_PER_LABEL)
    cost = float(sum(cost_per_label[tiers[a]] for a in overall["annotator_id"]))
    preferences = ctx.store.read_dataset(exported["preferences"]).to_pylist()
    pairs_id, pairs = qs._training_pairs(ctx, exported["preferences"], preferences)
    cumulative_id, n_total = _cumulative(ctx, params.get("previous_pairs"), pairs_id, pairs, r)
    stats = {
        "round": r,
        "n_items": len(items),
        "n_judgments": len(overall),
        "cost": cost,
        "n_pairs": len(pairs),
        "n_pairs_total": n_total,
        "label_accuracy_vs_gold": qs._label_accuracy_vs_gold(pairs),
        **routing,
    }
    (ctx.work_dir / "items.json").write_text(json.dumps(items, indent=1))
    return {
        "pairs_dataset": pairs_id,
        "cumulative_pairs": cumulative_id,
        "preferences": exported["preferences"],
        "annotations": exported["annotations"],
        "project": name,
        "stats": stats,
    }


def _heldout_pairs(n: int, seed: int) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Fixed pairs of domain-written replies with their gold utility gap, to score every round's RM on."""
    rng = random.Random(seed)
    prompts, a, b, gaps = [], [], [], []
    while len(prompts) < n:
        t = support.sample_ticket(rng)
        p = t.prompt(rng)
        ra, rb = (
            support.write_response(t, {d: rng.random() < 0.5 for d in support.DIMENSIONS}, rng) for _ in "ab"
        )
        gap = support.gold_utility(p, ra) - support.gold_utility(p, rb)
        if abs(gap) > 1e-9:
            prompts.append(p)
            a.append(" " + ra)
            b.append(" " + rb)
            gaps.append(gap)
    return prompts, a, b, np.asarray(gaps)


def summarize(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """The rounds side by side: gold utility of each round's policy (from the evaluation), the labels and
    their cost so far, and each round's reward-model gold accuracy on fixed held-out pairs — the
    annotation-efficiency curve (gain per 100 labels and per unit of cost)."""
    from alignflow.evaluate import reward
    from alignflow.models.reward import load_reward_scorer

    feedback, rms, evaluation = params["feedback"], params["reward_models"], params["evaluation"]
    if len(feedback) != len(rms):
        raise ValueError(f"summarize: {len(feedback)} feedback rounds but {len(rms)} reward models")
    prompts, a, b, gaps = _heldout_pairs(params.get("n_heldout_pairs", 200), params.get("seed", 0))
    rows, labels, spent = [], 0, 0.0
    for i, (fb, rm_dir) in enumerate(zip(feedback, rms, strict=True)):
        scorer = load_reward_scorer(rm_dir)
        gap = scorer(prompts, a)[0].numpy() - scorer(prompts, b)[0].numpy()
        acc, _ = reward.gold_agreement(gap, gaps)
        labels += fb["n_judgments"]
        spent += fb["cost"]
        policy = evaluation.get(f"round{i + 1}", {})
        rows.append(
            {
                "round": i + 1,
                "routing": fb["routing"],
                "labels": labels,
                "cost": spent,
                "pairs": fb["n_pairs_total"],
                "rm_gold_accuracy": float(acc),
                "gold_utility": policy.get("mean"),
                "gold_utility_lo": policy.get("lo"),
                "gold_utility_hi": policy.get("hi"),
            }
        )
    for prev, row in zip(rows, rows[1:], strict=False):
        gain = row["rm_gold_accuracy"] - prev["rm_gold_accuracy"]
        row["gain_per_100_labels"] = gain / (row["labels"] - prev["labels"]) * 100
        row["gain_per_unit_cost"] = (
            gain / (row["cost"] - prev["cost"]) if row["cost"] > prev["cost"] else None
        )
    for row in rows:
        ctx.log(
            f"round {row['round']} ({row['routing']}): {row['labels']} labels, cost {row['cost']:.1f}, "
            f"RM gold accuracy {row['rm_gold_accuracy']:.3f}, policy gold utility "
            + (
                f"{row['gold_utility']:.3f} [{row['gold_utility_lo']:.3f}, {row['gold_utility_hi']:.3f}]"
                if row["gold_utility"] is not None
                else "n/a"
            )
        )
    (ctx.work_dir / "rounds.json").write_text(json.dumps(rows, indent=1))
    return {"rounds": rows}
