"""Hybrid human/AI feedback on the quickstart's domain: reward-model gold accuracy from human labels only, AI
labels only, and hybrid routing, at an equal human-label budget. Mean and 95% CI over seeds.

Setup, per seed (shared by every arm):
- pool: POOL customer-support pairs (prompt, two replies from the domain generator, each quality dimension
  good with probability 1/2); held-out: HELD more pairs ordered by the domain's gold utility (exact ties out);
- humans: the quickstart's simulated pool and vote function (3 experts, 6 regulars, 2 spammers, 1
  position-biased), OVERLAP votes per item, display order shuffled per vote, soft label = share of A among the
  decisive votes; the human budget is HUMAN_ITEMS items (= HUMAN_ITEMS * OVERLAP votes) in every arm that has
  humans;
- the judge: `rule:bench_hybrid_feedback:surface_judge` through `alignflow.judges` — a simulated LLM judge.
  It sees only the prompt and the two replies, never the gold scorer or the ticket's facts. It scores the
  surface cues a guideline names (greeting and closing, rudeness, an apology when the customer sounds upset, a
  reply that names the customer's order id or product, a vague "i will look into it"), with the two biases
  documented for LLM judges (Zheng et al. 2023, §3.4): verbosity (it prefers longer replies where the guideline
  wants concise ones) and position (on a close call, rubric gap < CLOSE, it picks the reply shown first).
  Confidence = sigmoid(gap / TAU). Every pair is judged in both orders (`judge_pairs`, `orders="both"`);
- the reward model: the embedding Bradley-Terry model of `alignflow.quality.efficiency` (all-MiniLM-L6-v2 of
  prompt + reply, a linear head fitted by logistic regression on soft labels).

Arms:
- `human only`: HUMAN_ITEMS random items, human labels;
- `AI only`: every pool item, the judge's labels; order-inconsistent pairs dropped;
- `hybrid (uncertainty routing)`: the judge labels the pool; the HUMAN_ITEMS items it is least sure of
  (order-inconsistent first, then lowest confidence) go to humans instead;
- `hybrid (random routing)`: the same, but the human items are chosen at random (what the routing buys).

Run: .venv/bin/python benchmarks/bench_hybrid_feedback.py [--seeds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.domains import quickstart as qs  # noqa: E402
from alignflow.domains import support  # noqa: E402
from alignflow.judges import Verdict, judge_pairs, load_judge  # noqa: E402
from alignflow.quality.efficiency import bt_accuracy, fit_bt_linear, text_embedder  # noqa: E402

POOL = 1500
HELD = 600
OVERLAP = 3
HUMAN_ITEMS = 150
CLOSE = 0.25
TAU = 0.5
ARMS = (
    "human only",
    "AI only",
    "hybrid (uncertainty routing)",
    "hybrid, confident AI only",
    "hybrid (random routing)",
)
CONFIDENT = 0.8
JUDGES = {
    "verbosity-biased judge": "rule:bench_hybrid_feedback:surface_judge",
    "guideline-following judge": "rule:bench_hybrid_feedback:concise_judge",
}

_OID = re.compile(r"\ba\d{3}\b")


def _surface_score(prompt: str, reply: str, per_word: float = 0.02) -> float:
    p, r = prompt.lower(), reply.lower()
    s = 0.0
    s += 0.5 * ("thank you for contacting us" in r) + 0.5 * ("anything else i can help" in r)
    s -= 1.0 * any(x in r for x in ("what do you want", "do not ask again"))
    if any(x in p for x in ("!", "angry", "ridiculous")):
        s += 0.5 * ("sorry" in r)
    ids = set(_OID.findall(p))
    named = bool(ids & set(_OID.findall(r))) or any(w in r for w in support.PRODUCTS if w in p)
    s += 0.8 * named - 0.5 * ("look into it" in r)
    # > 0: verbosity bias (the guideline wants concise replies, this judge likes long ones); < 0: follows it
    s += per_word * len(r.split())
    return s


def _judge(prompt: str, candidates: Sequence[str], per_word: float) -> Verdict:
    a, b = (_surface_score(prompt, c, per_word) for c in candidates)
    gap = a - b
    if abs(gap) < CLOSE:  # a close call: position bias decides
        return Verdict(winner=0, ranking=(0, 1), scores=(a, b), confidence=0.5 + abs(gap) / 4)
    conf = 1 / (1 + math.exp(-abs(gap) / TAU))
    return Verdict.from_scores([a, b], confidence=conf)


def surface_judge(prompt: str, candidates: Sequence[str]) -> Verdict:
    """The simulated LLM judge with a verbosity bias (see the module docstring); deterministic."""
    return _judge(prompt, candidates, 0.02)


def concise_judge(prompt: str, candidates: Sequence[str]) -> Verdict:
    """The same judge without the verbosity bias: it prefers shorter replies, as the guideline asks."""
    return _judge(prompt, candidates, -0.02)


def make_pairs(n: int, rng: random.Random) -> list[tuple[str, str, str, float, float]]:
    out = []
    while len(out) < n:
        t = support.sample_ticket(rng)
        p = t.prompt(rng)
        a, b = (
            support.write_response(t, {d: rng.random() < 0.5 for d in support.DIMENSIONS}, rng) for _ in "ab"
        )
        if a != b:
            out.append((p, a, b, support.gold_utility(p, a), support.gold_utility(p, b)))
    return out


def human_label(item: tuple, people: list[dict], rng: random.Random) -> float | None:
    """Share of A among OVERLAP simulated votes (display order shuffled per vote); None if all ties."""
    votes = []
    for spec in rng.sample(people, OVERLAP):
        swapped = rng.random() < 0.5
        ua, ub = item[3], item[4]
        choice = qs._decide(spec["type"], spec, ub if swapped else ua, ua if swapped else ub, rng)
        if choice != "tie":
            votes.append((choice == "left") != swapped)
    return sum(votes) / len(votes) if votes else None


_DATA: dict[int, tuple] = {}


def seed_data(seed: int, embed) -> tuple:
    """(pool, held, pool embedding differences, held differences), computed once per seed for every judge."""
    if seed not in _DATA:
        rng = random.Random(5000 + seed)
        pool, held = make_pairs(POOL, rng), make_pairs(HELD, rng)
        held = [h for h in held if abs(h[3] - h[4]) > 1e-9]
        diff = embed([f"{p}\n{a}" for p, a, *_ in pool]) - embed([f"{p}\n{b}" for p, _, b, *_ in pool])
        held_diff = embed([f"{p}\n{a}" for p, a, *_ in held]) - embed([f"{p}\n{b}" for p, _, b, *_ in held])
        _DATA[seed] = (pool, held, diff, held_diff)
    return _DATA[seed]


def run_seed(seed: int, embed, spec: str) -> tuple[dict[str, dict], dict]:
    pool, held, diff, held_diff = seed_data(seed, embed)
    held_labels = ["A" if h[3] > h[4] else "B" for h in held]
    people = [spec for spec in qs.DEFAULT_POOL for _ in range(spec["count"])]

    judge = load_judge(spec)
    verdicts = judge_pairs(judge, [(p, a, b) for p, a, b, *_ in pool], orders="both", on_inconsistent="drop")
    # soft labels: the judge's confidence in its (order-consistent) winner, so close calls weigh little
    ai = {
        i: (v.confidence if v.winner == 0 else 1.0 - v.confidence)
        for i, v in enumerate(verdicts)
        if not v.dropped
    }
    gold_a = np.array([it[3] > it[4] for it in pool])
    decisive = [i for i in ai if pool[i][3] != pool[i][4]]
    judge_stats = {
        "consistent": sum(bool(v.consistent) for v in verdicts) / len(verdicts),
        "accuracy": float(np.mean([(ai[i] > 0.5) == gold_a[i] for i in decisive])),
    }
    # least sure first: order-inconsistent pairs, then by confidence
    unsure = sorted(
        range(len(pool)), key=lambda i: (bool(verdicts[i].consistent), verdicts[i].confidence or 0.5)
    )

    def humans(items: Sequence[int]) -> dict[int, float]:
        hr = random.Random(seed * 104729 + len(items))
        out = {}
        for i in items:
            p_a = human_label(pool[i], people, hr)
            if p_a is not None:
                out[i] = p_a
        return out

    random_items = random.Random(seed).sample(range(len(pool)), HUMAN_ITEMS)
    labels = {
        "human only": humans(random_items),
        "AI only": ai,
        "hybrid (uncertainty routing)": {
            **{i: y for i, y in ai.items() if i not in set(unsure[:HUMAN_ITEMS])},
            **humans(unsure[:HUMAN_ITEMS]),
        },
        "hybrid, confident AI only": {
            **{
                i: y
                for i, y in ai.items()
                if i not in set(unsure[:HUMAN_ITEMS]) and abs(y - 0.5) >= CONFIDENT - 0.5
            },
            **humans(unsure[:HUMAN_ITEMS]),
        },
        "hybrid (random routing)": {
            **{i: y for i, y in ai.items() if i not in set(random_items)},
            **humans(random_items),
        },
    }
    out = {}
    for arm in ARMS:
        lab = labels[arm]
        idx = np.fromiter(lab, dtype=int)
        w = fit_bt_linear(diff[idx], np.fromiter(lab.values(), dtype=float))
        out[arm] = {
            "accuracy": bt_accuracy(w, held_diff, held_labels),
            "n_labels": len(lab),
            "n_held": len(held),
        }
    return out, judge_stats


def main(seeds: int = 5, write: bool = True) -> None:
    from scipy import stats

    t0 = time.perf_counter()
    embed = text_embedder()

    def ci(xs: list[float]) -> str:
        m = statistics.mean(xs)
        if len(xs) < 2:
            return f"{m:.3f}"
        h = stats.t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
        return f"{m:.3f} ({m - h:.3f}–{m + h:.3f})"

    header = [
        "judge",
        "labels",
        "gold accuracy, mean (95% CI over seeds)",
        "per seed",
        "pairs",
        "human votes",
    ]
    rows, notes, n_held = [], [], 0
    for judge_name, spec in JUDGES.items():
        per: dict[str, list[dict]] = {a: [] for a in ARMS}
        judge_stats = []
        for seed in range(seeds):
            res, js = run_seed(seed, embed, spec)
            judge_stats.append(js)
            for arm in ARMS:
                per[arm].append(res[arm])
            n_held = res[ARMS[0]]["n_held"]
            print(
                f"{judge_name}, seed {seed}: " + ", ".join(f"{a} {res[a]['accuracy']:.3f}" for a in ARMS),
                flush=True,
            )
        for arm in ARMS:
            if arm == "human only" and rows:
                continue  # the same labels whichever judge: listed once
            accs = [r["accuracy"] for r in per[arm]]
            rows.append(
                [
                    "–" if arm == "human only" else judge_name,
                    arm,
                    ci(accs),
                    " ".join(f"{a:.3f}" for a in accs),
                    f"{statistics.mean(r['n_labels'] for r in per[arm]):.0f}",
                    "0" if arm == "AI only" else f"{HUMAN_ITEMS * OVERLAP}",
                ]
            )
        cons = statistics.mean(j["consistent"] for j in judge_stats)
        jacc = statistics.mean(j["accuracy"] for j in judge_stats)
        notes.append(
            f"{judge_name} (`{spec}`): order-consistent on {cons:.1%} of the pool's pairs, its kept labels agree "
            f"with the gold order on {jacc:.1%}"
        )
    wall = time.perf_counter() - t0
    table = markdown_table(header, rows)
    print(table)
    print("\n".join(notes))
    body = f"""{table}

