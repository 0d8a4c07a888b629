"""Reward-model evaluation on a labeled pair file (the library behind ``alignflow rm-eval``).

Pairs come from any file the strict pair reader accepts (:mod:`alignflow.data.formats`: HH-style transcripts,
TRL ``prompt``/``chosen``/``rejected``, RewardBench rows with ``subset`` and ``id``) or a stored ``pairs``
dataset. Each pair is scored with :func:`alignflow.models.reward.load_reward_scorer` and the statistics are:

- accuracy: the share of pairs whose chosen response scores higher, an exact tie counting one half (as
  :func:`alignflow.evaluate.reward.preference_accuracy`); ties are also counted on their own;
- a 95% Wilson score interval for that share (Wilson 1927; it stays inside [0, 1] and keeps its coverage for
  accuracies near 0 or 1 and small subsets, where the normal approximation does not);
- per subset, and overall pooled over pairs; with subsets, RewardBench's scores (Lambert et al. 2024): each
  section is the prompt-weighted mean of its subsets' accuracies (weights = RewardBench's example counts, in
  which ``math-prm`` is up-weighted to equal the code subsets), the score the mean of the sections present;
  for subsets RewardBench does not name, the prompt-weighted mean over subsets (weights = their pair counts);
- calibration: top-label ECE and its reliability bins (:func:`alignflow.evaluate.reward.calibration`, the
  one implementation) of ``sigmoid(gap)``; the checkpoint's scorer already divides rewards by its fitted
  temperature (:func:`fit_temperature`), so this is the calibration a user of the checkpoint gets;
- a histogram of the reward gaps ``r(chosen) - r(rejected)``;
- per dimension head, when the checkpoint has more than one head (``ensemble.json``'s ``heads``) and the
  pairs carry per-dimension ``labels`` (P(chosen better on it)): over the pairs whose label for that
  dimension is decided (not 0.5), the dimension head's accuracy against the label and the overall head's on
  the same pairs, each with its Wilson interval (:func:`head_accuracy`). Whether a dimension head sees what
  the overall model misses is the gap between the two.

:func:`evaluate_reward_model` writes ``evaluation.json`` and a self-contained ``report.html`` (inline SVG
reliability diagram and margin histogram) to a folder and registers that folder as an ``rm_evaluation``
artifact whose lineage edges point to the checkpoint (role ``checkpoint``) and the pairs (role ``pairs``).
:func:`reference_pairs` turns the LLMBar and PandaLM extracts in ``shared/data`` into pair rows.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from alignflow.data.encode import pair_labels
from alignflow.data.formats import iter_records
from alignflow.data.io import resolve_dataset
from alignflow.errors import DataFormatError
from alignflow.evaluate.reward import bt_probability, calibration
from alignflow.store import Store

Z_95 = 1.959963984540054

# RewardBench v1 (allenai/reward-bench, rewardbench/constants.py): sections and the example counts that weight
# each subset inside its section.
REWARDBENCH_SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
REWARDBENCH_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # 447 pairs, up-weighted to equal the six code subsets
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}


# ---------------------------------------------------------------------------------------------------------------------
# statistics (pure)


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n`` (Wilson 1927, eq. for p̂ ± z).

    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; ``successes`` may be fractional (ties count one
    half). ``n = 0`` gives ``(nan, nan)``.
    """
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes!r}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def fit_temperature(score_gap: Sequence[float] | np.ndarray) -> float:
    """Temperature T > 0 minimising the Bradley-Terry NLL ``mean(-log sigmoid(gap / T))`` of calibration pairs.

    Temperature scaling (Guo et al. 2017, section 4.2) for pairs listed chosen-first: one parameter, so the
    accuracy is unchanged and only the confidence ``sigmoid(|gap| / T)`` moves. ``score_gap``: ``(n,)``
    ``r(chosen) - r(rejected)`` on pairs never used for training or testing. The NLL is convex in 1/T; it is
    minimised over log T in [log 0.01, log 100]. All-zero gaps carry no scale and give T = 1.
    """
    gap = np.asarray(score_gap, dtype=np.float64)
    if gap.ndim != 1 or gap.size == 0:
        raise ValueError(f"score_gap: expected a non-empty 1-D sequence, got shape {gap.shape}")
    if not np.isfinite(gap).all():
        raise ValueError("score_gap: expected finite numbers")
    if not np.any(gap):
        return 1.0

    def nll(log_t: float) -> float:
        return float(np.mean(np.logaddexp(0.0, -gap / math.exp(log_t))))

    res = minimize_scalar(nll, bounds=(math.log(0.01), math.log(100.0)), method="bounded")
    return float(math.exp(res.x))


