"""Agreement and aggregation on real human feedback (PandaLM, DICES-350); prints the tables.

Run: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quality_realdata.py [DATA_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from alignflow.quality.datasets import dices_tables, pandalm_tables

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main(data_dir: Path = DEFAULT_DATA) -> None:
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 20)
    p = pandalm_tables(data_dir / "pandalm" / "testset-v1.json")
    print("== PandaLM testset-v1 (999 items x 3 annotators, labels A/B/tie) ==")
    print(p["summary"].to_string(index=False))
    print("\nCohen's kappa per annotator pair:")
    print(p["kappa_pairs"].to_string(index=False))
    d = dices_tables(
        data_dir / "dices" / "dices_350_crowdsourced.json", data_dir / "dices" / "dices_350_expert.json"
    )
    print("\n== DICES-350 (350 items x 123 raters, Yes/No/Unsure) ==")
    print(d["summary"].to_string(index=False))
    print("\nConsensus vs expert labels (items where the expert said Yes/No):")
    print(d["vs_expert"].to_string(index=False))
    print("\nRaters ranked by Dawid-Skene skill (top 10 and bottom 10):")
    ranked = d["raters"]
    print(pd.concat([ranked.head(10), ranked.tail(10)]).to_string(index=False))
    print(
        f"\nSpearman correlation of DS skill with agreement-with-expert over raters: {d['skill_vs_expert_spearman']:.3f}"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DATA)
