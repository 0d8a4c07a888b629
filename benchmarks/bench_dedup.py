"""Curation figures: precision/recall of near-duplicate mode on HH pairs with planted near-duplicates, exact mode's
false positives, rows/s of dedup and `stats` on 100k rows, and mixture proportions (100k rows; three languages).

    python benchmarks/bench_dedup.py [--plants 600] [--threshold 0.7] [--rows 100000]

Planted copies of randomly chosen HH pairs, one perturbation each: case, punctuation, whitespace, word swaps
(5% of words), word drops (5%), truncation (the last 15% of the prompt and of each reply), and the same prompt
with another pair's replies. Precision counts every dropped row that is not a planted copy as a false positive.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

from alignflow.data.curation.common import normalize_text, row_text  # noqa: E402
from alignflow.data.curation.dedup import find_duplicates  # noqa: E402
from alignflow.data.formats import split_hh  # noqa: E402

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless" / "train.jsonl"
PLANT_TYPES = (
    "case",
    "punctuation",
    "whitespace",
    "word_swaps",
    "word_drops",
    "truncation",
    "other_response",
)


def hh_pairs(limit: int | None = None) -> list[dict[str, Any]]:
    """HH pairs as normalised rows, rows sharing a normalised prompt removed (HH repeats some prompts with other
    pairs), so the base set holds no duplicate by prompt or by row and every dropped row is a planted copy."""
    rows, seen = [], set()
    with open(HH) as f:
        for line in f:
            rec = json.loads(line)
            prompt, chosen, rejected = split_hh(rec["chosen"], rec["rejected"])
            row = {"id": str(len(rows)), "prompt": prompt, "chosen": chosen, "rejected": rejected}
            key = normalize_text(prompt)
            if key not in seen:
                seen.add(key)
                rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def _words_op(text: str, rng: random.Random, op: str) -> str:
    words = text.split(" ")
    k = max(1, round(0.05 * len(words)))
    if op == "word_swaps" and len(words) > 1:
        for _ in range(k):
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
    elif op == "word_drops" and len(words) > 1:
        for _ in range(min(k, len(words) - 1)):
            del words[rng.randrange(len(words))]
    return " ".join(words)


def perturb(text: str, op: str, rng: random.Random) -> str:
    if op == "case":
        return rng.choice([str.upper, str.lower, str.title, str.swapcase])(text)
    if op == "punctuation":
        stripped = re.sub(r"[^\w\s]", "", text)
        return stripped if stripped != text else text.replace(" ", ", ", 3) + "!"
    if op == "whitespace":
        return re.sub(r" ", lambda _: rng.choice([" ", "  ", "\n", " \t "]), text)
    if op in ("word_swaps", "word_drops"):
        return _words_op(text, rng, op)
    if op == "truncation":
        return text[: max(1, int(len(text) * 0.85))]
    raise ValueError(op)


def plant(base: list[dict[str, Any]], n: int, seed: int = 0) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """base + n planted copies (shuffled in); returns rows and {row index: plant type} of the copies."""
    rng = random.Random(seed)
    copies = []
    for i in range(n):
        src = rng.choice(base)
        op = PLANT_TYPES[i % len(PLANT_TYPES)]
        row = dict(src, id=f"plant{i}")
        if op == "other_response":
            other = rng.choice([r for r in rng.sample(base, 3) if r is not src])
            row.update(chosen=other["chosen"], rejected=other["rejected"])
        else:
            for f in ("prompt", "chosen", "rejected"):
                row[f] = perturb(row[f], op, rng)
            if row_text(row, "row") == row_text(src, "row"):  # e.g. a one-word reply: perturb the prompt
                row["prompt"] = perturb(row["prompt"], "word_drops", rng)
        copies.append((row, op))
    # Copies go after the originals so the original is the kept row of its cluster.
    rows = list(base) + [c for c, _ in copies]
    return rows, {len(base) + i: op for i, (_, op) in enumerate(copies)}


def score(keep: list[bool], planted: dict[int, str]) -> dict[str, Any]:
    dropped = {i for i, k in enumerate(keep) if not k}
    tp = len(dropped & planted.keys())
    per_type = {}
    for t in PLANT_TYPES:
        idx = [i for i, op in planted.items() if op == t]
        per_type[t] = sum(i in dropped for i in idx) / max(1, len(idx))
    return {
        "precision": tp / max(1, len(dropped)),
        "recall": tp / max(1, len(planted)),
        "false_positives": len(dropped - planted.keys()),
        "per_type": per_type,
    }


def evaluate(rows: list[dict[str, Any]], planted: dict[int, str], by: str, **modes: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = find_duplicates(rows, by=by, **modes)
    out = score(res.keep, planted)
    out["seconds"] = time.perf_counter() - t0
    return out


def synthetic_rows(n: int, base: list[dict[str, Any]], seed: int = 1) -> list[dict[str, Any]]:
    """n distinct rows with HH's vocabulary and lengths (random word sequences), 5% planted duplicates."""
    rng = random.Random(seed)
    vocab = [w for r in base for w in r["prompt"].split()]
    rows = []
    for i in range(n):
        if rows and rng.random() < 0.05:
            src = rng.choice(rows)
            rows.append(dict(src, id=str(i), prompt=perturb(src["prompt"], "word_drops", rng)))
            continue
        t = rng.choice(base)
        rows.append(
            {
                "id": str(i),
                "prompt": " ".join(rng.choices(vocab, k=len(t["prompt"].split()))),
                "chosen": " ".join(rng.choices(vocab, k=len(t["chosen"].split()) + 1)),
                "rejected": " ".join(rng.choices(vocab, k=len(t["rejected"].split()) + 1)),
                "weight": 1.0,
                "meta": "{}",
            }
        )
    return rows


