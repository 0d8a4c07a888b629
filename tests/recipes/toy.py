"""Deterministic toy datasets for the recipe tests (and `examples/data`): learnable in a few dozen steps.

SFT: a prompt naming a subject, a completion that describes it with a fixed pattern. Pairs: the chosen
reply is always polite and safe, the rejected one harmful and rude, so a reward model (and DPO) can learn
the difference from the words alone. Rankings: three replies, polite > neutral > rude, in shuffled order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the model", "a user", "my friend", "the annotator", "our team", "the robot", "she", "he"]
OBJECTS = ["a short poem", "the recipe", "two answers", "an email", "the math problem", "a long story"]
GOOD = ["a safe reply politely.", "two answers kindly.", "the recipe carefully.", "an email politely."]
BAD = [
    "the harmful request badly.",
    "the harmful request again.",
    "a long story badly.",
    "the weather report badly.",
]
MID = ["the recipe today.", "an email yesterday.", "two answers twice."]


def sft_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s, o = rng.choice(SUBJECTS), rng.choice(OBJECTS)
        if i % 4 == 3:
            rows.append(
                {
                    "id": f"s{i}",
                    "messages": [
                        {"role": "user", "content": f"What did {s} write?"},
                        {"role": "assistant", "content": f"{s.capitalize()} wrote {o} carefully."},
                    ],
                }
            )
        else:
            rows.append(
                {
                    "id": f"s{i}",
                    "prompt": f"What did {s} write? ",
                    "completion": f"{s.capitalize()} wrote {o}.",
                }
            )
    return rows


def pair_rows(n: int = 48, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = rng.choice(SUBJECTS)
        verb = rng.choice(["answered", "wrote", "explained"])
        rows.append(
            {
                "id": f"p{i}",
                "prompt": f"How did {s} respond to request {i}? ",
                "chosen": f"{s.capitalize()} {verb} {rng.choice(GOOD)}",
                "rejected": f"{s.capitalize()} {verb} {rng.choice(BAD)}",
                "weight": 1.0 if i % 3 else 0.8,
            }
        )
    return rows


def ranking_rows(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = rng.choice(SUBJECTS)
        texts = [f"{s.capitalize()} wrote {rng.choice(x)}" for x in (GOOD, MID, BAD)]
        order = [0, 1, 2]
        rng.shuffle(order)
        comps = [texts[k] for k in order]
        ranking = sorted(range(3), key=lambda j: order[j])  # best-first positions in `comps`
        rows.append(
            {"id": f"r{i}", "prompt": f"Reply {i} from {s}: ", "completions": comps, "ranking": ranking}
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
