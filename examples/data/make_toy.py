"""Write the toy datasets in this folder (deterministic; the same generator the recipe tests use).

Run from the repo root: `python examples/data/make_toy.py`. The texts are synthetic (written for this
project, no third-party content); sentences reuse the vocabulary of `alignflow.models.tiny.default_corpus`.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests" / "recipes"))

import toy  # noqa: E402

if __name__ == "__main__":
    toy.write_jsonl(HERE / "toy_sft.jsonl", toy.sft_rows(64))
    toy.write_jsonl(HERE / "toy_pairs.jsonl", toy.pair_rows(64))
    toy.write_jsonl(HERE / "toy_rankings.jsonl", toy.ranking_rows(24))
    print(f"wrote toy_sft.jsonl, toy_pairs.jsonl, toy_rankings.jsonl to {HERE}")