@dataclass
class SubsetResult:
    """Accuracy of one group of pairs: ties count one half; ``ci`` is the 95% Wilson interval."""

    name: str
    n: int
    correct: int
    ties: int
    accuracy: float
    ci: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "correct": self.correct,
            "ties": self.ties,
            "accuracy": self.accuracy,
            "ci_low": self.ci[0],
            "ci_high": self.ci[1],
        }


def subset_result(name: str, score_gap: np.ndarray) -> SubsetResult:
    """Accuracy, ties and Wilson CI of the pairs with gaps ``score_gap`` ``(n,)`` (chosen minus rejected)."""
    n = int(score_gap.size)
    correct = int((score_gap > 0).sum())
    ties = int((score_gap == 0).sum())
    credit = correct + 0.5 * ties
    return SubsetResult(name, n, correct, ties, credit / n if n else float("nan"), wilson_interval(credit, n))


def rewardbench_scores(accuracy: Mapping[str, float], counts: Mapping[str, int]) -> dict[str, Any]:
    """RewardBench's section scores and overall score from per-subset accuracies.

    A section's score is ``sum_s w_s acc_s / sum_s w_s`` over its subsets present, with ``w_s`` RewardBench's
    example count (:data:`REWARDBENCH_COUNTS`); the score is the mean of the sections present. Subsets
    RewardBench does not name form one more group, ``other``, weighted by ``counts`` (their pair counts), and
    count as a section. Returns ``{"sections": {name: score}, "score": float}``.
    """
    sections: dict[str, float] = {}
    known = {s for subs in REWARDBENCH_SECTIONS.values() for s in subs}
    for section, subs in REWARDBENCH_SECTIONS.items():
        present = [s for s in subs if s in accuracy]
        if present:
            w = np.array([REWARDBENCH_COUNTS[s] for s in present], dtype=np.float64)
            sections[section] = float(np.dot(w, [accuracy[s] for s in present]) / w.sum())
    other = [s for s in accuracy if s not in known]
    if other:
        w = np.array([counts[s] for s in other], dtype=np.float64)
        sections["other"] = float(np.dot(w, [accuracy[s] for s in other]) / w.sum())
    return {"sections": sections, "score": float(np.mean(list(sections.values())))}


def margin_histogram(score_gap: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    """Counts of the gaps in ``bins`` equal-width bins, symmetric about 0 (edges ``(bins + 1,)``)."""
    top = float(np.max(np.abs(score_gap))) if score_gap.size else 1.0
    top = top if top > 0 else 1.0
    counts, edges = np.histogram(score_gap, bins=bins, range=(-top, top))
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist()}


