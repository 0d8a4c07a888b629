"""Stage functions of the quickstart pipeline (`examples/quickstart.yaml`).

base model → datasets → SFT → feedback (SFT samples, simulated annotators through the annotation
platform's own services, QC, export) → reward model → PPO and DPO → evaluation → report.
Each function takes (params, ctx) and returns a dict of outputs (artifact ids, paths, figures).
"""

from __future__ import annotations

import json
import random
import uuid
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


def generate(
    model_dir: str,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """`n` sampled responses per prompt (temperature 0 = greedy), decoded and cut at the end of line."""
    import torch

    from alignflow.models import load_policy, load_tokenizer

    tok = load_tokenizer(model_dir, padding_side="left")
    model = load_policy(model_dir, dtype="float32").eval()
    torch.manual_seed(seed)
    out: list[list[str]] = [[] for _ in prompts]
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    with torch.inference_mode():
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            enc = tok([p for _, p in chunk], return_tensors="pt", padding=True)
            kw = (
                {"do_sample": True, "temperature": temperature, "top_p": 1.0}
                if temperature > 0
                else {"do_sample": False}
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **kw,
            )
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for (i, _), t in zip(chunk, texts, strict=True):
                out[i].append(t.split("\n")[0].strip())
    return out


def _prompts_of(ctx: StageContext, dataset: str) -> list[str]:
    return [r["prompt"] for r in ctx.store.read_dataset(dataset).to_pylist()]


# ------------------------------------------------------------------------------- feedback

# Annotator types of the simulated pool: (type, count, noise sd on utility, p(choose left) if biased).
DEFAULT_POOL = [
    {"type": "expert", "count": 3, "noise": 0.03},
    {"type": "regular", "count": 6, "noise": 0.12},
    {"type": "spammer", "count": 2},
    {"type": "position_biased", "count": 1, "noise": 0.12, "p_left": 0.9},
]


def _decide(kind: str, spec: dict[str, Any], left: float, right: float, rng: random.Random) -> str:
    if kind == "spammer":
        return rng.choice(["left", "right"])
    if kind == "position_biased" and rng.random() < spec.get("p_left", 0.9):
        return "left"
    gap = (left - right) + rng.gauss(0.0, spec.get("noise", 0.1))
    if abs(left - right) < 1e-9 and abs(gap) < 0.02:
        return "tie"
    return "left" if gap > 0 else "right"


def collect_feedback(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """SFT samples pairs; a simulated pool answers through the platform's services; QC; export."""
    from alignflow.feedback import auth, export, qc, services
    from alignflow.feedback.models import User

    rng = random.Random(params.get("seed", 0))
    prompts = _prompts_of(ctx, params["prompts"])
    cands = generate(
        params["policy_dir"],
        prompts,
        n=2,
        temperature=params.get("temperature", 1.0),
        max_new_tokens=params.get("max_new_tokens", 48),
        seed=params.get("seed", 0),
    )
    items = []
    for i, (p, (a, b)) in enumerate(zip(prompts, cands, strict=True)):
        if a == b:
            continue  # nothing to compare
        meta = {
            "model": "sft",
            "version": params["policy"][:12],
            "sampling": {"temperature": params.get("temperature", 1.0)},
        }
        items.append(
            {
                "id": f"q{i}",
                "prompt": p,
                "candidates": [{"id": "a", "text": a, **meta}, {"id": "b", "text": b, **meta}],
            }
        )
    # Gold items: pairs written by the domain generator whose better answer is known.
    n_gold = max(1, int(len(items) * params.get("gold_fraction", 0.1)))
    for g in range(n_gold):
        t = support.sample_ticket(rng)
        p = t.prompt(rng)
        good = support.write_response(t, dict.fromkeys(support.DIMENSIONS, True), rng)
        bad = support.write_response(t, {d: rng.random() < 0.3 for d in support.DIMENSIONS}, rng)
        if support.gold_utility(p, good) - support.gold_utility(p, bad) < 0.2:
            continue
        swap = rng.random() < 0.5
        pair = [{"id": "a", "text": bad if swap else good}, {"id": "b", "text": good if swap else bad}]
        items.append({"id": f"gold{g}", "prompt": p, "candidates": pair, "gold_label": "B" if swap else "A"})

    sessions = services.connect(ctx.store.workspace)
    name = f"quickstart-{uuid.uuid4().hex[:8]}"
    pool: list[tuple[str, dict[str, Any]]] = []
    with sessions() as s:
        services.create_project(
            s,
            name,
            "# Customer support replies\nPrefer the reply that is accurate, professional, concise and, "
            "for an upset customer, empathetic.",
            {"kind": "pairwise", "dimensions": list(support.DIMENSIONS)},
            overlap=params.get("overlap", 3),
            gold_rate=params.get("gold_rate", 0.1),
            qa_rate=0.0,
        )
        services.import_items(s, name, items, source=params["prompts"])
        for spec in params.get("pool", DEFAULT_POOL):
            for k in range(spec["count"]):
                uname = f"{name}-{spec['type']}-{k}"
                auth.create_user(s, uname, uuid.uuid4().hex, "annotator", pod="sim")
                pool.append((uname, spec))
        s.commit()
        # Annotators take turns (like a live queue) until nobody gets more work.
        active = list(pool)
        while active:
            still = []
            for uname, spec in active:
                task = services.next_task(s, uname, name, rng)
                if task is None:
                    continue
                still.append((uname, spec))
                texts = [c["text"] for c in task["candidates"]]
                util = [support.gold_scores(task["prompt"], t) for t in texts]
                total = [sum(support.WEIGHTS[d] * u[d] for d in support.WEIGHTS) for u in util]
                choice = _decide(spec["type"], spec, total[0], total[1], rng)
                gap = abs(total[0] - total[1])
                answer = {
                    "schema_version": task["schema_version"],
                    "choice": choice,
                    "strength": None if choice == "tie" else (1 if gap < 0.1 else 2 if gap < 0.3 else 3),
                    "dimensions": {
                        d: _decide(spec["type"], spec, util[0][d], util[1][d], rng)
                        for d in support.DIMENSIONS
                    },
                    "duration_s": rng.uniform(8, 40),
                }
                services.submit(s, uname, task["assignment_id"], answer, client_id=uuid.uuid4().hex)
            active = still
        actions = qc.evaluate_and_apply(s, name, actor=None)
        exported = export.export_project(s, ctx.store, name, method=params.get("aggregation", "dawid_skene"))
        judgments = services.load_judgments(s, name)
        states = {u.username: u.qc_state for u in s.query(User).filter(User.username.like(f"{name}-%"))}

    flagged = {a["annotator"] for a in actions if a["action"] in ("restrict", "suspend", "recertify")}
    unreliable = {u for u, spec in pool if spec["type"] in ("spammer", "position_biased")}
    tp = len(flagged & unreliable)
    precision = tp / len(flagged) if flagged else 1.0
    recall = tp / len(unreliable) if unreliable else 1.0

    # Estimated reliability per annotator: agreement with gold and with the consensus.
    pref = ctx.store.read_dataset(exported["preferences"]).to_pylist()
    consensus = {r["item_id"]: r["label"] for r in pref}
    overall = judgments[judgments["dimension"] == "overall"]
    annotators = []
    for uname, spec in pool:
        mine = overall[overall["annotator_id"] == uname]
        gold = mine[mine["is_gold"]]
        reg = mine[~mine["is_gold"]]
        gold_acc = float((gold["label"] == gold["gold_label"]).mean()) if len(gold) else None
        agree = [
            consensus.get(i) == lab
            for i, lab in zip(reg["item_id"], reg["label"], strict=True)
            if i in consensus
        ]
        annotators.append(
            {
                "annotator": uname.removeprefix(f"{name}-"),
                "type": spec["type"],
                "true_reliability": {"expert": 0.95, "regular": 0.8, "position_biased": 0.55, "spammer": 0.5}[
                    spec["type"]
                ],
                "estimated_skill": float(np.mean(agree)) if agree else None,
                "gold_accuracy": gold_acc,
                "flagged": uname in flagged,
                "qc_state": states.get(uname),
            }
        )

    # Training pairs: consensus label, soft label as weight, ties dropped; lineage to the export.
    rows = []
    for r in pref:
        if r["label"] == "tie":
            continue
        p_chosen = r["p_a"] if r["label"] == "A" else 1.0 - r["p_a"]
        rows.append(
            {
                "id": r["item_id"],
                "prompt": r["prompt"],
                "chosen": " " + r["chosen"],
                "rejected": " " + r["rejected"],
                "weight": float(p_chosen),
                "meta": json.dumps({"n_votes": r["n_votes"], "method": r["method"]}),
            }
        )
    pairs = ctx.store.put_dataset(
        rows,
        kind="pairs",
        name="quickstart-preferences",
        parents=[(exported["preferences"], "preferences")],
        tags=["quickstart"],
    )
    gaps = [
        support.gold_utility(r["prompt"], r["chosen"]) - support.gold_utility(r["prompt"], r["rejected"])
        for r in rows
    ]
    decided = [g for g in gaps if abs(g) > 1e-9]  # pairs the gold scorer cannot separate say nothing
    return {
        "pairs_dataset": pairs,
        "preferences": exported["preferences"],
        "annotations": exported["annotations"],
        "project": name,
        "n_items": len(items),
        "n_judgments": int(len(overall)),
        "n_pairs": len(rows),
        "label_accuracy_vs_gold": sum(g > 0 for g in decided) / len(decided) if decided else None,
        "detection_precision": precision,
        "detection_recall": recall,
        "qc_actions": [{k: a[k] for k in ("annotator", "action", "reason")} for a in actions],
        "annotators": annotators,
    }


# ------------------------------------------------------------------------------- evaluation


def evaluate(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """Gold utility of each policy on held-out prompts with bootstrap CIs; win rate vs SFT;
    reward-model accuracy and calibration against gold preferences; reward-hacking checks."""
    from alignflow.evaluate import hacking, reward, stats

    prompts = _prompts_of(ctx, params["prompts"])
    seed = params.get("seed", 0)
    base = params.get("baseline", "sft")
    max_new = params.get("max_new_tokens", 48)

    def score(temperature: float, k: int) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
        """k samples per prompt, averaged per prompt (paired by prompt across policies)."""
        responses, utilities = {}, {}
        for name, model_dir in params["policies"].items():
            samples = generate(
                model_dir, prompts, n=k, temperature=temperature, max_new_tokens=max_new, seed=seed
            )
            responses[name] = [r[0] for r in samples]
            utilities[name] = [
                float(np.mean(support.gold_utility_batch([p] * k, r)))
                for p, r in zip(prompts, samples, strict=True)
            ]
        return responses, utilities

    def summarize(utilities: dict[str, list[float]]) -> tuple[dict, dict, dict]:
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

    # Primary: each policy's own sampling distribution (what RLHF optimises).
    responses, utilities = score(params.get("temperature", 1.0), params.get("samples_per_prompt", 4))
    policies, diffs, wins = summarize(utilities)
    out: dict[str, Any] = {"policies": policies, "diff_vs_" + base: diffs, "win_rates": wins}
    if params.get("greedy", True):
        # Secondary: greedy decoding. Reported beside the primary figures, never instead of them.
        _, greedy_u = score(0.0, 1)
        g_pol, g_diff, _ = summarize(greedy_u)
        out["greedy"] = {"policies": g_pol, "diff_vs_" + base: g_diff}

    # Reward model against gold preferences on fresh SFT pairs.
    if params.get("reward_model_dir"):
        from alignflow.models.reward import load_reward_scorer

        scorer = load_reward_scorer(params["reward_model_dir"])
        pairs = generate(
            params["policies"][base],
            prompts,
            n=2,
            temperature=1.0,
            max_new_tokens=params.get("max_new_tokens", 48),
            seed=seed + 1,
        )
        a = [p[0] for p in pairs]
        b = [p[1] for p in pairs]
        sa = np.asarray(scorer(prompts, a)[0], dtype=float)
        sb = np.asarray(scorer(prompts, b)[0], dtype=float)
        gold_gap = np.asarray(support.gold_utility_batch(prompts, a)) - np.asarray(
            support.gold_utility_batch(prompts, b)
        )
        acc, n_used = reward.gold_agreement(sa - sb, gold_gap)
        keep = np.abs(gold_gap) > 1e-9
        probs = 1.0 / (1.0 + np.exp(-(sa - sb)[keep]))
        out["reward_model"] = {
            "gold_accuracy": acc,
            "n_pairs": n_used,
            "calibration": reward.calibration(probs, (gold_gap[keep] > 0).astype(float)),
        }

    # PPO monitor: proxy reward vs gold utility over steps, from the run's metrics.
    if params.get("ppo_run_id"):
        rows = ctx.store.metrics(params["ppo_run_id"])
        series: dict[str, dict[int, float]] = {}
        for step, name, value in rows:
            series.setdefault(name, {})[step] = value
        proxy, gold = series.get("monitor/proxy_reward", {}), series.get("monitor/score", {})
        length = series.get("monitor/response_len", {})
        steps = sorted(set(proxy) & set(gold))
        if steps:
            pg: dict[str, list] = {
                "steps": steps,
                "proxy": [proxy[s] for s in steps],
                "gold": [gold[s] for s in steps],
            }
            if all(s in length for s in steps):
                pg["length"] = [length[s] for s in steps]
            out["proxy_vs_gold"] = pg
            out["warnings"] = hacking.detect_reward_hacking(steps, pg["proxy"], pg["gold"], pg.get("length"))
    out["samples"] = [
        {"prompt": prompts[i], "policy": name, "response": responses[name][i], "gold": utilities[name][i]}
        for i in range(min(3, len(prompts)))
        for name in responses
    ]
    (ctx.work_dir / "responses.json").write_text(
        json.dumps({"prompts": prompts, "responses": responses, "utilities": utilities}, indent=1)
    )
    return out


# ------------------------------------------------------------------------------- report


def _curves(
    ctx: StageContext, runs: dict[str, str], wanted: dict[str, list[str]]
) -> dict[str, dict[str, list]]:
    curves: dict[str, dict[str, list]] = {}
    for stage, names in wanted.items():
        rid = runs.get(stage)
        if not rid:
            continue
        for name in names:
            pts = [[step, v] for step, _, v in ctx.store.metrics(rid, name)]
            if pts:
                curves.setdefault(f"{stage}", {})[name] = pts
    return curves


def report(params: dict[str, Any], ctx: StageContext) -> dict[str, Any]:
    """The HTML report of the whole loop, plus the summary the terminal prints."""
    from datetime import UTC, datetime

    from alignflow.evaluate.report import print_summary, write_report
    from alignflow.store.render import to_tree_lines

    o = ctx.outputs
    ev = o[params.get("evaluate_stage", "evaluate")]
    fb = o.get(params.get("feedback_stage", "feedback"), {})
    runs = {s: o[s]["run_id"] for s in ("sft", "rm", "ppo", "dpo") if s in o and "run_id" in o[s]}
    state_file = ctx.store.workspace.home / "pipelines" / params["pipeline"] / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    stage_times = {k: round(v.get("seconds", 0.0), 1) for k, v in state.items() if "seconds" in v}
    base = params.get("baseline", "sft")
    diffs = ev.get(f"diff_vs_{base}", {})
    summary = []
    for name, p in ev["policies"].items():
        row = {"policy": name, "gold utility": f"{p['mean']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]"}
        if name in diffs:
            d = diffs[name]
            row[f"Δ vs {base}"] = f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
            w = ev["win_rates"][name]
            row[f"win rate vs {base}"] = f"{w['rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}]"
        summary.append(row)
    verdicts = [
        f"{name.upper()} {'beats' if d['lo'] > 0 else 'does not beat'} {base.upper()} on gold utility: "
        f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
        for name, d in diffs.items()
    ]
    final = params.get("final_policy")
    lineage = to_tree_lines(ctx.store.lineage(final)) if final else []
    rm = ev.get("reward_model", {})
    data = {
        "title": "alignflow quickstart: the RLHF loop on customer support",
        "created_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "verdict": " · ".join(verdicts),
        "summary_rows": summary,
        "warnings": ev.get("warnings", []),
        "stage_times": stage_times,
        "policies": ev["policies"],
        "win_rates": ev["win_rates"],
        "curves": _curves(
            ctx,
            runs,
            {
                "sft": ["loss", "eval/loss"],
                "rm": ["loss", "eval/accuracy"],
                "dpo": ["loss", "rewards/margins"],
                "ppo": ["reward/raw", "kl/seq_sum"],
            },
        ),
        "proxy_vs_gold": ev.get("proxy_vs_gold"),
        "reliability": rm.get("calibration"),
        "annotators": fb.get("annotators", []),
        "lineage": lineage,
        "samples": ev.get("samples", []),
        "facts": {
            "reward model accuracy vs gold": rm.get("gold_accuracy"),
            "feedback judgments": fb.get("n_judgments"),
            "preference pairs": fb.get("n_pairs"),
            "consensus labels agreeing with gold": fb.get("label_accuracy_vs_gold"),
            "unreliable-annotator detection precision": fb.get("detection_precision"),
            "unreliable-annotator detection recall": fb.get("detection_recall"),
        },
    }
    for name, d in ev.get("greedy", {}).get(f"diff_vs_{base}", {}).items():
        data["facts"][f"greedy decoding: {name} − {base} gold utility"] = (
            f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
        )
    out_dir = ctx.store.workspace.reports_dir / params.get("name", params["pipeline"])
    path = write_report(out_dir, data)
    from rich.console import Console

    print_summary(data, Console(), path)
    aid = ctx.store.put_file(
        path, kind="report", name=f"{params['pipeline']}-report", parents=[(final, "policy")] if final else []
    )
    return {"report_path": str(path), "report": aid, "verdicts": verdicts, "stage_times": stage_times}
