"""Synthetic report data covering every section, built with the real evaluate functions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def build_report_data() -> dict[str, Any]:
    from alignflow.evaluate import (
        bootstrap_mean_ci,
        bt_probability,
        calibration,
        detect_reward_hacking,
        paired_diff_ci,
        win_rate,
    )
    from alignflow.evaluate.report import verdict_text

    rng = np.random.default_rng(0)
    n = 64
    sft = rng.normal(0.30, 0.2, n)
    gold = {"SFT": sft, "DPO": sft + rng.normal(0.08, 0.1, n), "PPO": sft + rng.normal(0.12, 0.1, n)}
    policies = {}
    for name, g in gold.items():
        m, lo, hi = bootstrap_mean_ci(g)
        policies[name] = {"mean": m, "lo": lo, "hi": hi, "n": n}
    win_rates = {}
    for name in ("DPO", "PPO"):
        r, lo, hi = win_rate(gold[name], sft)
        win_rates[name] = {"rate": r, "lo": lo, "hi": hi}
    d, dlo, dhi = paired_diff_ci(gold["PPO"], sft)

    steps = np.arange(0, 200, 5, dtype=float)
    proxy = 2 * (1 - np.exp(-steps / 60)) + rng.normal(0, 0.05, steps.size)
    g_curve = 0.5 - 0.6 * ((steps - 90) / 100) ** 2 + rng.normal(0, 0.04, steps.size)
    length = 40 + 0.25 * steps + rng.normal(0, 2, steps.size)
    warnings = detect_reward_hacking(steps, proxy, g_curve, length)

    gaps = rng.normal(0, 1.5, 800)
    outcomes = (rng.random(800) < bt_probability(gaps / 1.5)).astype(float)
    rel = calibration(bt_probability(gaps), outcomes)

    annotators = []
    for i in range(14):
        kind = ["reliable", "noisy", "spammer", "adversarial"][i % 4]
        true = {"reliable": 0.9, "noisy": 0.7, "spammer": 0.5, "adversarial": 0.2}[kind] + rng.normal(0, 0.03)
        annotators.append(
            {
                "annotator": f"ann-{i:02d}",
                "type": kind,
                "true_reliability": float(true),
                "estimated_skill": float(true + rng.normal(0, 0.06)),
                "gold_accuracy": float(np.clip(true + rng.normal(0, 0.05), 0, 1)),
                "flagged": kind in ("spammer", "adversarial"),
            }
        )
    losses = [[float(s), float(2.5 * np.exp(-s / 80) + 0.3)] for s in range(0, 400, 10)]
    return {
        "title": "Quickstart evaluation",
        "created_at": "2025-01-01 12:00 UTC",
        "verdict": verdict_text("PPO", "SFT", d, dlo, dhi),
        "summary_rows": [
            {"policy": k, "gold utility": v["mean"], "95% CI": f"[{v['lo']:.3f}, {v['hi']:.3f}]", "n": n}
            for k, v in policies.items()
        ]
        + [{"policy": XSS, "gold utility": None, "95% CI": "", "n": 0}],
        "warnings": warnings + [f"annotator {XSS} flagged"],
        "stage_times": {"sft": 41.2, "collect": 12.5, "reward": 33.0, "dpo": 28.4, "ppo": 95.1, "eval": 7.7},
        "policies": policies,
        "win_rates": win_rates,
        "curves": {
            "SFT loss": {"train": losses, "eval": losses[::4]},
            "Reward model": {"loss": losses, "accuracy": [[s, 1 - v / 3] for s, v in losses]},
            "PPO reward / KL": {"reward": [[float(s), float(p)] for s, p in zip(steps, proxy, strict=True)]},
            "DPO $margin$": {"margin": [[float(s), float(s) / 100] for s in range(10)]},
        },
        "proxy_vs_gold": {
            "steps": steps.tolist(),
            "proxy": proxy.tolist(),
            "gold": g_curve.tolist(),
            "length": length.tolist(),
        },
        "reliability": rel,
        "annotators": annotators,
        "lineage": [
            "policy ppo-v1  (checkpoint sha256:ab12…)",
            "├── reward model rm-v1",
            "│   └── preferences v3  (1,204 pairs, guideline v2)",
            f"│       └── annotators: 14 ({XSS})",
            "└── policy sft-v0",
            "    └── dataset sft-mix v1",
        ],
        "samples": [
            {"prompt": "Explain <b>KL</b> & why it matters", "policy": "PPO", "response": XSS, "gold": 0.71},
            {"prompt": "Summarise:\nline two", "policy": "SFT", "response": "a & b < c", "gold": 0.2},
        ],
    }


@pytest.fixture
def report_data() -> dict[str, Any]:
    return build_report_data()
