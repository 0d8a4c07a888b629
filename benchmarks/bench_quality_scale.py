"""Aggregate ~1,000,000 pairwise judgments (100k items x 10 annotators) with majority vote and Dawid-Skene;
prints wall time and peak traced Python memory (tracemalloc) per method, plus peak RSS of the process.

Run: .venv/bin/python benchmarks/bench_quality_scale.py [N_ITEMS] [OVERLAP]
"""

from __future__ import annotations

import resource
import sys
import time
import tracemalloc

import numpy as np
import pandas as pd

from alignflow.quality.aggregate import aggregate


def make_judgments(
    n_items: int, overlap: int, n_annotators: int = 200, seed: int = 0
) -> tuple[pd.DataFrame, np.ndarray]:
    """Vectorised synthetic pool: each item judged by `overlap` random annotators of accuracy U(0.55, 0.95)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 2, size=n_items)
    acc = rng.uniform(0.55, 0.95, size=n_annotators)
    if n_annotators < overlap:
        raise ValueError("need at least `overlap` annotators")
    # Distinct annotators per item without a per-item Python loop: a random start plus a fixed stride.
    stride = n_annotators // overlap
    start = rng.integers(0, n_annotators, size=(n_items, 1))
    ann = (start + np.arange(overlap) * stride) % n_annotators
    item = np.repeat(np.arange(n_items), overlap)
    worker = ann.ravel()
    correct = rng.random(item.size) < acc[worker]
    label = np.where(correct, truth[item], 1 - truth[item])
    df = pd.DataFrame(
        {
            "item_id": pd.Series(item).map("i{:06d}".format),
            "annotator_id": pd.Series(worker).map("w{:03d}".format),
            "label": np.where(label == 0, "A", "B").astype(object),
            "kind": "pairwise",
            "dimension": "overall",
            "shown_swapped": rng.random(item.size) < 0.5,
        }
    )
    return df, truth


def main(n_items: int = 100_000, overlap: int = 10) -> None:
    t0 = time.perf_counter()
    df, truth = make_judgments(n_items, overlap)
    print(f"generated {len(df):,} judgments on {n_items:,} items in {time.perf_counter() - t0:.1f}s")
    truth_labels = pd.Series(np.where(truth == 0, "A", "B"), index=[f"i{i:06d}" for i in range(n_items)])
    import crowdkit.aggregation  # noqa: F401  (import cost excluded from the timings)

    print(f"{'method':<14} {'seconds':>8} {'peak traced MB':>15} {'accuracy':>9}")
    for method in ("majority_vote", "dawid_skene"):
        tracemalloc.start()
        t0 = time.perf_counter()
        out = aggregate(df, method)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        acc = float((out.set_index("item_id")["label"] == truth_labels).mean())
        print(f"{method:<14} {seconds:>8.1f} {peak / 2**20:>15.0f} {acc:>9.4f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of the whole process: {rss:.0f} MB")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*args)
