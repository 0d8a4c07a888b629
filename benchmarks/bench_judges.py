"""Local AI judges against human labels on LLMBar (natural) and PandaLM: accuracy, Cohen's κ and order
consistency; and the `openai:` backend's cache and throughput against a local OpenAI-compatible server.

Each test pair is shown to a judge in a fixed random order (seeded per item, so the human label is A about half
the time), and judged in both orders (`alignflow.judges.judge_pairs`, disagreeing orders become ties). The human
label: LLMBar's gold label; PandaLM's majority of three annotators (its ties and no-majority items left out,
as `rm-eval` does). Accuracy counts a judge's tie as one half (Wilson 95% CI); κ treats "tie" as a category
(bootstrap 95% CI over items).

Judges (`--judge NAME=SPEC`, repeatable, replaces the list):
- `longer`: `rule:alignflow.judges.rubrics:longer` — the longer answer wins (the baseline a judge must beat);
- `first shown`: `rule:alignflow.judges.rubrics:first` — always the first shown (position bias at its worst);
- `HH reward model`: `rm:CKPT`, the all-MiniLM-L6-v2 reward model trained on HH-harmless by
  `bench_hh_reward.py` (`--rm CKPT`, or the newest checkpoint in `--hh-log`);
- `hf: verdict tokens` / `hf: 1-10 rubric`: a local causal LM (`--hf DIR`, e.g. the quickstart's SFT policy).

The `openai:` rows: `alignflow.judges.testing`'s OpenAI-compatible server answering with the `longer` rubric
and a fixed delay per request; requests/s through the official client at concurrency 1 and 8, and a re-run's
cache hit rate.

Run: .venv/bin/python benchmarks/bench_judges.py [--rm CKPT] [--hf DIR] [--limit N] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))
from _results import markdown_table, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "LLMBar natural": ("llmbar", SHARED / "llmbar" / "natural.json"),
    "PandaLM": ("pandalm", SHARED / "pandalm" / "testset-v1.json"),
}


def shown(rows: list[dict]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(prompt, first shown, second shown) per row and the human label in that order."""
    pairs, labels = [], []
    for r in rows:
        flip = hashlib.sha256(r["id"].encode()).digest()[0] % 2 == 1
        if flip:
            pairs.append((r["prompt"], r["rejected"], r["chosen"]))
            labels.append("B")
        else:
            pairs.append((r["prompt"], r["chosen"], r["rejected"]))
            labels.append("A")
    return pairs, labels


def score_judge(spec: str, data: dict[str, tuple[list, list]]) -> dict[str, dict]:
    from alignflow.judges import judge_pairs, load_judge
    from alignflow.quality.judges import judge_human_agreement

    judge = load_judge(spec)
    out = {}
    for name, (pairs, human) in data.items():
        t0 = time.perf_counter()
        verdicts = judge_pairs(judge, pairs, orders="both", on_inconsistent="tie")
        out[name] = judge_human_agreement(
            [v.label for v in verdicts], human, [v.consistent for v in verdicts]
        )
        out[name]["seconds"] = time.perf_counter() - t0
    return out


def openai_figures(n_pairs: int = 100, delay: float = 0.02) -> dict:
    """Requests/s to the local OpenAI-compatible server at concurrency 1 and 8, and a re-run's cache hits."""
    from alignflow.judges import judge_pairs, load_judge
    from alignflow.judges.testing import FakeOpenAI, serve

    pairs = [
        (f"question {i}", "short answer", "a somewhat longer answer " * (1 + i % 3)) for i in range(n_pairs)
    ]
    os.environ["BENCH_JUDGE_KEY"] = "sk-bench-not-a-real-key"
    out = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        serve(FakeOpenAI(delay=delay, api_key="sk-bench-not-a-real-key")) as fake,
    ):
        for conc in (1, 8):
            spec = (
                f"openai:judge@{fake.base_url}#api_key=${{ENV:BENCH_JUDGE_KEY}},concurrency={conc},"
                f"cache_dir={tmp}/cache-{conc}"
            )
            fake.max_in_flight = 0
            before = fake.requests
            t0 = time.perf_counter()
            judge_pairs(load_judge(spec), pairs)
            dt = time.perf_counter() - t0
            sent = fake.requests - before
            before = fake.requests
            t1 = time.perf_counter()
            judge_pairs(load_judge(spec), pairs)
            out[conc] = {
                "requests": sent,
                "seconds": dt,
                "rps": sent / dt,
                "rerun_requests": fake.requests - before,
                "rerun_seconds": time.perf_counter() - t1,
                "max_in_flight": fake.max_in_flight,
            }
    return out


