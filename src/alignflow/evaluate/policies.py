"""Policy evaluation statistics and the page that shows them (pure NumPy and matplotlib, no models).

``alignflow eval`` samples each policy at each temperature and scores every response (that part lives in
:mod:`alignflow.rollout.policy_eval`, above the sampler and the scorers); this module turns the scores into
figures:

- per (policy, temperature): the mean score with a percentile-bootstrap CI over prompts (each prompt's score
  is the mean over its samples, so prompts weigh the same whatever their sample count);
- against the baseline at the same temperature, paired by prompt: the mean score difference and the win rate
  (ties count one half), each with a bootstrap CI (:mod:`alignflow.evaluate.stats`);
- response length in characters (exact whatever the tokenizer: decoding and re-tokenising a byte-level
  BPE's output does not give back the sampled token count): mean with a CI over prompts, median, 90th
  percentile, min and max;
- with a multi-head reward model (``heads``): per (policy, temperature) every head's mean with its bootstrap
  CI over prompts and, against the baseline, every head's paired difference, so the policy × dimension table
  (:func:`head_rows`) shows which dimension a policy gains on and which it trades away;
- a terminal table (:func:`summary_rows`), verdicts (:func:`verdicts`) and a self-contained HTML page with
  plots (:func:`render_html`, in the style of :mod:`alignflow.evaluate.report`).

Shapes: ``scores`` and ``lengths`` of a :class:`Condition` are ``(P, S)``: P prompts (the same prompts, in the
same order, for every condition) by S samples per prompt (1 under greedy decoding); ``head_scores`` is
``(P, S, H)``, one column per head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignflow.evaluate import stats

SUMMARY_FORMAT = "alignflow.evaluation/1"


@dataclass(frozen=True)
class Condition:
    """One policy sampled at one temperature: scores and response lengths in characters, ``(P, S)`` each, and
    a multi-head scorer's every head ``(P, S, H)`` (None otherwise)."""

    policy: str
    temperature: float
    scores: np.ndarray
    lengths: np.ndarray
    head_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        s, n = np.asarray(self.scores, dtype=np.float64), np.asarray(self.lengths, dtype=np.float64)
        if s.ndim != 2 or s.shape != n.shape or s.size == 0:
            raise ValueError(
                f"{self.label}: scores and lengths must be non-empty (prompts, samples) arrays of one shape, "
                f"got {s.shape} and {n.shape}"
            )
        object.__setattr__(self, "scores", s)
        object.__setattr__(self, "lengths", n)
        if self.head_scores is not None:
            h = np.asarray(self.head_scores, dtype=np.float64)
            if h.ndim != 3 or h.shape[:2] != s.shape:
                raise ValueError(
                    f"{self.label}: head_scores must be (prompts, samples, heads) = {s.shape + ('H',)}, "
                    f"got {h.shape}"
                )
            object.__setattr__(self, "head_scores", h)

    @property
    def label(self) -> str:
        return f"{self.policy} @ T={self.temperature:g}"

    @property
    def per_prompt(self) -> np.ndarray:
        """(P,) mean score over each prompt's samples."""
        return self.scores.mean(axis=1)

    @property
    def per_prompt_heads(self) -> np.ndarray:
        """(P, H) each head's mean over each prompt's samples."""
        if self.head_scores is None:
            raise ValueError(f"{self.label}: no head scores")
        return self.head_scores.mean(axis=1)


def _ci(mean_lo_hi: tuple[float, float, float], key: str = "mean") -> dict[str, float]:
    m, lo, hi = mean_lo_hi
    return {key: m, "lo": lo, "hi": hi}