def summarize(
    chosen: Sequence[float] | np.ndarray,
    rejected: Sequence[float] | np.ndarray,
    subsets: Sequence[str | None] | None = None,
    n_bins: int = 10,
) -> dict[str, Any]:
    """Every statistic of ``rm-eval`` from the scores ``(n,)`` of pairs listed chosen-first.

    ``subsets`` (``(n,)`` names, or None) groups pairs; a pair without one falls in ``(none)``. Returns
    ``overall`` and ``subsets`` (:class:`SubsetResult` dicts), ``rewardbench`` (only with subsets), ``loss``
    (mean ``-log sigmoid(gap)``), ``margin`` (mean gap), ``ece`` and ``reliability`` (the bins),
    ``margin_histogram``.
    """
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 1 or c.size == 0:
        raise ValueError(f"chosen {c.shape} and rejected {r.shape} must be the same non-empty 1-D shape")
    gap = c - r
    out: dict[str, Any] = {"overall": subset_result("overall", gap).as_dict()}
    if subsets is not None:
        if len(subsets) != gap.size:
            raise ValueError(f"{len(subsets)} subset names for {gap.size} pairs")
        names = np.array([s if s is not None else "(none)" for s in subsets], dtype=object)
        groups = sorted(set(names.tolist()))
        results = [subset_result(g, gap[names == g]) for g in groups]
        out["subsets"] = [res.as_dict() for res in results]
        out["rewardbench"] = rewardbench_scores(
            {res.name: res.accuracy for res in results}, {res.name: res.n for res in results}
        )
    cal = calibration(bt_probability(gap), np.ones_like(gap), n_bins)
    out.update(
        loss=float(np.mean(np.logaddexp(0.0, -gap))),
        margin=float(gap.mean()),
        ece=cal["ece"],
        reliability=cal["bins"],
        margin_histogram=margin_histogram(gap),
    )
    return out