Judges, mean over seeds (scored against gold here, for this table only; a judge never sees the gold scorer):
{"; ".join(notes)}. Both judges see only the prompt and the two replies and score the guideline's surface cues
(greeting and closing, rudeness, an apology when the customer sounds upset, naming the customer's order id or
product, a vague "i will look into it"); the verbosity-biased one adds 0.02 per word, the guideline-following
one subtracts it; both pick the reply shown first on a close call (gap < {CLOSE}), so those pairs come out
order-inconsistent and are dropped; confidence sigmoid(gap/{TAU}) is the soft label. Each pair is judged in
both orders through `alignflow.judges.judge_pairs`. Pool {POOL} pairs; held-out about {n_held} pairs ordered by
gold utility per seed; human budget {HUMAN_ITEMS} items × {OVERLAP} votes in every arm with humans (the
quickstart's simulated pool). Uncertainty routing sends the judge's order-inconsistent pairs, then its least
confident, to humans; random routing sends random items. Reward model: the embedding Bradley–Terry model
(all-MiniLM-L6-v2, linear head). CI: t interval over {seeds} seeds (0..{seeds - 1}).
`benchmarks/bench_hybrid_feedback.py`, wall time {wall / 60:.1f} min."""
    if write:
        write_section("hybrid-feedback", "Hybrid human/AI feedback: reward-model gold accuracy", body)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    main(args.seeds, write=not args.no_write)
