"""Alert rules on synthetic metric streams, their actions (log, store, webhook, stop) and resume state.

Each rule gets a stream where it must fire (at the step the arithmetic says) and one where it must not.
Streams are built from fixed seeds so the expected steps are exact.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from alignflow.config import AlertRule, AlertsSection, StageConfig, load_config, register_stage
from alignflow.errors import ConfigError
from alignflow.monitor.alerts import RULE_DEFAULTS, AlertMonitor, default_rules, repetition_rate


def monitor(*rules: dict[str, Any], **section: Any) -> AlertMonitor:
    return AlertMonitor(AlertsSection(rules=[AlertRule(**r) for r in rules], **section))


def run(mon: AlertMonitor, stream: Sequence[dict[str, float]], texts: Sequence[Sequence[str]] | None = None):
    """Feed steps 1..n; the steps at which something fired."""
    fired = []
    for i, m in enumerate(stream):
        step = i + 1
        alerts = mon.observe(step, m, texts[i] if texts is not None else None)
        fired += [(step, a.rule) for a in alerts]
    return fired


def noise(n: int, mean: float, sd: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.gauss(0.0, sd) for _ in range(n)]


def steps_of(fired: list[tuple[int, str]]) -> list[int]:
    return [s for s, _ in fired]


# --------------------------------------------------------------------------- rules: fire / not fire


def test_kl_spike_fires_on_the_spike_step_only() -> None:
    kl = noise(40, 2.0, 0.2)
    kl[29] = 8.0  # step 30
    mon = monitor({"rule": "kl_spike", "cooldown": 0})
    assert steps_of(run(mon, [{"kl/seq_sum_mean": v} for v in kl])) == [30]
    alert = mon.fired[0]
    assert alert.metric == "kl/seq_sum_mean" and alert.value == 8.0
    assert 2.0 < alert.threshold < 8.0 and alert.severity == "warning"


def test_kl_spike_does_not_fire_on_a_steady_rise() -> None:
    # KL grows as the policy moves (the quickstart's goes 0 -> 4 nats): a trend is not a spike.
    kl = [0.1 * i + v for i, v in enumerate(noise(80, 0.0, 0.1, seed=1))]
    assert run(monitor({"rule": "kl_spike", "cooldown": 0}), [{"kl/seq_sum_mean": v} for v in kl]) == []


# A real quickstart PPO run (30 steps, batch 16; /tmp/qs-small, metrics.jsonl): healthy, yet its step-29 KL
# (3.8) is 1.99x the window median and 6.1 MADs above it. The rules must stay quiet on it.
QUICKSTART_KL = [
    0.0,
    0.212,
    0.658,
    1.516,
    0.284,
    0.864,
    0.769,
    1.294,
    1.059,
    1.586,
    1.279,
    1.911,
    2.542,
    1.72,
]
QUICKSTART_KL += [
    1.799,
    1.773,
    2.1,
    1.727,
    1.035,
    2.082,
    1.911,
    1.77,
    2.141,
    2.247,
    2.524,
    3.191,
    2.047,
    2.201,
]
QUICKSTART_KL += [3.8, 1.924]
QUICKSTART_VALUE_LOSS = [0.214, 0.127, 0.246, 0.068, 0.258, 0.112, 0.127, 0.188, 0.187, 0.309, 0.173, 0.146]
QUICKSTART_VALUE_LOSS += [0.259, 0.078, 0.074, 0.164, 0.06, 0.125, 0.148, 0.096, 0.057, 0.054, 0.059, 0.064]
QUICKSTART_VALUE_LOSS += [0.065, 0.135, 0.047, 0.037, 0.13, 0.084]
QUICKSTART_ENTROPY = [0.736, 0.6, 0.555, 0.586, 0.611, 0.603, 0.56, 0.577, 0.56, 0.506, 0.516, 0.586, 0.522]
QUICKSTART_ENTROPY += [0.472, 0.366, 0.525, 0.517, 0.464, 0.51, 0.423, 0.35, 0.484, 0.418, 0.531, 0.511]
QUICKSTART_ENTROPY += [0.459, 0.376, 0.381, 0.523, 0.374]
QUICKSTART_LEN = [25.6, 28.2, 33.8, 25.9, 29.1, 25.6, 24.9, 30.1, 29.2, 28.5, 23.7, 27.7, 29.5, 26.5, 24.9]
QUICKSTART_LEN += [29.6, 27.0, 24.9, 25.6, 26.2, 25.7, 27.8, 25.8, 25.2, 24.4, 25.4, 25.2, 31.1, 28.0, 26.4]


def test_the_default_rules_stay_quiet_on_a_real_quickstart_run() -> None:
    mon = AlertMonitor(AlertsSection(), default_rules("ppo"))
    for i in range(30):
        mon.observe(
            i + 1,
            {
                "kl/seq_sum_mean": QUICKSTART_KL[i],
                "value/loss": QUICKSTART_VALUE_LOSS[i],
                "policy/entropy": QUICKSTART_ENTROPY[i],
                "response/len_mean": QUICKSTART_LEN[i],
            },
        )
    assert mon.fired == []


def test_kl_spike_robust_baseline_arithmetic() -> None:
    # window 4 of [1, 2, 3, 4]: median 2.5, MAD 1, limit 2.5 + 2 * 1.4826 = 5.4652
    mon = monitor({"rule": "kl_spike", "window": 4, "threshold": 2.0, "warmup": 0, "cooldown": 0})
    assert run(mon, [{"kl/seq_sum_mean": v} for v in (1, 2, 3, 4, 5.46)]) == []
    mon = monitor({"rule": "kl_spike", "window": 4, "threshold": 2.0, "warmup": 0, "cooldown": 0})
    assert steps_of(run(mon, [{"kl/seq_sum_mean": v} for v in (1, 2, 3, 4, 5.47)])) == [5]
    assert mon.fired[0].threshold == pytest.approx(2.5 + 2 * 1.4826)


def test_kl_ceiling() -> None:
    kl = [1.0, 5.0, 19.9, 20.5, 3.0]
    assert steps_of(run(monitor({"rule": "kl_ceiling"}), [{"kl/seq_sum_mean": v} for v in kl])) == [4]
    assert run(monitor({"rule": "kl_ceiling", "threshold": 30.0}), [{"kl/seq_sum_mean": v} for v in kl]) == []


def test_reward_plateau_fires_with_info_severity_when_reward_stops_improving() -> None:
    rising = [0.02 * i + v for i, v in enumerate(noise(60, 0.0, 0.05, seed=2))]
    flat = noise(60, rising[-1], 0.05, seed=3)
    mon = monitor({"rule": "reward_plateau", "cooldown": 100})
    fired = run(mon, [{"reward/raw_mean": v} for v in rising + flat])
    assert len(fired) == 1 and 60 < fired[0][0] <= 120
    assert mon.fired[0].severity == "info"  # a plateau may be convergence
    assert run(monitor({"rule": "reward_plateau"}), [{"reward/raw_mean": v} for v in rising]) == []


def test_entropy_collapse() -> None:
    healthy = noise(60, 0.6, 0.05, seed=4)
    assert run(monitor({"rule": "entropy_collapse"}), [{"policy/entropy": v} for v in healthy]) == []
    # early baseline 0.6 (steps 1-10); 0.05 from step 21: the last-10 mean (0.6 + 9 * 0.05) / 10 = 0.105
    # first falls below 0.2 * 0.6 = 0.12 at step 29
    collapsing = [0.6] * 20 + [0.05] * 20
    mon = monitor({"rule": "entropy_collapse", "cooldown": 100})
    assert steps_of(run(mon, [{"policy/entropy": v} for v in collapsing])) == [29]
    assert mon.fired[0].threshold == pytest.approx(0.12)


def test_length_inflation_against_the_early_baseline() -> None:
    lengths = [20.0] * 20 + [40.0] * 20  # last-10 mean > 1.5 * 20 once 6 of the 10 are 40: step 26
    mon = monitor({"rule": "length_inflation", "cooldown": 100})
    assert steps_of(run(mon, [{"response/len_mean": v} for v in lengths])) == [26]
    wobbling = noise(80, 26.0, 3.0, seed=5)  # the quickstart's lengths: 24-34 tokens
    assert run(monitor({"rule": "length_inflation"}), [{"response/len_mean": v} for v in wobbling]) == []


def test_repetition_rate_arithmetic() -> None:
    assert repetition_rate(["a b c a b c"]) == pytest.approx(1 / 4)  # 3-grams abc bca cab abc
    assert repetition_rate(["thanks thanks thanks thanks thanks"]) == pytest.approx(2 / 3)
    assert repetition_rate(["a b c d", "a b c d"]) == 0.0  # the same phrase in two responses is not a loop
    assert repetition_rate(["too short", ""]) == 0.0
    assert repetition_rate(["x y x y x y"], n=2) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        repetition_rate(["a"], n=0)


def test_repetition_rule_reads_the_step_texts() -> None:
    fresh = ["your order ships today and arrives on friday", "please reset the router then call us back"]
    loop = ["sorry sorry sorry sorry sorry sorry sorry sorry", "we we we we we we we we we"]
    texts = [fresh] * 8 + [loop] * 6
    mon = monitor({"rule": "repetition", "cooldown": 100})
    # window 3: the mean of the last 3 steps exceeds 0.5 once two of them are loops (step 10)
    assert steps_of(run(mon, [{}] * len(texts), texts)) == [10]
    assert mon.fired[0].metric == "response/repetition"
    assert run(monitor({"rule": "repetition"}), [{}] * 20, [fresh] * 20) == []


def test_repetition_rule_prefers_a_logged_metric() -> None:
    stream = [{"response/repetition": v} for v in [0.1] * 6 + [0.9] * 3]
    assert steps_of(run(monitor({"rule": "repetition", "warmup": 0}), stream)) == [8]


def test_ensemble_disagreement_rising_trend() -> None:
    flat = noise(40, 0.2, 0.02, seed=6)
    assert run(monitor({"rule": "ensemble_disagreement"}), [{"reward/ensemble_std": v} for v in flat]) == []
    rising = flat[:20] + [0.2 + 0.02 * i + v for i, v in enumerate(noise(30, 0.0, 0.02, seed=7))]
    mon = monitor({"rule": "ensemble_disagreement", "cooldown": 100})
    fired = run(mon, [{"reward/ensemble_std": v} for v in rising])
    assert len(fired) == 1 and 25 < fired[0][0] <= 50


def _heldout_stream(gold_after_peak: float, n: int = 20, every: int = 5) -> list[dict[str, float]]:
    """PPO-like: train reward every step, proxy and gold on held-out prompts every `every` steps; the proxy
    keeps rising, the gold rises to step 50 then moves by `gold_after_peak` per held-out point."""
    rng = random.Random(8)
    stream: list[dict[str, float]] = []
    for step in range(1, n * every + 1):
        m = {"reward/raw_mean": 0.01 * step}
        if step % every == 0:
            k = step // every
            m["monitor/proxy_reward"] = 0.05 * k + rng.gauss(0, 0.01)
            gold = 0.4 + 0.02 * min(k, 10) + gold_after_peak * max(0, k - 10)
            m["heldout/gold"] = gold + rng.gauss(0, 0.005)
        stream.append(m)
    return stream


def test_proxy_heldout_divergence_fires_when_gold_falls_while_proxy_rises() -> None:
    mon = monitor({"rule": "proxy_heldout_divergence", "cooldown": 1000})
    fired = run(mon, _heldout_stream(gold_after_peak=-0.03))
    # peak at step 50; 6 held-out points of which the later ones fall: detected within 5 points of the peak
    assert len(fired) == 1 and 50 < fired[0][0] <= 75 and fired[0][0] % 5 == 0
    assert "monitor/proxy_reward" in mon.fired[0].message
    assert run(monitor({"rule": "proxy_heldout_divergence"}), _heldout_stream(gold_after_peak=0.02)) == []


def test_proxy_heldout_divergence_metric_names_are_options() -> None:
    stream = [
        {"reward/raw_mean": 0.1 * s, "heldout/judge_reward": 1.0 - 0.1 * s + (0.01 if s % 2 else -0.01)}
        for s in range(1, 9)
    ]
    rule = {"rule": "proxy_heldout_divergence", "metric": "heldout/judge_reward"}
    rule["reference_metric"] = "reward/raw_mean"
    assert steps_of(run(monitor(rule), stream)) == [6]  # the first full window of 6
    assert run(monitor({"rule": "proxy_heldout_divergence"}), stream) == []  # default names: absent


def test_value_loss_explosion() -> None:
    vl = noise(40, 0.15, 0.03, seed=9)
    assert run(monitor({"rule": "value_loss_explosion"}), [{"value/loss": v} for v in vl]) == []
    vl[34] = 5.0  # step 35, > 10 x the rolling median ~0.15
    assert steps_of(run(monitor({"rule": "value_loss_explosion"}), [{"value/loss": v} for v in vl])) == [35]


def test_nonfinite_is_critical_and_requests_a_stop() -> None:
    mon = AlertMonitor(AlertsSection(), default_rules("sft"))
    assert run(mon, [{"loss": 1.0}, {"loss": 0.9, "lr": 1e-4}]) == [] and not mon.stop_requested
    alerts = mon.observe(3, {"loss": math.nan, "grad_norm": math.inf, "lr": 1e-4})
    assert [a.rule for a in alerts] == ["nonfinite"] and alerts[0].severity == "critical"
    assert alerts[0].metric == "loss" and "grad_norm=inf" in alerts[0].message
    assert mon.stop_requested and mon.stop_alert is alerts[0]


def test_rules_ignore_steps_without_their_metric_and_nonfinite_values() -> None:
    mon = monitor({"rule": "kl_spike", "window": 3, "warmup": 0, "cooldown": 0})
    stream = [
        {"kl/seq_sum_mean": 1.0},
        {"loss": 2.0},
        {"kl/seq_sum_mean": math.nan},
        {"kl/seq_sum_mean": 1.0},
    ]
    assert run(mon, stream) == []
    assert mon.state_dict()["rules"]["kl_spike:kl/seq_sum_mean:None#0"]["values"] == [1.0, 1.0]


# --------------------------------------------------------------------------- warm-up, cool-down, severity


def test_warmup_and_cooldown() -> None:
    stream = [{"kl/seq_sum_mean": 50.0}] * 30
    fired = run(monitor({"rule": "kl_ceiling", "warmup": 5, "cooldown": 10}), stream)
    # first firing at warmup + 1, then silent for 10 steps after each firing
    assert steps_of(fired) == [6, 17, 28]
    assert steps_of(run(monitor({"rule": "kl_ceiling", "cooldown": 0}), stream[:3])) == [1, 2, 3]


def test_severity_and_user_rules_take_the_rule_defaults_for_unset_options() -> None:
    mon = monitor({"rule": "reward_plateau"}, {"rule": "kl_ceiling", "severity": "critical", "threshold": 1})
    plateau, ceiling = mon.rules
    assert plateau.severity == "info" and plateau.window == RULE_DEFAULTS["reward_plateau"]["window"]
    assert ceiling.severity == "critical" and ceiling.threshold == 1.0
    assert mon.observe(1, {"kl/seq_sum_mean": 2.0})[0].severity == "critical"


def test_default_rules() -> None:
    ppo = default_rules("ppo")
    assert {r.rule for r in ppo} == set(RULE_DEFAULTS) and len(ppo) == len(RULE_DEFAULTS)
    assert [r.rule for r in default_rules("sft")] == ["nonfinite"] == [r.rule for r in default_rules("dpo")]
    assert {r.metric for r in ppo} >= {"kl/seq_sum_mean", "policy/entropy", "value/loss", "response/len_mean"}
    # only nonfinite stops on its own; the others report
    assert [r.rule for r in ppo if "stop" in r.actions] == ["nonfinite"]


def test_quickstart_like_ppo_stream_raises_nothing_of_warning_or_above() -> None:
    """A healthy 60-step PPO run shaped like the quickstart's logged metrics (KL 0 -> 3 nats, entropy
    0.7 -> 0.45, length ~26, value loss 0.05-0.3, proxy and gold both rising)."""
    rng = random.Random(10)
    mon = AlertMonitor(AlertsSection(), default_rules("ppo"))
    for step in range(1, 61):
        m = {
            "kl/seq_sum_mean": max(0.0, 3.0 * (1 - math.exp(-step / 15)) + rng.gauss(0, 0.4)),
            "reward/raw_mean": -0.2 + 0.005 * step + rng.gauss(0, 0.05),
            "policy/entropy": 0.45 + 0.25 * math.exp(-step / 20) + rng.gauss(0, 0.05),
            "response/len_mean": 26 + rng.gauss(0, 2.5),
            "value/loss": abs(0.15 + rng.gauss(0, 0.07)) + 0.02,
        }
        if step % 5 == 0:
            m["monitor/proxy_reward"] = -0.15 + 0.004 * step + rng.gauss(0, 0.01)
            m["heldout/gold"] = 0.43 + 0.001 * step + rng.gauss(0, 0.01)
        mon.observe(step, m, ["the order ships friday and we will email you the tracking number"] * 4)
    assert [a for a in mon.fired if a.severity != "info"] == []


# --------------------------------------------------------------------------- actions


def test_log_action_prints_to_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    mon = monitor({"rule": "kl_ceiling", "actions": ["log"]})
    mon.observe(7, {"kl/seq_sum_mean": 25.0})
    err = capsys.readouterr().err
    assert "kl_ceiling" in err and "step 7" in err and "25" in err
    mon2 = monitor({"rule": "kl_ceiling", "actions": []})
    mon2.observe(7, {"kl/seq_sum_mean": 25.0})
    assert capsys.readouterr().err == "" and len(mon2.fired) == 1


def test_store_action_rows_read_back(store) -> None:
    run_id = store.start_run("ppo", config={})
    other = store.start_run("ppo", config={})
    mon = AlertMonitor(
        AlertsSection(rules=[AlertRule(rule="kl_ceiling", cooldown=0), AlertRule(rule="nonfinite")]),
        store=store,
        run_id=run_id,
    )
    mon.observe(3, {"kl/seq_sum_mean": 21.0})
    mon.observe(4, {"kl/seq_sum_mean": math.inf, "loss": 1.0})
    rows = store.alerts(run_id)
    assert [(r.step, r.rule, r.severity) for r in rows] == [
        (3, "kl_ceiling", "warning"),
        (4, "nonfinite", "critical"),
    ]
    assert rows[0].value == 21.0 and rows[0].threshold == 20.0 and rows[0].metric == "kl/seq_sum_mean"
    assert rows[1].value is None and rows[1].threshold is None  # NaN/Inf are stored as NULL
    assert rows[1].actions == ("log", "store", "stop") and "kl/seq_sum_mean=inf" in rows[1].message
    assert json.loads(json.dumps(rows[0].as_dict()))["run_id"] == run_id
    assert store.alerts(other) == [] and len(store.alerts()) == 2
    assert [r.rule for r in store.alerts(min_severity="critical")] == ["nonfinite"]


def test_store_rejects_unknown_runs_and_severities(store) -> None:
    from alignflow.errors import StoreError

    with pytest.raises(StoreError, match="no run"):
        store.add_alert("missing", 1, "kl_ceiling", "warning", "kl", 1.0, 0.5, "m")
    rid = store.start_run("ppo", config={})
    with pytest.raises(StoreError, match="severity"):
        store.add_alert(rid, 1, "kl_ceiling", "loud", "kl", 1.0, 0.5, "m")


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"body": json.loads(body), "type": self.headers["Content-Type"]})
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, type[_Hook]]]:
    handler = type("Hook", (_Hook,), {"received": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", handler
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_posts_the_alert_as_json(hook) -> None:
    url, handler = hook
    mon = AlertMonitor(
        AlertsSection(rules=[AlertRule(rule="kl_ceiling", actions=["webhook"])], webhook_url=url), run_id="r1"
    )
    mon.observe(12, {"kl/seq_sum_mean": 33.5})
    assert len(handler.received) == 1
    got = handler.received[0]
    assert got["type"] == "application/json"
    body = got["body"]
    assert {k: body[k] for k in ("run_id", "step", "rule", "severity", "value", "threshold")} == {
        "run_id": "r1",
        "step": 12,
        "rule": "kl_ceiling",
        "severity": "warning",
        "value": 33.5,
        "threshold": 20.0,
    }
    assert "33.5" in body["message"] and body["metric"] == "kl/seq_sum_mean"


def test_webhook_gets_nonfinite_values_as_null_and_default_rules_post_when_a_url_is_set(hook) -> None:
    url, handler = hook
    mon = AlertMonitor(AlertsSection(webhook_url=url), default_rules("sft"), run_id="r2")
    mon.observe(1, {"loss": math.nan})
    assert handler.received[0]["body"]["value"] is None and handler.received[0]["body"]["rule"] == "nonfinite"


def test_failing_webhook_never_raises_and_is_logged(hook, capsys: pytest.CaptureFixture[str]) -> None:
    url, handler = hook
    handler.status = 500
    rule = AlertRule(rule="kl_ceiling", cooldown=0, actions=["webhook", "stop"])
    mon = AlertMonitor(AlertsSection(rules=[rule], webhook_url=url))
    mon.observe(1, {"kl/seq_sum_mean": 40.0})
    assert "HTTP 500" in capsys.readouterr().err
    # nothing listens on a closed port; the secret-looking path must not be printed
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = AlertMonitor(
        AlertsSection(rules=[rule], webhook_url=f"http://127.0.0.1:{port}/T000/SECRET"), webhook_timeout=2.0
    )
    alerts = dead.observe(2, {"kl/seq_sum_mean": 40.0})
    err = capsys.readouterr().err
    assert len(alerts) == 1 and "failed" in err and "SECRET" not in err
    assert dead.stop_requested  # the other actions still ran


def test_webhook_action_without_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\].*webhook_url"):
        monitor({"rule": "kl_ceiling", "actions": ["webhook"]})


def test_disabled_section_has_no_rules() -> None:
    mon = AlertMonitor(AlertsSection(enabled=False), default_rules("ppo"))
    assert mon.observe(1, {"loss": math.nan, "kl/seq_sum_mean": 1e9}) == [] and not mon.stop_requested


def test_stop_action_on_any_rule() -> None:
    mon = monitor({"rule": "kl_ceiling", "actions": ["log", "stop"], "severity": "critical"})
    assert not mon.stop_requested
    mon.observe(1, {"kl/seq_sum_mean": 10.0})
    assert not mon.stop_requested
    mon.observe(2, {"kl/seq_sum_mean": 30.0})
    assert mon.stop_requested and mon.stop_alert.step == 2  # type: ignore[union-attr]


# --------------------------------------------------------------------------- config and resume


@register_stage("_alerts_test")
class _AlertsStage(StageConfig):
    """Every stage's `monitor:` section is the shared one (PPO's subclasses it)."""


def test_rules_from_a_recipe_config(tmp_path) -> None:
    cfg_file = tmp_path / "stage.yaml"
    cfg_file.write_text(
        "stage: _alerts_test\n"
        "monitor:\n  alerts:\n    rules:\n"
        "      - {rule: proxy_heldout_divergence, metric: heldout/rm_accuracy, reference_metric: reward/raw_mean}\n"
        "      - {rule: kl_ceiling, threshold: 8, severity: critical, actions: [log, stop]}\n"
    )
    cfg = load_config(cfg_file)
    mon = AlertMonitor(cfg.monitor.alerts, default_rules(cfg.stage))
    div, ceiling = mon.rules
    assert (div.metric, div.reference_metric, div.window) == ("heldout/rm_accuracy", "reward/raw_mean", 6)
    assert (ceiling.threshold, ceiling.severity, ceiling.actions) == (8.0, "critical", ("log", "stop"))
    mon.observe(1, {"kl/seq_sum_mean": 9.0})
    assert mon.stop_requested
    cfg_file.write_text("stage: _alerts_test\nmonitor:\n  alerts:\n    rules:\n      - {rule: kl_boom}\n")
    with pytest.raises(ConfigError, match=r"monitor\.alerts\.rules\.0\.rule|rules"):
        load_config(cfg_file)


def _mixed_stream(n: int) -> list[dict[str, float]]:
    rng = random.Random(11)
    out = []
    for step in range(1, n + 1):
        m = {
            "kl/seq_sum_mean": 2.0 + rng.gauss(0, 0.2) + (9.0 if step in (33, 47) else 0.0),
            "reward/raw_mean": min(step, 30) * 0.01 + rng.gauss(0, 0.02),
            "policy/entropy": 0.6 if step < 30 else 0.05,
            "response/len_mean": 20.0 if step < 35 else 45.0,
            "value/loss": 0.1 + rng.gauss(0, 0.01) + (4.0 if step == 41 else 0.0),
            "reward/ensemble_std": 0.1 + (0.01 * (step - 30) if step > 30 else 0.0) + rng.gauss(0, 0.002),
        }
        if step % 3 == 0:
            m["monitor/proxy_reward"] = 0.02 * step + rng.gauss(0, 0.01)
            m["heldout/gold"] = 0.5 + 0.01 * min(step, 30) - 0.02 * max(0, step - 30) + rng.gauss(0, 0.005)
        out.append(m)
    return out


def test_state_dict_round_trip_resumes_exactly() -> None:
    stream = _mixed_stream(70)
    texts = [["a b c d e f"] if s < 50 else ["go go go go go go"] for s in range(70)]
    straight = AlertMonitor(AlertsSection(), default_rules("ppo"))
    expected = run(straight, stream, texts)
    assert {r for _, r in expected} >= {
        "kl_spike",
        "entropy_collapse",
        "length_inflation",
        "value_loss_explosion",
    }

    first = AlertMonitor(AlertsSection(), default_rules("ppo"))
    part1 = run(first, stream[:40], texts[:40])
    saved = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds must survive JSON
    resumed = AlertMonitor(AlertsSection(), default_rules("ppo"))
    resumed.load_state_dict(saved)
    part2 = []
    for i in range(40, 70):
        part2 += [(i + 1, a.rule) for a in resumed.observe(i + 1, stream[i], texts[i])]
    assert part1 + part2 == expected
    assert [a.message for a in resumed.fired] == [a.message for a in straight.fired[len(part1) :]]


def test_state_dict_keeps_cooldowns_and_rejects_foreign_state() -> None:
    mon = monitor({"rule": "kl_ceiling", "cooldown": 10})
    mon.observe(5, {"kl/seq_sum_mean": 30.0})
    fresh = monitor({"rule": "kl_ceiling", "cooldown": 10})
    fresh.load_state_dict(mon.state_dict())
    assert fresh.observe(10, {"kl/seq_sum_mean": 30.0}) == []  # still cooling down
    assert len(fresh.observe(16, {"kl/seq_sum_mean": 30.0})) == 1
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict({"version": 99, "rules": {}})


# --------------------------------------------------------------------------- the store's table and migration


def test_migration_0007_matches_the_model_and_downgrades(db_url) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    from alignflow.store import db
    from alignflow.store.models import Base

    eng = db.make_engine(db_url)
    db.ensure_schema(eng)
    assert db.current_revision(eng) == db.head_revision()
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert [d for d in diff if "alerts" in str(d)] == []
    assert {ix["name"] for ix in inspect(eng).get_indexes("alerts")} == {
        "ix_alerts_run_step",
        "ix_alerts_severity",
    }
    cfg = db.alembic_config(str(eng.url.render_as_string(hide_password=False)))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    assert "alerts" not in inspect(eng).get_table_names()
    db.upgrade(eng)
    assert "alerts" in inspect(eng).get_table_names()
    eng.dispose()


def test_alert_rows_go_with_their_run(store) -> None:
    from sqlalchemy import delete

    from alignflow.store.models import Run

    rid = store.start_run("ppo", config={})
    store.add_alert(rid, 5, "kl_ceiling", "warning", "kl/seq_sum_mean", 30.0, 20.0, "m", ["store"])
    with store.session() as s:
        s.execute(delete(Run).where(Run.id == rid))
    assert store.alerts() == []
