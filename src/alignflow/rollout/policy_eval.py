"""Evaluate policies on a prompt set: sample each at each temperature, score, summarise, store.

The library behind ``alignflow eval``. For every policy (and the baseline, evaluated too when it is not among
them) and every temperature, :func:`evaluate_policies` samples responses with the rollout sampler
(``samples_per_prompt`` per prompt; one under greedy decoding, where every sample would be the same), scores
them with a :mod:`~alignflow.rollout.scorers` scorer (a multi-head reward model: every head), measures their
length in characters, and hands the arrays to :func:`alignflow.evaluate.policies.summarize`. Every condition
draws from the same seed, so policies are compared on common random numbers as well as on the same prompts.

Outputs: an ``evaluation`` artifact (the JSON summary, with lineage edges to each policy, the baseline, the
prompt set and the scorer) and a folder with ``summary.json``, ``responses.jsonl`` (every response with its
score and length) and ``index.html`` (the report page).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from alignflow.errors import ConfigError
from alignflow.evaluate.policies import Condition, render_html, summarize
from alignflow.rollout.generations import (
    Policy,
    PromptSet,
    Sampling,
    load_prompt_set,
    resolve_policy,
    resolve_prompts,
    sample_texts,
)
from alignflow.rollout.scorers import LoadedScorer, load_scorer
from alignflow.store import Store

Progress = Callable[[int, int], None]  # (completed, total) responses

# MiniLM embeds ~140 sentences/s on a CPU core: 400 pairs (800 texts) keep the curve under ~10 s.
EFFICIENCY_MAX_PAIRS = 400


def reward_model_efficiency(
    store: Store, scorer: LoadedScorer, max_pairs: int = EFFICIENCY_MAX_PAIRS
) -> dict:
    """The annotation-efficiency curve of an ``rm:`` scorer's training pairs, or a note why there is none.

    The pairs: the nearest ``pairs`` dataset up the reward model's lineage (what ``alignflow rm`` trained on),
    its first ``max_pairs`` rows in dataset order. Held-out: a prompt-disjoint 20% of them
    (:func:`alignflow.quality.efficiency.prompt_disjoint_split`); the curve is the embedding Bradley-Terry
    model's accuracy on it after the first n pairs (dataset order, and the mean of 3 shuffles), each pair a
    hard label for `chosen`. Returns ``{"pairs", "n_pairs", "heldout", "curve": [rows]}`` or ``{"note"}``.
    """
    import pandas as pd

    from alignflow.quality import efficiency

    if not scorer.spec.startswith("rm:"):
        return {"note": f"annotation efficiency needs an rm: scorer; {scorer.spec!r} is not one"}
    graph = store.lineage(scorer.artifact_id, "up", max_depth=6)
    depth = {scorer.artifact_id: 0}
    for _ in range(6):  # breadth-first distances, so the nearest pairs dataset wins
        for parent, child, _role in graph.edges:
            if child in depth and parent not in depth:
                depth[parent] = depth[child] + 1
    found = sorted((depth[a], a) for a, info in graph.nodes.items() if info.kind == "pairs" and a in depth)
    if not found:
        return {"note": f"the reward model {scorer.artifact_id[:12]}'s lineage has no pairs dataset"}
    pairs_id = found[0][1]
    rows = store.read_dataset(pairs_id).to_pandas().head(max_pairs)
    table = pd.DataFrame(
        {"prompt": rows["prompt"], "response_a": rows["chosen"], "response_b": rows["rejected"], "label": "A"}
    )
    pool, heldout = efficiency.prompt_disjoint_split(table)
    if len(pool) < 4 or heldout.empty:
        return {"pairs": pairs_id, "note": f"{len(rows)} training pairs are too few for a learning curve"}
    curve = efficiency.efficiency_table(pool, heldout, efficiency.embedding_fit_and_score())
    return {
        "pairs": pairs_id,
        "n_pairs": len(rows),
        "capped_at": max_pairs,
        "heldout": f"a prompt-disjoint {len(heldout)} of the {len(rows)} pairs",
        "curve": curve.to_dict(orient="records"),
    }


@dataclass(frozen=True)
class EvalSettings:
    """What every condition shares."""

    temperatures: tuple[float, ...] = (0.0, 1.0)
    samples_per_prompt: int = 4
    max_new_tokens: int = 128
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64
    max_prompts: int | None = None
    n_boot: int = 2000

    def __post_init__(self) -> None:
        if not self.temperatures:
            raise ConfigError("--temperature: give at least one temperature")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise ConfigError(f"--temperature: a temperature is given twice in {list(self.temperatures)}")
        if any(t < 0 for t in self.temperatures):
            raise ConfigError(f"--temperature: must be >= 0 (0 = greedy), got {list(self.temperatures)}")
        if self.samples_per_prompt < 1:
            raise ConfigError(f"--samples-per-prompt: must be at least 1, got {self.samples_per_prompt}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"--max-prompts: must be at least 1, got {self.max_prompts}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size: must be at least 1, got {self.batch_size}")
        Sampling(top_p=self.top_p, max_new_tokens=self.max_new_tokens)  # the same checks as `generate`

    def sampling(self, temperature: float) -> Sampling:
        n = 1 if temperature == 0 else self.samples_per_prompt
        return Sampling(n, temperature, self.top_p, self.max_new_tokens, self.seed)


@dataclass(frozen=True)
class EvalResult:
    artifact_id: str
    summary: dict[str, Any]
    out_dir: Path
    report: Path


def _policies(store: Store, refs: Sequence[str], baseline: str | None) -> tuple[list[Policy], Policy | None]:
    """The policies to sample (the baseline first when it is not among them), each with a unique name."""
    if not refs:
        raise ConfigError("POLICY: give at least one policy")
    policies = [resolve_policy(store, r) for r in refs]
    seen: dict[str, str] = {}
    for p in policies:
        if p.artifact_id in seen:
            raise ConfigError(f"POLICY {p.ref!r}: the same model as {seen[p.artifact_id]!r}, given twice")
        seen[p.artifact_id] = p.ref
    base = None
    if baseline is not None:
        base = resolve_policy(store, baseline, "--baseline")
        same = next((p for p in policies if p.artifact_id == base.artifact_id), None)
        if same is None:
            policies.insert(0, base)
        else:
            base = same
    names = [p.name for p in policies]
    out = [
        Policy(
            p.ref,
            p.path,
            p.artifact_id,
            f"{p.name}-{p.artifact_id[:8]}" if names.count(p.name) > 1 else p.name,
        )
        for p in policies
    ]
    if base is not None:
        base = next(p for p in out if p.artifact_id == base.artifact_id)
    return out, base


def _condition(
    model: Any,
    tok: Any,
    policy: Policy,
    prompt_set: PromptSet,
    sampling: Sampling,
    scorer: LoadedScorer,
    batch_size: int,
    advance: Callable[[int], None],
) -> tuple[Condition, list[list[str]]]:
    """Sample, score and measure one (policy, temperature): the condition and its responses ``[P][S]``.

    A multi-head scorer scores every head in one pass; the condition's score is its first (overall) head.
    """
    texts = sample_texts(model, tok, prompt_set.prompts, sampling, batch_size, advance)
    flat_prompts = [p.text for p, r in zip(prompt_set.prompts, texts, strict=True) for _ in r]
    flat = [t for r in texts for t in r]
    shape = (len(texts), sampling.n)
    by_head = None
    if scorer.heads:
        by_head = scorer.by_head(flat_prompts, flat).reshape(*shape, len(scorer.heads))  # (P, S, H)
        scores = by_head[:, :, 0]
    else:
        scores = np.asarray(scorer(flat_prompts, flat), dtype=np.float64).reshape(shape)
    lengths = np.asarray([len(t) for t in flat], dtype=np.float64).reshape(shape)
    return Condition(policy.name, sampling.temperature, scores, lengths, by_head), texts


def evaluate_policies(
    store: Store,
    policy_refs: Sequence[str],
    prompts_ref: str,
    scorer_spec: str,
    settings: EvalSettings,
    *,
    baseline: str | None = None,
    out_dir: str | Path | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Evaluate ``policy_refs`` (folders or checkpoint artifacts) on ``prompts_ref`` with ``scorer_spec``.

    Everything given is checked (policies, prompts, scorer, settings) before any model is loaded. ``out_dir``
    defaults to ``<workspace>/reports/eval-<artifact id[:12]>``. ``progress(completed, total)`` counts
    sampled responses over all conditions.
    """
    from alignflow.models import load_policy, load_tokenizer

    policies, base = _policies(store, policy_refs, baseline)
    prompts_id = resolve_prompts(store, prompts_ref)
    scorer = load_scorer(scorer_spec, store)

    conditions: list[Condition] = []
    responses: list[dict[str, Any]] = []
    prompt_set: PromptSet | None = None
    done, total = 0, 0

    def advance(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(done, total)

    for policy in policies:
        tok = load_tokenizer(policy.path, padding_side="left")
        these = load_prompt_set(store, prompts_id, tok, settings.max_prompts)
        if prompt_set is None:
            prompt_set = these
            per_policy = sum(settings.sampling(t).n for t in settings.temperatures) * len(these.prompts)
            total = per_policy * len(policies)
        elif these.ids != prompt_set.ids:  # tokenizers' chat templates can merge prompts differently
            raise ConfigError(
                f"POLICY {policy.ref!r}: its tokenizer renders the prompt set into different prompts than "
                f"{policies[0].ref!r}'s; evaluate them separately"
            )
        model = load_policy(policy.path, dtype="float32")
        for t in settings.temperatures:
            cond, texts = _condition(
                model, tok, policy, these, settings.sampling(t), scorer, settings.batch_size, advance
            )
            conditions.append(cond)
            for i, (pid, prompt) in enumerate(zip(these.ids, these.prompts, strict=True)):
                for j, text in enumerate(texts[i]):
                    responses.append(
                        {
                            "prompt_id": pid,
                            "prompt": prompt.text,
                            "policy": policy.name,
                            "temperature": t,
                            "sample": j,
                            "response": text,
                            "score": float(cond.scores[i, j]),
                            "chars": len(text),
                        }
                    )
                    if cond.head_scores is not None:
                        responses[-1]["heads"] = dict(
                            zip(scorer.heads, cond.head_scores[i, j].tolist(), strict=True)
                        )
        del model
    assert prompt_set is not None

    summary = summarize(
        conditions,
        base.name if base else None,
        n_boot=settings.n_boot,
        seed=settings.seed,
        heads=scorer.heads or None,
    )
    summary |= {
        "annotation_efficiency": reward_model_efficiency(store, scorer),
        "scorer": {"spec": scorer.spec, "artifact": scorer.artifact_id},
        "prompts": {"artifact": prompts_id, "n": len(prompt_set.prompts), "ids": prompt_set.ids},
        "policies": {p.name: {"ref": p.ref, "artifact": p.artifact_id} for p in policies},
        "sampling": {
            "temperatures": list(settings.temperatures),
            "samples_per_prompt": settings.samples_per_prompt,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens,
            "seed": settings.seed,
        },
    }
    parents = [(p.artifact_id, "policy") for p in policies]
    if base is not None:
        parents.append((base.artifact_id, "baseline"))
    parents += [(prompts_id, "prompts"), (scorer.artifact_id, "scorer")]
    aid = store.put_json(summary, kind="evaluation", name=name or "evaluation", parents=parents)

    out = Path(out_dir) if out_dir is not None else store.workspace.reports_dir / f"eval-{aid[:12]}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"artifact": aid, **summary}, indent=1), encoding="utf-8")
    with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
        for r in responses:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    lengths = {f"{c.policy}@{c.temperature:g}": c.lengths.reshape(-1).tolist() for c in conditions}
    shown = set(prompt_set.ids[:3])
    samples = [r for r in responses if r["prompt_id"] in shown and r["sample"] == 0]
    page = render_html(
        summary,
        title=f"Evaluation {aid[:12]}",
        lengths=lengths,
        samples=samples,
        facts={
            "scorer": scorer.spec,
            "prompts": f"{len(prompt_set.prompts)} ({prompts_id[:12]})",
            "samples per prompt (sampled)": settings.samples_per_prompt,
            "max new tokens": settings.max_new_tokens,
            "seed": settings.seed,
            "evaluation artifact": aid,
        },
        created_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    report = out / "index.html"
    report.write_text(page, encoding="utf-8")
    return EvalResult(artifact_id=aid, summary={"artifact": aid, **summary}, out_dir=out, report=report)


__all__ = [
    "EFFICIENCY_MAX_PAIRS",
    "EvalResult",
    "EvalSettings",
    "evaluate_policies",
    "reward_model_efficiency",
]