def hh_checkpoint(log: Path) -> str | None:
    if not log.exists():
        return None
    rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
    for r in reversed(rows):
        if r.get("checkpoint_dir") and Path(r["checkpoint_dir"]).exists():
            return r["checkpoint_dir"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--judge", action="append", default=None, help="NAME=SPEC (repeatable; replaces the list)"
    )
    ap.add_argument("--rm", default=None, help="Reward-model checkpoint for the rm: judge.")
    ap.add_argument("--hh-log", type=Path, default=Path(__file__).parent / "hh_reward_configs.jsonl")
    ap.add_argument("--hf", default=None, help="A local causal LM folder for the hf: judges.")
    ap.add_argument("--hf-label", default="quickstart SFT policy")
    ap.add_argument("--limit", type=int, default=None, help="First N pairs of each set (smoke runs).")
    ap.add_argument("--no-openai", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()

    from alignflow.evaluate.rm_eval import reference_pairs

    data = {}
    for name, (kind, path) in SETS.items():
        rows = reference_pairs(kind, path)[: a.limit]
        data[name] = shown(rows)
    if a.judge:
        judges = dict(x.split("=", 1) for x in a.judge)
    else:
        judges = {
            "longer (baseline)": "rule:alignflow.judges.rubrics:longer",
            "first shown (position-biased)": "rule:alignflow.judges.rubrics:first",
        }
        rm = a.rm or hh_checkpoint(a.hh_log)
        if rm:
            judges["HH-harmless reward model (MiniLM)"] = f"rm:{rm}"
        if a.hf:
            judges[f"hf: {a.hf_label}, verdict tokens"] = f"hf:{a.hf}"
            judges[f"hf: {a.hf_label}, 1–10 rubric"] = f"hf:{a.hf}#mode=rubric"
    t0 = time.perf_counter()
    header = [
        "judge",
        "test set",
        "pairs",
        "accuracy (95% CI)",
        "κ (95% CI)",
        "order-consistent",
        "ties",
        "time",
    ]
    rows = []
    for jname, spec in judges.items():
        res = score_judge(spec, data)
        for sname, r in res.items():
            kap = (
                "–"
                if r["kappa"] is None
                else f"{r['kappa']:.3f} ({r['kappa_ci'][0]:.3f}–{r['kappa_ci'][1]:.3f})"
            )
            rows.append(
                [
                    jname,
                    sname,
                    str(r["n"]),
                    f"{r['accuracy']:.3f} ({r['accuracy_ci'][0]:.3f}–{r['accuracy_ci'][1]:.3f})",
                    kap,
                    f"{r['order_consistency']:.1%}",
                    f"{r['tie_rate']:.1%}",
                    f"{r['seconds']:.1f} s",
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    table = markdown_table(header, rows)
    body = table + (
        "\n\nEach pair shown in a fixed random order (by a hash of its id), judged in both orders; disagreeing "
        "orders count as a tie (one half). Human labels: LLMBar natural's gold label; PandaLM's majority of 3 "
        "annotators (ties and no-majority items left out). κ: Cohen's, 'tie' a category of its own. Judges: "
        + "; ".join(f"{k}: `{v}`" for k, v in judges.items())
        + f". Judging time on 2 cores, wall {(time.perf_counter() - t0) / 60:.1f} min."
    )
    if not a.no_openai:
        figs = openai_figures()
        otab = markdown_table(
            [
                "concurrency",
                "requests (100 pairs, both orders)",
                "requests/s",
                "max in flight",
                "re-run requests",
                "cache hit rate on re-run",
            ],
            [
                [
                    str(c),
                    str(f["requests"]),
                    f"{f['rps']:.1f}",
                    str(f["max_in_flight"]),
                    str(f["rerun_requests"]),
                    f"{1 - f['rerun_requests'] / f['requests']:.0%}",
                ]
                for c, f in figs.items()
            ],
        )
        print(otab)
        body += (
            "\n\n`openai:` backend against `alignflow.judges.testing.fake_openai_server` (the `longer` rubric, "
            "20 ms per request), through the official client:\n\n" + otab
        )
    print(table)
    if not a.no_write:
        write_section("judges", "AI judges: agreement with human labels (LLMBar, PandaLM)", body)


if __name__ == "__main__":
    main()