def length_stats(
    lengths: np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict[str, float]:
    """Response lengths ``(P, S)``: mean (with a bootstrap CI over prompts of the per-prompt mean), median, p90,
    min and max over all responses."""
    flat = lengths.reshape(-1)
    out = _ci(stats.bootstrap_mean_ci(lengths.mean(axis=1), n_boot=n_boot, alpha=alpha, seed=seed))
    out |= {
        "median": float(np.median(flat)),
        "p90": float(np.quantile(flat, 0.9)),
        "min": float(flat.min()),
        "max": float(flat.max()),
    }
    return out


def summarize(
    conditions: Sequence[Condition],
    baseline: str | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    heads: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The evaluation's figures, one result per condition in the given order (see the module docstring).

    ``baseline`` names a policy among the conditions; each other policy is compared with it at the same
    temperature (``vs_baseline``). Every interval is a ``1 - alpha`` percentile bootstrap over prompts.
    ``heads`` names the columns of every condition's ``head_scores``: each result gains ``heads``
    ({head: {mean, lo, hi}}) and ``vs_baseline.heads`` (the paired difference per head), and the summary the
    list ``heads``.
    """
    if not conditions:
        raise ValueError("summarize: no conditions")
    n_prompts = {c.scores.shape[0] for c in conditions}
    if len(n_prompts) != 1:
        raise ValueError(
            f"summarize: conditions must score the same prompts, got prompt counts {sorted(n_prompts)}"
        )
    by_key = {(c.policy, c.temperature): c for c in conditions}
    if baseline is not None and not any(c.policy == baseline for c in conditions):
        raise ValueError(f"summarize: baseline {baseline!r} is not among the evaluated policies")
    if heads is not None:
        bad = [c.label for c in conditions if c.head_scores is None or c.head_scores.shape[2] != len(heads)]
        if bad:
            raise ValueError(
                f"summarize: {', '.join(bad)}: no head_scores with one column per head {list(heads)}"
            )
    results = []
    for c in conditions:
        res: dict[str, Any] = {
            "policy": c.policy,
            "temperature": c.temperature,
            "samples_per_prompt": int(c.scores.shape[1]),
            "n_prompts": int(c.scores.shape[0]),
            "score": _ci(stats.bootstrap_mean_ci(c.per_prompt, n_boot=n_boot, alpha=alpha, seed=seed)),
            "length": length_stats(c.lengths, n_boot, alpha, seed),
        }
        ref = by_key.get((baseline, c.temperature)) if baseline is not None else None
        if ref is not None and c.policy != baseline:
            res["vs_baseline"] = {
                "diff": _ci(stats.paired_diff_ci(c.per_prompt, ref.per_prompt, n_boot, alpha, seed)),
                "win_rate": _ci(stats.win_rate(c.per_prompt, ref.per_prompt, n_boot, alpha, seed), "rate"),
            }
        if heads is not None:
            mine = c.per_prompt_heads  # (P, H)
            res["heads"] = {
                h: _ci(stats.bootstrap_mean_ci(mine[:, k], n_boot=n_boot, alpha=alpha, seed=seed))
                for k, h in enumerate(heads)
            }
            if "vs_baseline" in res:
                theirs = ref.per_prompt_heads
                res["vs_baseline"]["heads"] = {
                    h: _ci(stats.paired_diff_ci(mine[:, k], theirs[:, k], n_boot, alpha, seed))
                    for k, h in enumerate(heads)
                }
        res["per_prompt_score"] = c.per_prompt.tolist()
        results.append(res)
    out = {
        "format": SUMMARY_FORMAT,
        "baseline": baseline,
        "confidence": 1.0 - alpha,
        "n_boot": n_boot,
        "bootstrap_seed": seed,
        "results": results,
    }
    if heads is not None:
        out["heads"] = list(heads)
    return out


def summary_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per condition for the terminal table and the page: score, Δ and win rate vs the baseline
    with their intervals, and the response length."""
    from alignflow.evaluate.report import ci_text

    base = summary.get("baseline")
    rows = []
    for r in summary["results"]:
        s, n = r["score"], r["length"]
        row: dict[str, Any] = {
            "policy": r["policy"],
            "T": "greedy" if r["temperature"] == 0 else f"{r['temperature']:g}",
            "samples": r["samples_per_prompt"],
            "score": ci_text(s["mean"], s["lo"], s["hi"]),
        }
        if base is not None:
            vs = r.get("vs_baseline")
            d, w = (vs["diff"], vs["win_rate"]) if vs else (None, None)
            row[f"Δ vs {base}"] = ci_text(d["mean"], d["lo"], d["hi"], signed=True) if d else "baseline"
            row[f"win rate vs {base}"] = ci_text(w["rate"], w["lo"], w["hi"], digits=2) if w else ""
        row["length (chars)"] = f"{n['mean']:.1f} (p90 {n['p90']:.0f})"
        rows.append(row)
    return rows


def head_rows(summary: Mapping[str, Any], diff: bool = False) -> list[dict[str, Any]]:
    """The policy × head table (empty without ``heads``): per condition, every head's mean score with its
    interval; ``diff``: every head's paired difference from the baseline instead (compared conditions only)."""
    from alignflow.evaluate.report import ci_text

    if not summary.get("heads"):
        return []
    rows = []
    for r in summary["results"]:
        values = (r.get("vs_baseline") or {}).get("heads") if diff else r["heads"]
        if not values:
            continue
        row: dict[str, Any] = {
            "policy": r["policy"],
            "T": "greedy" if r["temperature"] == 0 else f"{r['temperature']:g}",
        }
        for h in summary["heads"]:
            v = values[h]
            row[h] = ci_text(v["mean"], v["lo"], v["hi"], signed=diff)
        rows.append(row)
    return rows


def verdicts(summary: Mapping[str, Any]) -> list[str]:
    """ "X beats / is worse than / is not distinguishable from BASE on score (T=…)" for each compared condition."""
    from alignflow.evaluate.report import verdict_text

    out = []
    for r in summary["results"]:
        vs = r.get("vs_baseline")
        if vs:
            t = "greedy" if r["temperature"] == 0 else f"T={r['temperature']:g}"
            d = vs["diff"]
            out.append(
                verdict_text(r["policy"], summary["baseline"], d["mean"], d["lo"], d["hi"], f"score ({t})")
            )
    return out


# ---------------------------------------------------------------------------------------------- the page


def _temps_and_policies(results: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[str]]:
    temps = list(dict.fromkeys(r["temperature"] for r in results))
    policies = list(dict.fromkeys(r["policy"] for r in results))
    return temps, policies


def _grouped_bars(
    results: Sequence[Mapping[str, Any]], value: Any, ylabel: str, ref: float | None = None
) -> Any:
    """Bars grouped by temperature, one colour per policy, 95% CI whiskers; ``value(r)`` → ``(v, lo, hi)``
    or None to leave a bar out."""
    from alignflow.evaluate.report import PALETTE, _fig, _mpl, _style

    temps, policies = _temps_and_policies(results)
    fig = _fig(max(5.0, 1.0 * len(temps) * len(policies) + 2.5), 3.5)
    ax = fig.add_subplot()
    width = 0.8 / len(policies)
    for j, name in enumerate(policies):
        xs, vs, err_lo, err_hi = [], [], [], []
        for i, t in enumerate(temps):
            r = next((r for r in results if r["policy"] == name and r["temperature"] == t), None)
            got = value(r) if r is not None else None
            if got is None:
                continue
            v, lo, hi = got
            xs.append(i - 0.4 + width * (j + 0.5))
            vs.append(v)
            err_lo.append(max(0.0, v - lo))
            err_hi.append(max(0.0, hi - v))
        if xs:
            color = PALETTE[j % (len(PALETTE) - 1)]
            ax.bar(xs, vs, width=width * 0.9, color=color, alpha=0.85, label=_mpl(name))
            ax.errorbar(xs, vs, yerr=[err_lo, err_hi], fmt="none", ecolor="#111827", capsize=4, linewidth=1.2)
    if ref is not None:
        ax.axhline(ref, color="#6b7280", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(temps)), ["greedy" if t == 0 else f"T={t:g}" for t in temps])
    ax.set_ylabel(ylabel, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    _style(ax)
    return fig


def _lengths_plot(results: Sequence[Mapping[str, Any]], lengths: Mapping[str, Sequence[float]]) -> Any:
    from alignflow.evaluate.report import _fig, _mpl, _style

    labels = [f"{r['policy']}\n{'greedy' if r['temperature'] == 0 else 'T=' + format(r['temperature'], 'g')}"
              for r in results]  # fmt: skip
    data = [list(lengths[_key(r)]) for r in results]
    fig = _fig(max(5.0, 0.9 * len(results) + 2.5), 3.5)
    ax = fig.add_subplot()
    ax.boxplot(data, showmeans=True, widths=0.55)
    ax.set_xticks(range(1, len(results) + 1), [_mpl(x) for x in labels])
    ax.set_ylabel("response length (characters)", fontsize=10)
    _style(ax)
    return fig


def _key(r: Mapping[str, Any]) -> str:
    return f"{r['policy']}@{r['temperature']:g}"


def render_html(
    summary: Mapping[str, Any],
    title: str,
    lengths: Mapping[str, Sequence[float]] | None = None,
    samples: Sequence[Mapping[str, Any]] = (),
    facts: Mapping[str, Any] | None = None,
    created_at: str | None = None,
) -> str:
    """The evaluation page: verdicts, the summary table, score / win-rate / length plots, example responses.

    ``lengths``: every response's length in characters per condition, keyed ``"<policy>@<temperature>"`` (the box
    plot; omitted when None). ``samples``: ``{"prompt", "policy", "temperature", "response", "score"}`` rows.
    Every string from the data is HTML-escaped; plots are embedded PNGs, so the file stands alone.
    """
    from alignflow.evaluate.report import CSS, _e, _img, _section, _table

    results = summary["results"]
    base = summary.get("baseline")
    level = f"{100 * summary.get('confidence', 0.95):g}%"
    parts = []
    if facts:
        parts.append(
            _section("facts", "Setup", _table([{"": k, "value": v} for k, v in facts.items()], "facts"))
        )
    parts.append(_section("summary", "Summary", _table(summary_rows(summary), "summary")))
    if summary.get("heads"):
        parts.append(
            _section(
                "heads",
                "Mean reward per head",
                _table(head_rows(summary), "heads"),
                f"Each head of the multi-head reward model ({_e(', '.join(summary['heads']))}; the score above is "
                f"the first, overall): its mean over prompts with a {level} bootstrap interval.",
            )
        )
        if base is not None and head_rows(summary, diff=True):
            parts.append(
                _section(
                    "head-diffs",
                    f"Per-head difference from {base}",
                    _table(head_rows(summary, diff=True), "head-diffs"),
                    f"Each head's mean paired difference from {_e(base)} at the same temperature, with a {level} "
                    "bootstrap interval over prompts. A policy that gains overall while a dimension's head "
                    "falls is trading that dimension away.",
                )
            )
    fig = _grouped_bars(
        results, lambda r: (r["score"]["mean"], r["score"]["lo"], r["score"]["hi"]), "mean score"
    )
    parts.append(
        _section(
            "scores",
            "Score by policy and temperature",
            f'<div class="figure">{_img(fig, "mean score per policy and temperature")}</div>',
            f"Mean score of each policy's responses (each prompt's samples averaged); whiskers are {level} "
            "bootstrap intervals over prompts.",
        )
    )
    if base is not None and any(r.get("vs_baseline") for r in results):

        def rate(r: Mapping[str, Any]) -> tuple[float, float, float] | None:
            w = (r.get("vs_baseline") or {}).get("win_rate")
            return (w["rate"], w["lo"], w["hi"]) if w else None

        fig = _grouped_bars(results, rate, f"win rate vs {base}", ref=0.5)
        fig.axes[0].set_ylim(0, 1.05)
        parts.append(
            _section(
                "win-rates",
                f"Win rate against {base}",
                f'<div class="figure">{_img(fig, f"win rate against {base}")}</div>',
                f"Share of prompts where the policy scores higher than {_e(base)} at the same temperature (ties "
                "count one half), paired by prompt; the dashed line at 0.5 is parity.",
            )
        )
    if lengths:
        fig = _lengths_plot(results, lengths)
        parts.append(
            _section(
                "lengths",
                "Response length",
                f'<div class="figure">{_img(fig, "response length per policy and temperature")}</div>',
                "Characters per response; the triangle is the mean. "
                "A score gain that comes with much longer responses may be the scorer rewarding length.",
            )
        )
    if samples:
        body = "".join(
            "<tr>"
            f'<td class="text">{_e(s["prompt"])}</td><td>{_e(s["policy"])}</td>'
            f'<td class="num">{_e(format(s["temperature"], "g"))}</td>'
            f'<td class="text">{_e(s["response"])}</td><td class="num">{float(s["score"]):.4g}</td>'
            "</tr>"
            for s in samples
        )
        parts.append(
            _section(
                "samples",
                "Example responses",
                '<table class="samples"><thead><tr><th>prompt</th><th>policy</th><th>T</th><th>response</th>'
                f"<th>score</th></tr></thead><tbody>{body}</tbody></table>",
            )
        )
    eff = summary.get("annotation_efficiency")
    if eff:
        if eff.get("curve"):
            body = _table(eff["curve"], "efficiency")
            text = (
                f"Held-out accuracy of an embedding Bradley-Terry reward model (MiniLM) after the first n of the "
                f"reward model's training pairs ({_e(eff['pairs'][:12])}, at most {eff['capped_at']}; "
                f"dataset order, and shuffled: mean of 3 orders); held-out = {_e(eff['heldout'])}."
            )
        else:
            body, text = "", f"No curve: {_e(eff['note'])}."
        parts.append(_section("efficiency", "Annotation efficiency", body, text))
    verdict = "".join(f"<div>{_e(v)}</div>" for v in verdicts(summary))
    created = f'<div class="meta">{_e(created_at)}</div>' if created_at else ""
    head = f'<div class="verdict" id="verdict">{verdict}</div>' if verdict else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
        f'<header><div class="inner"><h1>{_e(title)}</h1>{created}{head}</div></header>'
        f"<main>{''.join(parts)}"
        "<footer>Generated by alignflow eval — self-contained page, no scripts.</footer></main>"
        "</body></html>\n"
    )


__all__ = [
    "SUMMARY_FORMAT",
    "Condition",
    "head_rows",
    "length_stats",
    "render_html",
    "summarize",
    "summary_rows",
    "verdicts",
]