def head_accuracy(
    chosen: np.ndarray,
    rejected: np.ndarray,
    heads: Sequence[str],
    labels: Sequence[Mapping[str, float]],
) -> list[dict[str, Any]]:
    """Each dimension head's agreement with the pairs' labels for its dimension, beside the overall head's.

    ``chosen``, ``rejected``: ``(n, H)`` rewards, columns in the order of ``heads`` (``overall`` first);
    ``labels``: ``(n,)`` mappings {dimension: P(chosen better on it)}. For dimension d (``heads[h]``, h >= 1) a
    pair counts when it labels d and the label is decided (``!= 0.5``); the label's side is chosen when it is
    above 0.5, rejected below. A head is right on a pair when its gap ``r_c - r_r`` points to that side, so
    its accuracy is :func:`subset_result` of the gap signed by the side (a zero gap counts one half; Wilson
    interval). ``overall_*`` is the overall head (column 0) on the same pairs. Dimensions without a decided
    pair are left out. Returns one flat dict per dimension: ``dimension``, ``n``, ``accuracy``, ``ci_low``,
    ``ci_high``, ``ties`` and ``overall_accuracy``, ``overall_ci_low``, ``overall_ci_high``, ``overall_ties``.
    """
    c = np.asarray(chosen, dtype=np.float64)
    r = np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape or c.ndim != 2 or c.shape[1] != len(heads) or c.shape[0] != len(labels):
        raise ValueError(
            f"chosen {c.shape} and rejected {r.shape} must be (n={len(labels)}, H={len(heads)}) rewards"
        )
    gap = c - r  # (n, H)
    out: list[dict[str, Any]] = []
    for h, dim in enumerate(heads[1:], start=1):
        rows = [(i, lab[dim]) for i, lab in enumerate(labels) if dim in lab and lab[dim] != 0.5]
        if not rows:
            continue
        idx = np.array([i for i, _ in rows])
        side = np.array([1.0 if v > 0.5 else -1.0 for _, v in rows])  # (m,) +1: chosen better on dim
        own = subset_result(dim, side * gap[idx, h])
        overall = subset_result(dim, side * gap[idx, 0])
        out.append(
            {
                "dimension": dim,
                "n": own.n,
                "accuracy": own.accuracy,
                "ci_low": own.ci[0],
                "ci_high": own.ci[1],
                "ties": own.ties,
                "overall_accuracy": overall.accuracy,
                "overall_ci_low": overall.ci[0],
                "overall_ci_high": overall.ci[1],
                "overall_ties": overall.ties,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# pairs


@dataclass
class EvalPairs:
    """Pairs to evaluate: the stored dataset's id and, per pair, ``(n,)`` lists of texts, subset names and
    per-dimension labels ({dimension: P(chosen better)}, empty for a pair without ``labels``)."""

    dataset_id: str
    ids: list[str]
    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    subsets: list[str | None] | None = field(default=None)
    labels: list[dict[str, float]] = field(default_factory=list)


def _check_subset_field(path: Path, subset_field: str) -> None:
    """Every record of a pair file names its subset: a non-empty string (errors ``file:line: field: problem``)."""
    for where, rec in iter_records(path):
        loc = where.removeprefix("line ").removeprefix("row ")
        val = rec.get(subset_field) if isinstance(rec, dict) else None
        if val is None:
            raise DataFormatError(f"{path}:{loc}: field '{subset_field}': missing (--subset-field names it)")
        if not isinstance(val, str) or not val.strip():
            raise DataFormatError(
                f"{path}:{loc}: field '{subset_field}': expected a non-empty string, got {val!r:.40}"
            )


def load_eval_pairs(store: Store, ref: str, subset_field: str | None = None) -> EvalPairs:
    """Pairs from a file (validated by the strict reader and stored as a ``pairs`` dataset) or a dataset ref.

    With ``subset_field``, every row must carry that field (RewardBench's ``subset``): a file is checked line
    by line before anything is stored; a stored dataset has it among its extra fields (``meta``).
    """
    p = Path(ref)
    if subset_field and p.is_file():
        _check_subset_field(p, subset_field)
    aid = resolve_dataset(store, ref, "pairs")
    rows = store.read_dataset(aid).to_pylist()
    subsets: list[str | None] | None = None
    if subset_field:
        subsets = []
        for row in rows:
            val = json.loads(row.get("meta") or "{}").get(subset_field)
            if not isinstance(val, str) or not val.strip():
                raise DataFormatError(
                    f"{ref}: pair {row['id']!r}: field '{subset_field}': missing or not a non-empty string"
                )
            subsets.append(val)
    return EvalPairs(
        aid,
        [str(r["id"]) for r in rows],
        [r["prompt"] or "" for r in rows],
        [r["chosen"] for r in rows],
        [r["rejected"] for r in rows],
        subsets,
        [pair_labels(r.get("meta")) for r in rows],
    )


def reference_pairs(name: str, path: str | Path) -> list[dict[str, Any]]:
    """TRL-style pair rows (``id``, ``prompt``, ``chosen``, ``rejected``, ``subset``) from a shared test set.

    ``llmbar``: LLMBar ``natural.json`` (``input``, ``output_1``, ``output_2``, ``label`` 1 or 2), subset
    ``llmbar-natural`` as in RewardBench. ``pandalm``: PandaLM ``testset-v1.json``; the prompt is the
    instruction and its input, the label the majority of the three annotators; items whose majority is a tie
    (0) or that have no majority are left out, since a pair needs a preferred side, and so are items whose
    responses are not text (a few are JSON booleans) or are identical.
    """
    path = Path(path)
    records = json.loads(path.read_text(encoding="utf-8"))
    rows: list[dict[str, Any]] = []
    if name == "llmbar":
        for i, rec in enumerate(records):
            if rec.get("label") not in (1, 2):
                raise DataFormatError(
                    f"{path}: record {i}: field 'label': expected 1 or 2, got {rec.get('label')!r}"
                )
            better, worse = ("output_1", "output_2") if rec["label"] == 1 else ("output_2", "output_1")
            rows.append(
                {
                    "id": f"llmbar-{i}",
                    "prompt": rec["input"],
                    "chosen": rec[better],
                    "rejected": rec[worse],
                    "subset": "llmbar-natural",
                }
            )
        return rows
    if name == "pandalm":
        for i, rec in enumerate(records):
            votes = [rec.get(f"annotator{k}") for k in (1, 2, 3)]
            if any(v not in (0, 1, 2) for v in votes):
                raise DataFormatError(
                    f"{path}: record {i}: annotator labels must be 0, 1 or 2, got {votes!r}"
                )
            top = max((1, 2), key=votes.count)
            if votes.count(top) < 2:
                continue
            prompt = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
            better, worse = ("response1", "response2") if top == 1 else ("response2", "response1")
            # A few PandaLM responses are JSON booleans, not text: no response to score, left out.
            if not (isinstance(rec[better], str) and isinstance(rec[worse], str)):
                continue
            if rec[better].strip() == rec[worse].strip():
                continue
            rows.append(
                {
                    "id": f"pandalm-{rec.get('idx', i)}",
                    "prompt": prompt,
                    "chosen": rec[better],
                    "rejected": rec[worse],
                    "subset": str(rec.get("cmp_key", "pandalm")),
                }
            )
        return rows
    raise DataFormatError(f"unknown reference test set {name!r}; expected llmbar or pandalm")


# ---------------------------------------------------------------------------------------------------------------------
# scoring, report, artifact


@dataclass
class RMEvaluation:
    """What ``rm-eval`` produced: the statistics, the per-pair scores, the output folder and artifact id."""

    summary: dict[str, Any]
    chosen: np.ndarray
    rejected: np.ndarray
    out_dir: Path
    artifact_id: str


def _checkpoint_dir(store: Store, checkpoint: str) -> tuple[Path, str | None]:
    """The folder of a checkpoint given as a path or an artifact ref, and its artifact id if it is stored."""
    p = Path(checkpoint)
    if p.is_dir():
        return p, store.lookup_directory(p)
    info = store.get(checkpoint)
    return store.path(info.id), info.id


def evaluate_reward_model(
    store: Store,
    checkpoint: str,
    pairs: str,
    out_dir: str | Path,
    subset_field: str | None = None,
    max_length: int | None = None,
    batch_size: int = 16,
    n_bins: int = 10,
) -> RMEvaluation:
    """Score ``pairs`` with ``checkpoint``, write ``evaluation.json`` and ``report.html`` to ``out_dir`` and
    register the folder as an ``rm_evaluation`` artifact (edges: ``checkpoint``, ``pairs``)."""
    from alignflow.models.reward import load_reward_scorer

    data = load_eval_pairs(store, pairs, subset_field)
    ckpt_dir, ckpt_id = _checkpoint_dir(store, checkpoint)
    # Loaded before it is stored: a folder that is not a reward model fails here, with nothing copied.
    scorer = load_reward_scorer(ckpt_dir, batch_size=batch_size, max_length=max_length)
    if ckpt_id is None:
        ckpt_id = store.put_directory(ckpt_dir.resolve(), kind="model", name=ckpt_dir.name)
    # A multi-head checkpoint on pairs with dimension labels: score every head (column 0 is the overall head,
    # the same rewards as scorer(...)); otherwise the overall head alone, as for any checkpoint.
    by_head = len(scorer.heads) > 1 and any(data.labels)
    if by_head:
        chosen_h = scorer.score_heads(data.prompts, data.chosen)[0].numpy().astype(np.float64)  # (n, H)
        rejected_h = scorer.score_heads(data.prompts, data.rejected)[0].numpy().astype(np.float64)
        chosen, rejected = chosen_h[:, 0], rejected_h[:, 0]
    else:
        chosen = scorer(data.prompts, data.chosen)[0].numpy().astype(np.float64)
        rejected = scorer(data.prompts, data.rejected)[0].numpy().astype(np.float64)
    summary = summarize(chosen, rejected, data.subsets, n_bins)
    if by_head:
        summary["heads"] = list(scorer.heads)
        summary["per_head"] = head_accuracy(chosen_h, rejected_h, scorer.heads, data.labels)
    summary.update(
        checkpoint=str(checkpoint),
        checkpoint_id=ckpt_id,
        pairs=str(pairs),
        dataset_id=data.dataset_id,
        temperature=scorer.temperature,
        max_length=scorer.encoder.max_length if scorer.encoder else scorer.max_length,
        truncated=scorer.counter.count,
        responses_cut=scorer.counter.completions_cut,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_pair = [
        {"id": i, "chosen": float(a), "rejected": float(b), **({"subset": s} if s is not None else {})}
        for i, a, b, s in zip(data.ids, chosen, rejected, data.subsets or [None] * len(data.ids), strict=True)
    ]
    if by_head:  # every head's rewards, in the order of summary["heads"]
        for row, ch, rj in zip(per_pair, chosen_h, rejected_h, strict=True):
            row.update(chosen_heads=ch.tolist(), rejected_heads=rj.tolist())
    (out / "evaluation.json").write_text(json.dumps({**summary, "scores": per_pair}, indent=1))
    (out / "report.html").write_text(render_html(summary), encoding="utf-8")
    overall = summary["overall"]
    meta = {
        "accuracy": overall["accuracy"],
        "ci_low": overall["ci_low"],
        "ci_high": overall["ci_high"],
        "n": overall["n"],
        "ties": overall["ties"],
        "ece": summary["ece"],
    }
    if "rewardbench" in summary:
        meta["rewardbench_score"] = summary["rewardbench"]["score"]
    if summary.get("per_head"):
        meta["head_accuracy"] = {h["dimension"]: h["accuracy"] for h in summary["per_head"]}
        meta["head_overall_accuracy"] = {h["dimension"]: h["overall_accuracy"] for h in summary["per_head"]}
    aid = store.put_directory(
        out,
        kind="rm_evaluation",
        name=f"rm-eval-{ckpt_id[:8]}-{data.dataset_id[:8]}",
        meta=meta,
        parents=[(ckpt_id, "checkpoint"), (data.dataset_id, "pairs")],
    )
    return RMEvaluation(summary, chosen, rejected, out, aid)


def table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """The terminal/HTML table: one row per subset, then the overall rows (name, n, accuracy, 95% CI, ties)."""

    def row(res: Mapping[str, Any]) -> list[str]:
        ci = f"{res['ci_low']:.3f}–{res['ci_high']:.3f}"
        return [res["name"], str(res["n"]), f"{res['accuracy']:.3f}", ci, str(res["ties"])]

    rows = [row(s) for s in summary.get("subsets", [])]
    rows.append(row(summary["overall"]))
    if "rewardbench" in summary:
        for name, score in summary["rewardbench"]["sections"].items():
            rows.append([f"section: {name}", "", f"{score:.3f}", "", ""])
        rows.append(["RewardBench score", "", f"{summary['rewardbench']['score']:.3f}", "", ""])
    return rows


TABLE_HEADER = ["subset", "pairs", "accuracy", "95% CI", "ties"]
HEAD_TABLE_HEADER = ["dimension", "decided pairs", "its head", "95% CI", "overall head", "95% CI"]


def head_table_rows(summary: Mapping[str, Any]) -> list[list[str]]:
    """The per-dimension table (empty without ``per_head``): the dimension head's and the overall head's
    accuracy against the dimension's labels, each with its 95% Wilson interval."""
    return [
        [
            h["dimension"],
            str(h["n"]),
            f"{h['accuracy']:.3f}",
            f"{h['ci_low']:.3f}–{h['ci_high']:.3f}",
            f"{h['overall_accuracy']:.3f}",
            f"{h['overall_ci_low']:.3f}–{h['overall_ci_high']:.3f}",
        ]
        for h in summary.get("per_head") or []
    ]


def _svg_reliability(bins: Sequence[Mapping[str, Any]], w: int = 320, h: int = 320) -> str:
    """Reliability diagram on [0.5, 1]²: one bar per non-empty bin at its accuracy, the diagonal = calibrated."""
    pad = 36

    def x(v: float) -> float:
        return pad + (v - 0.5) / 0.5 * (w - 2 * pad)

    def y(v: float) -> float:
        return h - pad - (v - 0.5) / 0.5 * (h - 2 * pad) if v >= 0.5 else h - pad

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    parts.append(
        f'<line x1="{x(0.5)}" y1="{y(0.5)}" x2="{x(1)}" y2="{y(1)}" stroke="#999" stroke-dasharray="4"/>'
    )
    for b in bins:
        top = y(max(0.5, b["accuracy"]))
        parts.append(
            f'<rect x="{x(b["lo"]):.1f}" y="{top:.1f}" width="{x(b["hi"]) - x(b["lo"]) - 1:.1f}" '
            f'height="{h - pad - top:.1f}" fill="#4a78b5"><title>confidence {b["confidence"]:.3f}, '
            f"accuracy {b['accuracy']:.3f}, {b['count']} pairs</title></rect>"
        )
    parts.append(f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">confidence</text>')
    parts.append(
        f'<text x="10" y="{h / 2}" font-size="11" transform="rotate(-90 10 {h / 2})">accuracy</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _svg_histogram(hist: Mapping[str, Sequence[float]], w: int = 420, h: int = 200) -> str:
    """Bars of the reward-gap histogram; gaps above 0 (chosen preferred) green, below red."""
    pad = 24
    edges, counts = hist["edges"], hist["counts"]
    top = max(counts) or 1
    lo, hi = edges[0], edges[-1]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img">']
    for i, c in enumerate(counts):
        x0 = pad + (edges[i] - lo) / (hi - lo) * (w - 2 * pad)
        x1 = pad + (edges[i + 1] - lo) / (hi - lo) * (w - 2 * pad)
        bh = c / top * (h - 2 * pad)
        colour = "#3c9a5f" if edges[i] >= 0 else "#c0504d"
        parts.append(
            f'<rect x="{x0:.1f}" y="{h - pad - bh:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" height="{bh:.1f}" '
            f'fill="{colour}"><title>[{edges[i]:.2f}, {edges[i + 1]:.2f}): {c}</title></rect>'
        )
    parts.append(
        f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">r(chosen) − r(rejected)</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def render_html(summary: Mapping[str, Any]) -> str:
    """A self-contained HTML report of :func:`summarize`'s output (no scripts, no external files)."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in TABLE_HEADER)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in table_rows(summary))
    heads = ""
    if "per_head" in summary:
        h_head = "".join(f"<th>{esc(c)}</th>" for c in HEAD_TABLE_HEADER)
        h_body = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in head_table_rows(summary)
        )
        heads = (
            "<h2>Dimension heads</h2><p>Per rated dimension, over the pairs whose label for it is decided "
            "(not a tie): the dimension head's accuracy against the label, and the overall head's on the same "
            f"pairs. Heads: <code>{esc(', '.join(summary['heads']))}</code>.</p>"
            + (
                f"<table><tr>{h_head}</tr>{h_body}</table>"
                if h_body
                else "<p>No pair decides a head's dimension.</p>"
            )
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>reward-model evaluation</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>"
        "</head><body><h1>Reward-model evaluation</h1>"
        f"<p>checkpoint <code>{esc(str(summary.get('checkpoint', '')))}</code>, pairs "
        f"<code>{esc(str(summary.get('pairs', '')))}</code>; ties count one half; 95% Wilson intervals.</p>"
        f"<table><tr>{head}</tr>{body}</table>{heads}"
        f"<p>loss {summary['loss']:.4f}, mean margin {summary['margin']:.4f}, "
        f"ECE {summary['ece']:.4f} (temperature {summary.get('temperature', 1.0):.3f})</p>"
        f"<h2>Reliability diagram</h2>{_svg_reliability(summary['reliability'])}"
        f"<h2>Reward gaps</h2>{_svg_histogram(summary['margin_histogram'])}"
        "</body></html>"
    )
