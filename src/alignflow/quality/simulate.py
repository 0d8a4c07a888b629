"""Simulated annotator pools with known truth, for testing QC and aggregation and for the quickstart demo.

Items carry a latent true preference: each response has features x (dim `n_features`) and a true reward
r = w . x, so the true margin is d = w . (x_A - x_B); the true label is "A" when d > 0, "B" otherwise, or
"tie" for a `tie_rate` share of items whose responses are made equally good. Each item also has a
difficulty in [0, 1) that pulls every annotator's accuracy toward chance:
P(correct) = 0.5 + (reliability - 0.5) * (1 - difficulty).

Annotator types (a pool is a list of `PoolSpec(type, count, reliability)`):
    expert, regular: answer correctly with the probability above, otherwise pick the other response
        (on a true tie they say "tie" with that probability, otherwise a random side);
    spammer: pick the displayed-left or -right response uniformly at random (reliability ignored);
    adversarial: report the opposite of what they believe, i.e. correct with probability 1 - reliability;
    position_biased: pick the displayed-left response with probability `left_rate`, otherwise judge like a
        regular annotator of the given reliability.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ANNOTATOR_TYPES = ("expert", "regular", "spammer", "adversarial", "position_biased")
UNRELIABLE_TYPES = frozenset({"spammer", "adversarial", "position_biased"})


@dataclass(frozen=True)
class PoolSpec:
    """`count` annotators of one `type` with a given `reliability` (P(correct) on an easy item)."""

    type: str
    count: int
    reliability: float = 0.8
    left_rate: float = 0.85

    def __post_init__(self) -> None:
        if self.type not in ANNOTATOR_TYPES:
            raise ValueError(
                f"PoolSpec.type: unknown annotator type {self.type!r}; expected one of {ANNOTATOR_TYPES}"
            )
        if self.count < 0:
            raise ValueError(f"PoolSpec.count: must be >= 0, got {self.count}")
        if not 0.0 <= self.reliability <= 1.0 or not 0.0 <= self.left_rate <= 1.0:
            raise ValueError("PoolSpec.reliability and left_rate must lie in [0, 1]")


DEFAULT_POOL = (
    PoolSpec("expert", 3, 0.95),
    PoolSpec("regular", 11, 0.85),
    PoolSpec("spammer", 2),
    PoolSpec("adversarial", 2, 0.9),
    PoolSpec("position_biased", 2, 0.85, left_rate=0.9),
)


@dataclass
class Simulation:
    """A simulated annotation round.

    Attributes:
        judgments: a judgments table following `alignflow.quality.schema` (gold items included).
        truth: Series item_id -> true label ("A", "B" or "tie"), for every item.
        items: item_id, true_margin (w . (x_A - x_B)), p_true_a (sigmoid of the margin), difficulty, is_gold.
        features_a, features_b: shape (n_items, n_features), the responses' features, rows in `items` order.
        weights: shape (n_features,), the true reward direction w.
        annotators: annotator_id, type, reliability, left_rate, pod, unreliable.
    """

    judgments: pd.DataFrame
    truth: pd.Series
    items: pd.DataFrame
    features_a: np.ndarray
    features_b: np.ndarray
    weights: np.ndarray
    annotators: pd.DataFrame = field(repr=False)


def simulate_pool(
    pool: list[PoolSpec] | tuple[PoolSpec, ...] = DEFAULT_POOL,
    *,
    n_items: int = 600,
    overlap: int = 3,
    gold_rate: float = 0.1,
    n_gold_items: int = 60,
    tie_rate: float = 0.0,
    difficulty: float = 0.3,
    n_features: int = 16,
    n_pods: int = 2,
    dimension: str = "overall",
    seed: int = 0,
    start: str = "2024-01-01",
    days: int = 14,
) -> Simulation:
    """Simulate `n_items` pairwise items each judged by `overlap` distinct annotators, plus gold judgments.

    Gold: `n_gold_items` extra items with known answers; each annotator additionally judges gold items so that
    about `gold_rate` of their judgments are gold. `difficulty` is the maximum item difficulty (uniform in
    [0, difficulty)). Timestamps spread uniformly over `days` days in submission order.
    """
    if overlap < 1:
        raise ValueError(f"simulate_pool: overlap must be >= 1, got {overlap}")
    if not 0.0 <= gold_rate < 1.0:
        raise ValueError(f"simulate_pool: gold_rate must lie in [0, 1), got {gold_rate}")
    rng = np.random.default_rng(seed)
    specs = [s for s in pool if s.count > 0]
    ann_rows = []
    for spec in specs:
        for _ in range(spec.count):
            i = len(ann_rows)
            ann_rows.append(
                {
                    "annotator_id": f"ann{i:03d}",
                    "type": spec.type,
                    "reliability": 0.5 if spec.type == "spammer" else spec.reliability,
                    "left_rate": spec.left_rate if spec.type == "position_biased" else 0.5,
                    "pod": f"pod{i % n_pods}" if n_pods > 0 else None,
                    "unreliable": spec.type in UNRELIABLE_TYPES,
                }
            )
    annotators = pd.DataFrame(ann_rows)
    n_ann = len(annotators)
    if n_ann < overlap:
        raise ValueError(f"simulate_pool: {n_ann} annotators cannot give {overlap}-way overlap")

    n_total = n_items + n_gold_items
    weights = rng.normal(size=n_features)
    weights /= np.linalg.norm(weights)
    feats_a = rng.normal(size=(n_total, n_features))
    feats_b = rng.normal(size=(n_total, n_features))
    is_tie = rng.random(n_total) < tie_rate
    # A true tie: make both responses equally good along w by removing the margin's component.
    margin = (feats_a - feats_b) @ weights
    feats_b[is_tie] += np.outer(margin[is_tie], weights)
    margin = (feats_a - feats_b) @ weights
    truth_arr = np.where(is_tie, "tie", np.where(margin > 0, "A", "B"))
    diff = rng.uniform(0.0, difficulty, size=n_total) if difficulty > 0 else np.zeros(n_total)
    item_ids = [f"item{i:05d}" for i in range(n_total)]
    gold_mask = np.zeros(n_total, dtype=bool)
    gold_mask[n_items:] = True
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "true_margin": margin,
            "p_true_a": 1.0 / (1.0 + np.exp(-margin)),
            "difficulty": diff,
            "is_gold": gold_mask,
        }
    )

    # k-way overlap: spread regular items evenly by always assigning the least-loaded annotators (random ties).
    load = np.zeros(n_ann)
    pairs: list[tuple[int, int]] = []
    for item in range(n_items):
        order = np.lexsort((rng.random(n_ann), load))
        chosen = order[:overlap]
        load[chosen] += 1
        pairs.extend((item, int(a)) for a in chosen)
    if n_gold_items > 0 and gold_rate > 0:
        for a in range(n_ann):
            n_gold = int(round(load[a] * gold_rate / (1.0 - gold_rate)))
            n_gold = min(n_gold, n_gold_items)
            for g in rng.choice(n_gold_items, size=n_gold, replace=False):
                pairs.append((n_items + int(g), a))
    order = rng.permutation(len(pairs))
    pairs = [pairs[i] for i in order]

    types = annotators["type"].to_numpy()
    rel = annotators["reliability"].to_numpy()
    left_rate = annotators["left_rate"].to_numpy()
    rows = []
    t0 = pd.Timestamp(start, tz="UTC")
    span = pd.Timedelta(days=days)
    for n, (item, a) in enumerate(pairs):
        swapped = bool(rng.random() < 0.5)
        left, right = ("B", "A") if swapped else ("A", "B")
        truth = truth_arr[item]
        p_correct = 0.5 + (rel[a] - 0.5) * (1.0 - diff[item])
        kind = types[a]
        if kind == "spammer":
            label = left if rng.random() < 0.5 else right
        elif kind == "position_biased" and rng.random() < left_rate[a]:
            label = left
        else:
            correct = rng.random() < p_correct
            if kind == "adversarial":
                correct = rng.random() >= p_correct
            if truth == "tie":
                label = "tie" if correct else ("A" if rng.random() < 0.5 else "B")
            else:
                label = truth if correct else ("B" if truth == "A" else "A")
        speed = 0.2 if kind == "spammer" else 1.0
        rows.append(
            {
                "item_id": item_ids[item],
                "annotator_id": annotators["annotator_id"].iat[a],
                "label": label,
                "kind": "pairwise",
                "dimension": dimension,
                "shown_swapped": swapped,
                "is_gold": bool(gold_mask[item]),
                "gold_label": truth if gold_mask[item] else None,
                "duration_s": float(speed * rng.lognormal(np.log(30.0), 0.4)),
                "created_at": t0 + span * (n / max(len(pairs), 1)),
                "pod": annotators["pod"].iat[a],
                "reviewer_label": None,
            }
        )
    judgments = pd.DataFrame(rows)
    truth = pd.Series(truth_arr, index=pd.Index(item_ids, name="item_id"), name="truth")
    return Simulation(judgments, truth, items, feats_a, feats_b, weights, annotators)
