"""Stage functions of the quickstart pipeline (`examples/quickstart.yaml`).

base model → datasets → SFT → feedback (SFT samples pairs, a simulated annotator pool answers through the
annotation platform's own services, QC, export) → reward model → PPO and DPO → evaluation → report.
Each stage function takes (params, ctx) and returns a dict of outputs (artifact ids, paths, figures).

This module holds only the demo's domain: the customer-support data and gold scorer (`support`), the
simulated annotator pool, and the order of the stages. The product logic it calls lives in the library:
candidate generation (`alignflow.rollout.candidates`), preferences → training pairs
(`alignflow.feedback.export.preferences_to_pairs`), annotator reliability
(`alignflow.quality.reliability`), statistics and the report (`alignflow.evaluate`).
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from alignflow.domains import support
from alignflow.pipeline import StageContext

# ------------------------------------------------------------------------------- base and data


def make_base(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """A tiny Llama and a byte-level BPE tokenizer trained on the domain corpus."""
    from alignflow.models import make_tiny_model_dir

    out = make_tiny_model_dir(
        ctx.work_dir / "base",
        texts=support.corpus(params.get("corpus_size", 4000), seed=params.get("seed", 0)),
        vocab_size=params.get("vocab_size", 600),
        hidden_size=params.get("hidden_size", 128),
        num_layers=params.get("num_layers", 4),
        num_heads=params.get("num_heads", 4),
        max_position_embeddings=params.get("max_position_embeddings", 256),
        seed=params.get("seed", 0),
    )
    aid = ctx.store.put_directory(out, kind="model", name="quickstart-base", meta={"source": "tiny_llama"})
    return {"model_dir": str(ctx.store.path(aid, verify=False)), "model": aid}


def make_data(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Mixed-quality demonstrations for SFT, and separate prompt sets for feedback, RL and evaluation."""
    seed = params.get("seed", 0)
    sft = support.demonstrations(params["n_demonstrations"], seed=seed, p_good=params.get("p_good", 0.5))
    put = ctx.store.put_dataset
    out = {"sft_dataset": put(sft, kind="sft", name="quickstart-demonstrations", tags=["quickstart"])}
    for name, n, s in (
        ("feedback_prompts", params["n_feedback_prompts"], seed + 1),
        ("rl_prompts", params["n_rl_prompts"], seed + 2),
        ("eval_prompts", params["n_eval_prompts"], seed + 3),
    ):
        rows = [{**r, "completion": " ."} for r in support.prompts(n, s)]  # sft kind: prompt + placeholder
        out[name] = put(rows, kind="sft", name=f"quickstart-{name}", tags=["quickstart", "prompts"])
    return out


# ------------------------------------------------------------------------------- generation


def one_line(text: str) -> str:
    """The domain's replies are one line: an agent turn ends at the end of its line."""
    return text.split("\n")[0].strip()


def generate(
    model_dir: str,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
) -> list[list[str]]:
    """`n` replies per prompt from the policy in `model_dir` (temperature 0 = greedy), cut to one line."""
    from alignflow.rollout.candidates import generate_candidates

    return generate_candidates(
        model_dir,
        None,
        prompts,
        n=n,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        postprocess=one_line,
    )


def _prompts_of(ctx: StageContext, dataset: str) -> list[str]:
    return [r["prompt"] for r in ctx.store.read_dataset(dataset).to_pylist()]


# ------------------------------------------------------------------------------- feedback: the simulated pool

# Annotator types of the simulated pool: (type, count, noise sd on utility, p(choose left) if biased).
DEFAULT_POOL = [
    {"type": "expert", "count": 3, "noise": 0.03},
    {"type": "regular", "count": 6, "noise": 0.12},
    {"type": "spammer", "count": 2},
    {"type": "position_biased", "count": 1, "noise": 0.12, "p_left": 0.9},
]
# Nominal reliability per type, plotted against the estimates in the report. The votes come from `_decide`
# (noise and bias above), not from these numbers.
TRUE_RELIABILITY = {"expert": 0.95, "regular": 0.8, "position_biased": 0.55, "spammer": 0.5}
UNRELIABLE_TYPES = frozenset({"spammer", "position_biased"})
GUIDELINE = (
    "# Customer support replies\nPrefer the reply that is accurate, professional, concise and, "
    "for an upset customer, empathetic."
)