LANG_SENTENCES = {
    "en": [
        "Could you explain how the weather forecast is made every morning?",
        "I would like to know which train goes to the airport tonight.",
        "My grandmother always tells wonderful stories about her childhood.",
    ],
    "fr": [
        "Pourriez-vous m'expliquer comment la météo est préparée chaque matin ?",
        "Je voudrais savoir quel train va à l'aéroport ce soir.",
        "Ma grand-mère raconte toujours de belles histoires de son enfance.",
    ],
    "de": [
        "Könnten Sie mir erklären, wie die Wettervorhersage jeden Morgen entsteht?",
        "Ich möchte wissen, welcher Zug heute Abend zum Flughafen fährt.",
        "Meine Großmutter erzählt immer wunderbare Geschichten aus ihrer Kindheit.",
    ],
}


def mix_figures(rows: int = 100_000) -> str:
    """Realised source shares over `rows` rows (5 seeds) and temperature-balanced language shares."""
    from collections import Counter

    from alignflow.data.curation.lang import detect_languages
    from alignflow.data.curation.mix import mix_rows

    def source(label: str, n: int) -> list[dict[str, Any]]:
        return [{"id": str(i), "prompt": f"{label} {i}", "completion": "c", "meta": "{}"} for i in range(n)]

    sources = [("a", source("a", 60_000)), ("b", source("b", 25_000)), ("c", source("c", 5_000))]
    weights = [0.5, 0.3, 0.2]
    worst, t_mix = 0.0, []
    for seed in range(5):
        t0 = time.perf_counter()
        out, _ = mix_rows(sources, weights, rows=rows, seed=seed)
        t_mix.append(time.perf_counter() - t0)
        shares = Counter(json.loads(r["meta"])["mix_source"] for r in out)
        worst = max(
            worst, *(abs(shares[lab] / rows - w) for (lab, _), w in zip(sources, weights, strict=True))
        )
    src = [
        {"id": f"{lang}{i}", "prompt": LANG_SENTENCES[lang][i % 3], "completion": "c", "meta": "{}"}
        for lang, n in (("en", 800), ("fr", 150), ("de", 50))
        for i in range(n)
    ]
    lang_rows = []
    for t in (1.0, 0.7, 0.5, 0.3):
        out, report = mix_rows([("s", src)], [1.0], rows=10_000, seed=0, temperature=t)
        detected = Counter(detect_languages([r["prompt"] for r in out]))
        p = {"en": 0.8, "fr": 0.15, "de": 0.05}
        z = sum(v**t for v in p.values())
        lang_rows.append(
            [f"{t}", *(f"{p[c] ** t / z:.3f} / {detected[c] / 10_000:.3f}" for c in ("en", "fr", "de"))]
        )
    mix_table = markdown_table(
        ["rows", "weights", "seeds", "largest deviation of a share from its weight", "time per mixture"],
        [
            [
                f"{rows:,}",
                "0.5 / 0.3 / 0.2 (source c has 5,000 rows: each used 4 times)",
                "5",
                f"{worst * 100:.4f} pp",
                f"{sorted(t_mix)[2]:.2f} s",
            ]
        ],
    )
    lang_table = markdown_table(["temperature", "en: target / detected", "fr", "de"], lang_rows)
    return (
        "Source shares (largest-remainder counts, so the error is under 1/N):\n\n"
        + mix_table
        + "\n\nLanguage balancing inside one source of 1,000 rows (80% en, 15% fr, 5% de), 10,000 rows drawn; "
        "target share ∝ p^T, detected = lingua on the drawn rows:\n\n" + lang_table
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plants", type=int, default=700)
    ap.add_argument("--threshold", type=float, default=0.7)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    base = hh_pairs()
    rows, planted = plant(base, args.plants)
    results = []
    for label, by, modes in (
        (f"near T={args.threshold}, by row", "row", {"exact": False, "near": args.threshold}),
        (f"near T={args.threshold}, by prompt", "prompt", {"exact": False, "near": args.threshold}),
        ("exact, by row", "row", {"exact": True}),
    ):
        r = evaluate(rows, planted, by, **modes)
        results.append((label, r))
        print(label, json.dumps(r, indent=None))

    table = markdown_table(
        ["mode", "precision", "recall", "false positives", *PLANT_TYPES],
        [
            [
                label,
                f"{r['precision']:.3f}",
                f"{r['recall']:.3f}",
                str(r["false_positives"]),
                *[f"{r['per_type'][t]:.2f}" for t in PLANT_TYPES],
            ]
            for label, r in results
        ],
    )

    from alignflow.data.curation.stats import compute_stats

    big = synthetic_rows(args.rows, base)
    load_start = os.getloadavg()[0]
    timings = []
    for label, by, modes in (
        ("exact, by row", "row", {"exact": True}),
        (f"near T={args.threshold}, by row", "row", {"exact": False, "near": args.threshold}),
    ):
        t0 = time.perf_counter()
        res = find_duplicates(big, by=by, **modes)
        dt = time.perf_counter() - t0
        timings.append([label, f"{len(big):,}", f"{dt:.1f} s", f"{len(big) / dt:,.0f}", str(res.dropped)])
        print(timings[-1])
    t0 = time.perf_counter()
    compute_stats(big, "pairs")
    dt = time.perf_counter() - t0
    timings.append(
        [
            "stats (lengths, languages on a 2k sample, exact duplicates)",
            f"{len(big):,}",
            f"{dt:.1f} s",
            f"{len(big) / dt:,.0f}",
            "",
        ]
    )
    print(timings[-1])
    speed = markdown_table(["operation", "rows", "time", "rows/s", "dropped"], timings)
    body = (
        f"HH harmless pairs ({len(base):,} with distinct prompts) plus {len(planted)} planted near-duplicates "
        f"({len(planted) // len(PLANT_TYPES)} of each type); columns after 'false positives' are recall per "
        "plant type. Character 3-gram MinHash (128 permutations), LSH candidates checked against the "
        "threshold.\n\n"
        + table
        + "\n\nThroughput on synthetic rows with HH's vocabulary and lengths (5% planted word-drop copies), "
        f"one process, 1-minute load average {load_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        "(the machine is shared; other jobs were running):\n\n" + speed
    )
    mix_body = mix_figures(args.rows)
    print(mix_body)
    if not args.no_write:
        write_section("curation-dedup", "Data curation: deduplication", body, ("datasketch",))
        write_section("curation-mix", "Data curation: mixtures", mix_body, ("lingua-language-detector",))


if __name__ == "__main__":
    main()