Pool = list[tuple[str, dict[str, Any]]]  # (username, the annotator's spec from the pool)


def _decide(kind: str, spec: dict[str, Any], left: float, right: float, rng: random.Random) -> str:
    """One simulated vote between two replies whose true utilities are `left` and `right`."""
    if kind == "spammer":
        return rng.choice(["left", "right"])
    if kind == "position_biased" and rng.random() < spec.get("p_left", 0.9):
        return "left"
    gap = (left - right) + rng.gauss(0.0, spec.get("noise", 0.1))
    if abs(left - right) < 1e-9 and abs(gap) < 0.02:
        return "tie"
    return "left" if gap > 0 else "right"


def _answer(task: dict[str, Any], spec: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The simulated annotator's answer to a pairwise task: overall choice, strength and per-dimension votes."""
    texts = [c["text"] for c in task["candidates"]]
    util = [support.gold_scores(task["prompt"], t) for t in texts]
    total = [sum(support.WEIGHTS[d] * u[d] for d in support.WEIGHTS) for u in util]
    choice = _decide(spec["type"], spec, total[0], total[1], rng)
    gap = abs(total[0] - total[1])
    return {
        "schema_version": task["schema_version"],
        "choice": choice,
        "strength": None if choice == "tie" else (1 if gap < 0.1 else 2 if gap < 0.3 else 3),
        "dimensions": {
            d: _decide(spec["type"], spec, util[0][d], util[1][d], rng) for d in support.DIMENSIONS
        },
        "duration_s": rng.uniform(8, 40),
    }


# ------------------------------------------------------------------------------- feedback: the steps


def _candidate_items(
    prompts: list[str], candidates: list[list[str]], policy: str, temperature: float
) -> list:
    """One pairwise item per prompt whose two SFT samples differ."""
    meta = {"model": "sft", "version": policy[:12], "sampling": {"temperature": temperature}}
    return [
        {
            "id": f"q{i}",
            "prompt": p,
            "candidates": [{"id": "a", "text": a, **meta}, {"id": "b", "text": b, **meta}],
        }
        for i, (p, (a, b)) in enumerate(zip(prompts, candidates, strict=True))
        if a != b  # identical replies: nothing to compare
    ]


def _gold_items(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Up to `n` gold items: pairs written by the domain generator whose better reply is known."""
    items = []
    for g in range(n):
        t = support.sample_ticket(rng)
        p = t.prompt(rng)
        good = support.write_response(t, dict.fromkeys(support.DIMENSIONS, True), rng)
        bad = support.write_response(t, {d: rng.random() < 0.3 for d in support.DIMENSIONS}, rng)
        if support.gold_utility(p, good) - support.gold_utility(p, bad) < 0.2:
            continue  # not clearly better: a gold item must have one right answer
        swap = rng.random() < 0.5
        pair = [{"id": "a", "text": bad if swap else good}, {"id": "b", "text": good if swap else bad}]
        items.append({"id": f"gold{g}", "prompt": p, "candidates": pair, "gold_label": "B" if swap else "A"})
    return items


def _open_project(s: Any, name: str, items: list, params: dict[str, Any]) -> Pool:
    """Create the project, import the items, and create the pool's annotator accounts."""
    from alignflow.feedback import auth, services

    services.create_project(
        s,
        name,
        GUIDELINE,
        {"kind": "pairwise", "dimensions": list(support.DIMENSIONS)},
        overlap=params.get("overlap", 3),
        gold_rate=params.get("gold_rate", 0.1),
        qa_rate=0.0,
    )
    services.import_items(s, name, items, source=params["prompts"])
    pool: Pool = []
    for spec in params.get("pool", DEFAULT_POOL):
        for k in range(spec["count"]):
            uname = f"{name}-{spec['type']}-{k}"
            auth.create_user(s, uname, uuid.uuid4().hex, "annotator", pod="sim")
            pool.append((uname, spec))
    s.commit()
    return pool


def _annotate(s: Any, project: str, pool: Pool, rng: random.Random) -> None:
    """Annotators take turns (like a live queue) until nobody gets more work."""
    from alignflow.feedback import services

    active = list(pool)
    while active:
        still = []
        for uname, spec in active:
            task = services.next_task(s, uname, project, rng)
            if task is None:
                continue
            still.append((uname, spec))
            answer = _answer(task, spec, rng)
            services.submit(s, uname, task["assignment_id"], answer, client_id=uuid.uuid4().hex)
        active = still


def _annotator_figures(
    judgments: Any, consensus: dict[str, str], project: str, pool: Pool, flagged: set, states: dict
) -> list[dict[str, Any]]:
    """Per annotator: its type and true reliability (known in simulation) beside the estimates."""
    from alignflow.quality.reliability import annotator_reliability

    est = annotator_reliability(judgments, consensus).set_index("annotator_id")
    rows = []
    for uname, spec in pool:
        known = uname in est.index
        rows.append(
            {
                "annotator": uname.removeprefix(f"{project}-"),
                "type": spec["type"],
                "true_reliability": TRUE_RELIABILITY[spec["type"]],
                "estimated_skill": est.at[uname, "consensus_agreement"] if known else None,
                "gold_accuracy": est.at[uname, "gold_accuracy"] if known else None,
                "flagged": uname in flagged,
                "qc_state": states.get(uname),
            }
        )
    return rows


def _label_accuracy_vs_gold(pairs: list[dict[str, Any]]) -> float | None:
    """Share of training pairs whose chosen reply the gold scorer prefers (pairs it cannot separate say nothing)."""
    gaps = [
        support.gold_utility(r["prompt"], r["chosen"]) - support.gold_utility(r["prompt"], r["rejected"])
        for r in pairs
    ]
    decided = [g for g in gaps if abs(g) > 1e-9]
    return sum(g > 0 for g in decided) / len(decided) if decided else None


def _training_pairs(
    ctx: StageContext, preferences_id: str, preferences: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """The `pairs` dataset RM and DPO train on: consensus label, soft label as weight, ties dropped;
    lineage to the exported preferences."""
    from alignflow.feedback.export import preferences_to_pairs

    pairs = preferences_to_pairs(preferences, tie_rule="drop")
    for r in pairs:
        # Replies were cut to their line and stripped; SFT completions start with a space after "agent:".
        r["chosen"], r["rejected"] = " " + r["chosen"], " " + r["rejected"]
    pairs_id = ctx.store.put_dataset(
        pairs,
        kind="pairs",
        name="quickstart-preferences",
        parents=[(preferences_id, "preferences")],
        tags=["quickstart"],
    )
    return pairs_id, pairs


def collect_feedback(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """SFT samples pairs; a simulated pool answers through the platform's services; QC; export; pairs."""
    from alignflow.feedback import export, qc, services
    from alignflow.feedback.models import User
    from alignflow.quality.reliability import detection_precision_recall

    rng = random.Random(params.get("seed", 0))
    temperature = params.get("temperature", 1.0)
    prompts = _prompts_of(ctx, params["prompts"])
    samples = generate(
        params["policy_dir"],
        prompts,
        n=2,
        temperature=temperature,
        max_new_tokens=params.get("max_new_tokens", 48),
        seed=params.get("seed", 0),
    )
    items = _candidate_items(prompts, samples, params["policy"], temperature)
    items += _gold_items(max(1, int(len(items) * params.get("gold_fraction", 0.1))), rng)

    name = f"quickstart-{uuid.uuid4().hex[:8]}"
    with services.connect(ctx.store.workspace)() as s:
        pool = _open_project(s, name, items, params)
        _annotate(s, name, pool, rng)
        actions = qc.evaluate_and_apply(s, name, actor=None)
        exported = export.export_project(s, ctx.store, name, method=params.get("aggregation", "dawid_skene"))
        judgments = services.load_judgments(s, name)
        states = {u.username: u.qc_state for u in s.query(User).filter(User.username.like(f"{name}-%"))}

    flagged = {a["annotator"] for a in actions if a["action"] in ("restrict", "suspend", "recertify")}
    precision, recall = detection_precision_recall(
        flagged, {u for u, spec in pool if spec["type"] in UNRELIABLE_TYPES}
    )
    preferences = ctx.store.read_dataset(exported["preferences"]).to_pylist()
    consensus = {r["item_id"]: r["label"] for r in preferences}
    pairs_id, pairs = _training_pairs(ctx, exported["preferences"], preferences)
    return {
        "pairs_dataset": pairs_id,
        "preferences": exported["preferences"],
        "annotations": exported["annotations"],
        "project": name,
        "n_items": len(items),
        "n_judgments": int((judgments["dimension"] == "overall").sum()),
        "n_pairs": len(pairs),
        "label_accuracy_vs_gold": _label_accuracy_vs_gold(pairs),
        "detection_precision": precision,
        "detection_recall": recall,
        "qc_actions": [{k: a[k] for k in ("annotator", "action", "reason")} for a in actions],
        "annotators": _annotator_figures(judgments, consensus, name, pool, flagged, states),
    }


# ------------------------------------------------------------------------------- evaluation


def _gold_utilities(
    policies: dict[str, str], prompts: list[str], temperature: float, k: int, max_new_tokens: int, seed: int
) -> tuple[dict[str, list[list[str]]], dict[str, list[float]]]:
    """Per policy: its `k` replies to each prompt, and their gold utility averaged per prompt (so that
    policies are paired by prompt)."""
    responses, utilities = {}, {}
    for name, model_dir in policies.items():
        samples = generate(
            model_dir, prompts, n=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
        )
        responses[name] = samples
        utilities[name] = [
            float(np.mean(support.gold_utility_batch([p] * k, r)))
            for p, r in zip(prompts, samples, strict=True)
        ]
    return responses, utilities


def _dimension_means(prompts: list[str], samples: list[list[str]]) -> dict[str, float]:
    """Mean gold utility, each gold dimension and the reply length in words over all of a policy's replies:
    the table that shows which dimension a policy gains or trades away."""
    scores = [support.gold_scores(p, r) for p, rs in zip(prompts, samples, strict=True) for r in rs]
    out = {
        "utility": float(np.mean([sum(support.WEIGHTS[d] * s[d] for d in support.WEIGHTS) for s in scores]))
    }
    out.update({d: float(np.mean([s[d] for s in scores])) for d in support.DIMENSIONS})
    out["words"] = float(np.mean([len(r.split()) for rs in samples for r in rs]))
    return out


def _compare(utilities: dict[str, list[float]], base: str, seed: int) -> tuple[dict, dict, dict]:
    """Mean utility with a bootstrap CI per policy; paired difference and win rate against `base`."""
    from alignflow.evaluate import stats

    policies, diffs, wins = {}, {}, {}
    ref = np.asarray(utilities[base])
    for name, u in utilities.items():
        mean, lo, hi = stats.bootstrap_mean_ci(np.asarray(u), seed=seed)
        policies[name] = {"mean": mean, "lo": lo, "hi": hi, "n": len(u)}
        if name != base:
            d, dlo, dhi = stats.paired_diff_ci(np.asarray(u), ref, seed=seed)
            diffs[name] = {"mean": d, "lo": dlo, "hi": dhi}
            r, rlo, rhi = stats.win_rate(np.asarray(u), ref, seed=seed)
            wins[name] = {"rate": r, "lo": rlo, "hi": rhi}
    return policies, diffs, wins


def _reward_model_vs_gold(
    reward_model_dir: str, policy_dir: str, prompts: list[str], max_new_tokens: int, seed: int
) -> dict[str, Any]:
    """Reward-model accuracy and calibration against the gold scorer on fresh pairs sampled from `policy_dir`."""
    from alignflow.evaluate import reward
    from alignflow.models.reward import load_reward_scorer

    scorer = load_reward_scorer(reward_model_dir)
    pairs = generate(policy_dir, prompts, n=2, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    head_gap = (scorer.score_heads(prompts, a)[0] - scorer.score_heads(prompts, b)[0]).double().numpy()
    score_gap = head_gap[:, 0]  # the overall head
    gold_gap = np.asarray(support.gold_utility_batch(prompts, a)) - np.asarray(
        support.gold_utility_batch(prompts, b)
    )
    acc, n_used = reward.gold_agreement(score_gap, gold_gap)
    keep = np.abs(gold_gap) > 1e-9
    probs = 1.0 / (1.0 + np.exp(-score_gap[keep]))
    # Per gold dimension: does the reward model order the pairs that differ on it the way gold does?
    dims_a = [support.gold_scores(p, r) for p, r in zip(prompts, a, strict=True)]
    dims_b = [support.gold_scores(p, r) for p, r in zip(prompts, b, strict=True)]
    per_dimension = {}
    for d in support.DIMENSIONS:
        gap = np.array([x[d] - y[d] for x, y in zip(dims_a, dims_b, strict=True)])
        d_acc, d_n = reward.gold_agreement(score_gap, gap)
        per_dimension[d] = {"agreement": d_acc, "n_pairs": d_n}
        if d in scorer.heads:  # a multi-head model: the dimension's own head, on the same pairs
            per_dimension[d]["head_agreement"] = reward.gold_agreement(
                head_gap[:, scorer.heads.index(d)], gap
            )[0]
    return {
        "gold_accuracy": acc,
        "n_pairs": n_used,
        "per_dimension": per_dimension,
        "heads": list(scorer.heads),
        "calibration": reward.calibration(probs, (gold_gap[keep] > 0).astype(float)),
    }


def _proxy_vs_gold(ctx: StageContext, run_id: str) -> dict[str, list] | None:
    """PPO's monitor series (proxy reward, gold score, response length) over steps, from the run's metrics."""
    series: dict[str, dict[int, float]] = {}
    for step, name, value in ctx.store.metrics(run_id):
        series.setdefault(name, {})[step] = value
    proxy, gold = series.get("monitor/proxy_reward", {}), series.get("monitor/score", {})
    length = series.get("monitor/response_len", {})
    steps = sorted(set(proxy) & set(gold))
    if not steps:
        return None
    pg: dict[str, list] = {
        "steps": steps,
        "proxy": [proxy[s] for s in steps],
        "gold": [gold[s] for s in steps],
    }
    if all(s in length for s in steps):
        pg["length"] = [length[s] for s in steps]
    return pg


def evaluate(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Gold utility of each policy on held-out prompts with bootstrap CIs; win rate vs SFT;
    reward-model accuracy and calibration against gold preferences; reward-hacking checks."""
    from alignflow.evaluate import hacking

    prompts = _prompts_of(ctx, params["prompts"])
    seed = params.get("seed", 0)
    base = params.get("baseline", "sft")
    max_new = params.get("max_new_tokens", 48)
    policies = params["policies"]

    # Primary: each policy's own sampling distribution (what RLHF optimises). Greedy decoding (how many teams
    # deploy) is reported beside it, never instead of it.
    temperature, k = params.get("temperature", 1.0), params.get("samples_per_prompt", 4)
    samples, utilities = _gold_utilities(policies, prompts, temperature, k, max_new, seed)
    summary, diffs, wins = _compare(utilities, base, seed)
    out: dict[str, Any] = {"policies": summary, "diff_vs_" + base: diffs, "win_rates": wins}
    dimensions = {"sampled": {n: _dimension_means(prompts, r) for n, r in samples.items()}}
    if params.get("greedy", True):
        greedy_samples, greedy_u = _gold_utilities(policies, prompts, 0.0, 1, max_new, seed)
        g_summary, g_diffs, g_wins = _compare(greedy_u, base, seed)
        out["greedy"] = {"policies": g_summary, "diff_vs_" + base: g_diffs, "win_rates": g_wins}
        dimensions["greedy"] = {n: _dimension_means(prompts, r) for n, r in greedy_samples.items()}
    out["dimensions"] = dimensions
    responses = {name: [r[0] for r in rs] for name, rs in samples.items()}
    if params.get("reward_model_dir"):
        out["reward_model"] = _reward_model_vs_gold(
            params["reward_model_dir"], policies[base], prompts, max_new, seed + 1
        )
    pg = _proxy_vs_gold(ctx, params["ppo_run_id"]) if params.get("ppo_run_id") else None
    if pg is not None:
        out["proxy_vs_gold"] = pg
        out["warnings"] = hacking.detect_reward_hacking(
            pg["steps"], pg["proxy"], pg["gold"], pg.get("length")
        )
    out["samples"] = [
        {"prompt": prompts[i], "policy": name, "response": responses[name][i], "gold": utilities[name][i]}
        for i in range(min(3, len(prompts)))
        for name in responses
    ]
    dump = {"prompts": prompts, "responses": responses, "utilities": utilities}
    if "greedy" in out:
        dump["greedy"] = {"responses": {n: [r[0] for r in rs] for n, rs in greedy_samples.items()}}
        dump["greedy"]["utilities"] = greedy_u
    (ctx.work_dir / "responses.json").write_text(json.dumps(dump, indent=1))
    return out


# ------------------------------------------------------------------------------- report

CURVES = {
    "sft": ["loss", "eval/loss"],
    "rm": ["loss", "eval/accuracy"],
    "dpo": ["loss", "rewards/margins"],
    "ppo": ["reward/raw", "kl/seq_sum"],
}


def _curves(ctx: StageContext, runs: dict[str, str]) -> dict[str, dict[str, list]]:
    """The training curves of `CURVES` for each stage that ran: {stage: {metric: [[step, value], ...]}}."""
    curves: dict[str, dict[str, list]] = {}
    for stage, names in CURVES.items():
        rid = runs.get(stage)
        if not rid:
            continue
        for name in names:
            pts = [[step, v] for step, _, v in ctx.store.metrics(rid, name)]
            if pts:
                curves.setdefault(stage, {})[name] = pts
    return curves


def _stage_times(ctx: StageContext, pipeline: str) -> dict[str, float]:
    state_file = ctx.store.workspace.home / "pipelines" / pipeline / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    return {k: round(v.get("seconds", 0.0), 1) for k, v in state.items() if "seconds" in v}


def _facts(ev: dict[str, Any], fb: dict[str, Any]) -> dict[str, Any]:
    facts = {
        "reward model accuracy vs gold": ev.get("reward_model", {}).get("gold_accuracy"),
        "feedback judgments": fb.get("n_judgments"),
        "preference pairs": fb.get("n_pairs"),
        "consensus labels agreeing with gold": fb.get("label_accuracy_vs_gold"),
        "unreliable-annotator detection precision": fb.get("detection_precision"),
        "unreliable-annotator detection recall": fb.get("detection_recall"),
    }
    for dim, agree in ev.get("reward_model", {}).get("per_dimension", {}).items():
        facts[f"reward model agreement with gold {dim}"] = agree["agreement"]
        if "head_agreement" in agree:
            facts[f"{dim} head agreement with gold {dim}"] = agree["head_agreement"]
    return facts


def headroom_note(ev: dict[str, Any], base: str = "sft", saturated: float = 0.99) -> str:
    """Why greedy decoding leaves a reward model little to improve, from the evaluation's own numbers.

    The dimensions on which the baseline's greedy replies already score >= `saturated` cannot rise; greedy
    utility can then grow only through the others, and what the reward model sees of those (its head's and
    its overall head's agreement with gold on fresh pairs) bounds what RL can learn there. Empty when there is
    no greedy evaluation or nothing is saturated.
    """
    greedy = ev.get("dimensions", {}).get("greedy", {}).get(base)
    if not greedy:
        return ""
    full = [d for d in support.DIMENSIONS if greedy[d] >= saturated]
    open_ = [d for d in support.DIMENSIONS if d not in full]
    if not full or not open_:
        return ""
    per_dim = ev.get("reward_model", {}).get("per_dimension", {})
    seen = []
    for d in open_:
        agree = per_dim.get(d, {})
        if "head_agreement" in agree:
            seen.append(
                f"the {d} head orders gold {d} correctly on {agree['head_agreement']:.0%} of fresh pairs "
                f"(the overall head {agree['agreement']:.0%})"
            )
        elif "agreement" in agree:
            seen.append(
                f"the reward model orders gold {d} correctly on {agree['agreement']:.0%} of fresh pairs"
            )
    others = [per_dim[d]["head_agreement"] for d in full if "head_agreement" in per_dim.get(d, {})]
    text = (
        f"Under greedy decoding {base.upper()} already scores ≥ {saturated} on {', '.join(full)}, so greedy "
        f"utility can rise only through {', '.join(f'{d} ({greedy[d]:.3f})' for d in open_)}"
    )
    if seen:
        text += "; " + "; ".join(seen)
        if others:
            text += f", against {min(others):.0%}–{max(others):.0%} for the saturated dimensions' heads"
    return text + "."


def report(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """The HTML report of the whole loop, plus the summary the terminal prints."""
    from datetime import UTC, datetime

    from rich.console import Console

    from alignflow.evaluate.report import (
        comparison_rows,
        decoding_rows,
        dimension_rows,
        print_summary,
        verdict_text,
        write_report,
    )
    from alignflow.store.render import to_tree_lines

    o = ctx.outputs
    ev = o[params.get("evaluate_stage", "evaluate")]
    fb = o.get(params.get("feedback_stage", "feedback"), {})
    runs = {s: o[s]["run_id"] for s in ("sft", "rm", "ppo", "dpo") if s in o and "run_id" in o[s]}
    stage_times = _stage_times(ctx, params["pipeline"])
    base = params.get("baseline", "sft")
    diffs = ev.get(f"diff_vs_{base}", {})
    verdicts = [
        verdict_text(name.upper(), base.upper(), d["mean"], d["lo"], d["hi"]) for name, d in diffs.items()
    ]
    greedy = ev.get("greedy")
    if greedy:
        verdicts += [
            verdict_text(name.upper(), base.upper(), d["mean"], d["lo"], d["hi"], "gold utility (greedy)")
            for name, d in greedy[f"diff_vs_{base}"].items()
        ]
        summary_rows = decoding_rows(
            {
                "sampled": {"policies": ev["policies"], "diffs": diffs, "win_rates": ev["win_rates"]},
                "greedy": {
                    "policies": greedy["policies"],
                    "diffs": greedy[f"diff_vs_{base}"],
                    "win_rates": greedy.get("win_rates", {}),
                },
            },
            base,
        )
    else:
        summary_rows = comparison_rows(ev["policies"], diffs, ev["win_rates"], base)
    final = params.get("final_policy")
    data = {
        "title": "alignflow quickstart: the RLHF loop on customer support",
        "created_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "verdict": " · ".join(verdicts),
        "summary_rows": summary_rows,
        "dimensions": dimension_rows(ev.get("dimensions", {})),
        "dimension_note": headroom_note(ev, base),
        "warnings": ev.get("warnings", []),
        "stage_times": stage_times,
        "policies": ev["policies"],
        "win_rates": ev["win_rates"],
        "curves": _curves(ctx, runs),
        "proxy_vs_gold": ev.get("proxy_vs_gold"),
        "reliability": ev.get("reward_model", {}).get("calibration"),
        "annotators": fb.get("annotators", []),
        "lineage": to_tree_lines(ctx.store.lineage(final)) if final else [],
        "samples": ev.get("samples", []),
        "facts": _facts(ev, fb),
    }
    path: Path = write_report(ctx.store.workspace.reports_dir / params.get("name", params["pipeline"]), data)
    print_summary(data, Console(), path)
    aid = ctx.store.put_file(
        path, kind="report", name=f"{params['pipeline']}-report", parents=[(final, "policy")] if final else []
    )
    return {"report_path": str(path), "report": aid, "verdicts": verdicts, "stage_times": stage_times}
