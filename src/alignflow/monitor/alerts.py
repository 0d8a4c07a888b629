"""Live alert rules evaluated on every logged step, and their actions (log, store, webhook, stop).

The recipes' run helper builds one `AlertMonitor` per run and calls `observe(step, metrics, texts)` after it
has stored the step's metrics. Every rule keeps its own rolling state (saved with the checkpoint through
`state_dict`, so a resumed run continues its windows and cool-downs exactly) and, when its condition holds,
fires an `Alert` whose actions are carried out at once.

Common options of a rule (`monitor.alerts.rules[*]` in a recipe's config; a rule given without an option
takes the rule's own default from `RULE_DEFAULTS`):

- `metric`: the metric it reads. A step that does not carry it leaves the rule untouched, so metrics logged
  only every K steps (`monitor/...`, `heldout/...`) work: a rule's `window` counts observations of its
  metric, not training steps.
- `warmup`: the rule may fire from step `warmup + 1` on (warmup 0: from the first step); its windows and
  baselines fill during the warm-up.
- `cooldown`: after a firing at step s the rule is silent up to step s + cooldown.
- `severity`, `actions`.

The rules (`threshold` means, per rule):

| rule | fires when | threshold |
|---|---|---|
| kl_spike | value > median + z·max(1.4826·MAD, 0.25·median) of the previous `window` values (a robust z-score) | z |
| kl_ceiling | value > threshold | the ceiling |
| reward_plateau | mean of the last `window` values − mean of the `window` before < threshold · SE of that difference | t |
| entropy_collapse | mean of the last `window` values < threshold · mean of the first `window` (the early baseline) | ratio |
| length_inflation | mean of the last `window` values > threshold · mean of the first `window` | ratio |
| repetition | mean over the last `window` steps of the share of repeated word 3-grams > threshold | share |
| ensemble_disagreement | least-squares trend of the ensemble std over `window` values rises (t ≥ 3) by ≥ threshold × its level | relative rise |
| proxy_heldout_divergence | over `window` held-out observations the proxy (`reference_metric`) rises and the held-out `metric` falls, both with t ≥ threshold and a fitted change ≥ one residual std | t |
| value_loss_explosion | value > threshold × median of the previous `window` values | factor |
| nonfinite | any metric of the step (or `metric` only, if set) is NaN or ±Inf | — |

`Alert.threshold` is the level the value was compared with: the rule's threshold for the absolute rules, the
computed limit for the relative ones (e.g. the robust KL limit), NaN for `nonfinite`.

`nonfinite` reads the step's metrics as the recipe produced them, so the caller must pass them before
dropping NaN/Inf for storage. Its default stops the run (see `RULE_DEFAULTS`): once a NaN has reached the
loss, the next optimizer step writes NaN into the weights and every later step is wasted compute, so the
earliest clean stop is the cheapest; the stop checkpoint may already be poisoned, which is why the run keeps
its best checkpoint to roll back to.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from alignflow.config import AlertRule, AlertsSection
from alignflow.errors import ConfigError

log = logging.getLogger(__name__)

SEVERITIES = ("info", "warning", "critical")
REPETITION_N = 3
# The robust scale is floored at this fraction of the median. A batch's KL is heavy-tailed (one long,
# diverging response moves the mean) while the MAD of a settled window is small: on a normal quickstart PPO
# run (30 steps, batch 16) the KL of step 29 was 1.99x the window median but 6.1 MADs above it. With the floor,
# z = 6 means at least 2.5x the median: a spike, not batch noise. It also keeps a constant baseline (MAD 0)
# from calling every wobble a spike.
KL_SCALE_FLOOR = 0.25
# ensemble_disagreement: how significant the rising trend must be (t of the least-squares slope).
TREND_MIN_T = 3.0
STATE_VERSION = 1

# Each rule's defaults. The PPO family (`default_rules("ppo")`) uses all of them; the metric names are the
# ones `recipes/ppo.py` logs (docs/metrics.md), `reward/ensemble_std` and `heldout/gold` the held-out and
# ensemble signals of the monitoring section.
RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "kl_spike": {
        "metric": "kl/seq_sum_mean",
        "threshold": 6.0,
        "window": 20,
        "warmup": 10,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "kl_ceiling": {
        "metric": "kl/seq_sum_mean",
        "threshold": 20.0,  # nats per sequence; the quickstart's PPO stays under 4
        "window": None,
        "warmup": 0,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "reward_plateau": {
        "metric": "reward/raw_mean",
        "threshold": 1.0,
        "window": 20,
        "warmup": 0,
        "cooldown": 40,
        # A plateau is often just convergence: worth a note, not a page.
        "severity": "info",
        "actions": ["log", "store"],
    },
    "entropy_collapse": {
        "metric": "policy/entropy",
        "threshold": 0.2,
        "window": 10,
        "warmup": 0,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "length_inflation": {
        "metric": "response/len_mean",
        "threshold": 1.5,  # the post-hoc detector's length_ratio (evaluate/hacking.py)
        "window": 10,
        "warmup": 0,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "repetition": {
        "metric": "response/repetition",
        "threshold": 0.5,
        "window": 3,
        "warmup": 5,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "ensemble_disagreement": {
        "metric": "reward/ensemble_std",
        "threshold": 0.5,
        "window": 20,
        "warmup": 10,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "proxy_heldout_divergence": {
        "metric": "heldout/gold",
        "reference_metric": "monitor/proxy_reward",
        "threshold": 2.0,
        "window": 6,
        "warmup": 0,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "value_loss_explosion": {
        "metric": "value/loss",
        "threshold": 10.0,
        "window": 20,
        "warmup": 10,
        "cooldown": 20,
        "severity": "warning",
        "actions": ["log", "store"],
    },
    "nonfinite": {
        "metric": None,  # every metric of the step
        "threshold": None,
        "window": None,
        "warmup": 0,
        "cooldown": 0,
        "severity": "critical",
        "actions": ["log", "store", "stop"],
    },
}
PPO_STAGES = ("ppo", "grpo", "rloo")
_OPTIONS = ("metric", "reference_metric", "threshold", "window", "warmup", "cooldown", "severity", "actions")


@dataclass(frozen=True)
class Alert:
    rule: str
    severity: str
    step: int
    metric: str
    value: float
    threshold: float
    message: str
    actions: tuple[str, ...]


def default_rules(stage: str) -> list[AlertRule]:
    """The rules a stage gets when `monitor.alerts.rules` is unset: all of them for the PPO family
    (`ppo`, and its `grpo`/`rloo` estimators), only `nonfinite` for the others."""
    names = list(RULE_DEFAULTS) if stage in PPO_STAGES else ["nonfinite"]
    return [AlertRule(rule=n, **RULE_DEFAULTS[n]) for n in names]  # type: ignore[arg-type]


def repetition_rate(texts: Sequence[str], n: int = REPETITION_N) -> float:
    """Share of the word n-grams of `texts` that repeat an n-gram earlier in the same text.

    Pooled over the texts: sum(n-grams − distinct n-grams) / sum(n-grams). Counting within a text catches the
    degenerate loops ("thank you thank you thank you") a policy falls into; different responses sharing a
    phrase are not repetition. Texts shorter than n words contribute nothing; no n-gram at all gives 0.0.
    """
    if n < 1:
        raise ValueError(f"repetition_rate: n must be a positive integer, got {n!r}")
    total = repeated = 0
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        repeated += len(grams) - len(set(grams))
    return repeated / total if total else 0.0


# --------------------------------------------------------------------------- arithmetic


def _median_mad(xs: Sequence[float]) -> tuple[float, float]:
    med = statistics.median(xs)
    return med, statistics.median(abs(x - med) for x in xs)


@dataclass(frozen=True)
class _Trend:
    slope: float
    change: float  # slope * (last step - first step)
    start: float  # fitted value at the first step
    t: float  # slope / SE(slope); +-inf for a noiseless non-flat line
    resid_std: float


def _trend(steps: Sequence[float], ys: Sequence[float]) -> _Trend:
    """Ordinary least squares y = a + b·step, as `evaluate/hacking.py`'s `fit_trend` (that layer is above
    this one, so the few lines are repeated rather than imported): SE(b) = s / sqrt(Sxx), s² = RSS / (m − 2)."""
    m = len(ys)
    mx, my = sum(steps) / m, sum(ys) / m
    sxx = sum((x - mx) ** 2 for x in steps)
    slope = sum((x - mx) * (y - my) for x, y in zip(steps, ys, strict=True)) / sxx
    rss = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(steps, ys, strict=True))
    resid_std = math.sqrt(rss / (m - 2)) if m > 2 else 0.0
    se = resid_std / math.sqrt(sxx)
    if se > 0:
        t = slope / se
    else:
        t = 0.0 if slope == 0 else math.copysign(math.inf, slope)
    return _Trend(slope, slope * (steps[-1] - steps[0]), my - slope * (mx - steps[0]), t, resid_std)


def _significant(tr: _Trend, min_t: float) -> int:
    """+1 rising, -1 falling, 0 neither: |t| >= min_t and a fitted change of at least one residual std
    (`evaluate/hacking.py`'s test with min_effect = 1: a long, tiny drift is not a trend)."""
    big_enough = abs(tr.change) >= tr.resid_std
    if tr.t >= min_t and big_enough:
        return 1
    if tr.t <= -min_t and big_enough:
        return -1
    return 0


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class _Finding:
    value: float
    limit: float
    message: str
    metric: str | None = None  # when not the rule's own (nonfinite)


# --------------------------------------------------------------------------- rules


class _Rule:
    """One configured rule with every option filled in, and its rolling state."""

    def __init__(self, spec: AlertRule) -> None:
        given = {k: getattr(spec, k) for k in _OPTIONS if k in spec.model_fields_set}
        opts = {**RULE_DEFAULTS[spec.rule], **given}
        self.name: str = spec.rule
        self.metric: str | None = opts.get("metric")
        self.reference_metric: str | None = opts.get("reference_metric")
        self.threshold: float | None = opts.get("threshold")
        self.window: int | None = opts.get("window")
        self.warmup: int = int(opts["warmup"])
        self.cooldown: int = int(opts["cooldown"])
        self.severity: str = opts["severity"]
        self.actions: tuple[str, ...] = tuple(dict.fromkeys(opts["actions"]))
        self.last_fired: int | None = None
        self.values: deque[float] = deque()
        self.steps: deque[float] = deque()
        self.baseline: list[float] = []  # the first `window` values (early-baseline rules)
        self.seen = 0  # observations of the metric so far
        self.last_reference: float | None = None

    @property
    def key(self) -> str:
        return f"{self.name}:{self.metric}:{self.reference_metric}"

    def allowed(self, step: int) -> bool:
        if self.warmup and step <= self.warmup:
            return False
        return self.last_fired is None or step - self.last_fired > self.cooldown

    def state(self) -> dict[str, Any]:
        return {
            "last_fired": self.last_fired,
            "values": list(self.values),
            "steps": list(self.steps),
            "baseline": list(self.baseline),
            "seen": self.seen,
            "last_reference": self.last_reference,
        }

    def load(self, d: Mapping[str, Any]) -> None:
        self.last_fired = d["last_fired"]
        self.values = deque(float(v) for v in d["values"])
        self.steps = deque(float(v) for v in d["steps"])
        self.baseline = [float(v) for v in d["baseline"]]
        self.seen = int(d["seen"])
        self.last_reference = d["last_reference"]

    def _push(self, x: float, keep: int, step: float | None = None) -> None:
        self.values.append(x)
        if step is not None:
            self.steps.append(step)
        while len(self.values) > keep:
            self.values.popleft()
            if self.steps:
                self.steps.popleft()

    def check(self, step: int, metrics: Mapping[str, Any], texts: Sequence[str] | None) -> _Finding | None:
        """Update the state with this step; the finding if the condition holds now (before warm-up/cool-down)."""
        if self.name == "nonfinite":
            return self._nonfinite(metrics)
        if self.name == "repetition":
            if self.metric in metrics:
                x = _finite(metrics[self.metric])
            elif texts is not None:
                x = repetition_rate(texts)
            else:
                return None
        else:
            if self.name == "proxy_heldout_divergence" and self.reference_metric in metrics:
                ref = _finite(metrics[self.reference_metric])
                if ref is not None:
                    self.last_reference = ref
            if self.metric not in metrics:
                return None
            x = _finite(metrics[self.metric])
        if x is None:  # NaN/Inf are the nonfinite rule's business; they would poison the windows
            return None
        self.seen += 1
        return getattr(self, f"_{self.name}")(step, x)

    # -- one method per rule: x is this step's finite value of the rule's metric

    def _kl_spike(self, step: int, x: float) -> _Finding | None:
        w, z = int(self.window or 1), float(self.threshold or 0.0)
        found = None
        if len(self.values) >= w:
            med, mad = _median_mad(self.values)
            scale = max(1.4826 * mad, KL_SCALE_FLOOR * abs(med), 1e-12)
            limit = med + z * scale
            if x > limit:
                found = _Finding(
                    x,
                    limit,
                    f"{self.metric} = {x:.4g} spiked above its rolling baseline (median {med:.4g} + "
                    f"{z:g}·{scale:.3g} robust std over the previous {w} values = {limit:.4g})",
                )
        self._push(x, w)
        return found

    def _kl_ceiling(self, step: int, x: float) -> _Finding | None:
        limit = float(self.threshold or 0.0)
        if x > limit:
            return _Finding(x, limit, f"{self.metric} = {x:.4g} is above the ceiling {limit:g}")
        return None

    def _reward_plateau(self, step: int, x: float) -> _Finding | None:
        w, t = int(self.window or 1), float(self.threshold or 0.0)
        self._push(x, 2 * w)
        if len(self.values) < 2 * w:
            return None
        vals = list(self.values)
        before, last = vals[:w], vals[w:]
        gain = statistics.fmean(last) - statistics.fmean(before)
        var = (statistics.variance(before) + statistics.variance(last)) / w if w > 1 else 0.0
        limit = t * math.sqrt(var)
        if gain <= limit:
            return _Finding(
                gain,
                limit,
                f"{self.metric} plateaued: its mean over the last {w} values rose by {gain:+.4g} over the {w} "
                f"before ({t:g} standard errors = {limit:.4g} needed)",
            )
        return None

    def _early_ratio(self, x: float, below: bool, what: str) -> _Finding | None:
        w, ratio = int(self.window or 1), float(self.threshold or 0.0)
        if len(self.baseline) < w:
            self.baseline.append(x)
        self._push(x, w)
        if self.seen < 2 * w:  # the recent window must not overlap the baseline
            return None
        base = statistics.fmean(self.baseline)
        now = statistics.fmean(self.values)
        limit = ratio * base
        if (now < limit) if below else (base > 0 and now > limit):
            return _Finding(
                now,
                limit,
                f"{what}: {self.metric} averaged {now:.4g} over the last {w} values vs {base:.4g} over the "
                f"first {w} ({now / base if base else math.inf:.2f}x, threshold {ratio:g}x)",
            )
        return None

    def _entropy_collapse(self, step: int, x: float) -> _Finding | None:
        return self._early_ratio(x, below=True, what="entropy collapse")

    def _length_inflation(self, step: int, x: float) -> _Finding | None:
        return self._early_ratio(x, below=False, what="response length inflation")

    def _repetition(self, step: int, x: float) -> _Finding | None:
        w, limit = int(self.window or 1), float(self.threshold or 0.0)
        self._push(x, w)
        if len(self.values) < w:
            return None
        now = statistics.fmean(self.values)
        if now > limit:
            return _Finding(
                now,
                limit,
                f"repetition: {now:.1%} of the responses' word {REPETITION_N}-grams repeat within a response "
                f"(mean over the last {w} steps; threshold {limit:.0%})",
            )
        return None

    def _ensemble_disagreement(self, step: int, x: float) -> _Finding | None:
        w, rel = int(self.window or 3), float(self.threshold or 0.0)
        self._push(x, max(w, 3), float(step))
        if len(self.values) < max(w, 3) or self.steps[-1] <= self.steps[0]:
            return None
        tr = _trend(list(self.steps), list(self.values))
        level = abs(tr.start)
        rise = tr.change / level if level > 0 else math.inf
        if _significant(tr, TREND_MIN_T) > 0 and rise >= rel:
            return _Finding(
                tr.start + tr.change,
                tr.start * (1 + rel),
                f"reward-model ensemble disagreement rising: {self.metric} trended from {tr.start:.4g} to "
                f"{tr.start + tr.change:.4g} over the last {w} values (t={tr.t:.1f}, +{rise:.0%}, "
                f"threshold +{rel:.0%})",
            )
        return None

    def _proxy_heldout_divergence(self, step: int, x: float) -> _Finding | None:
        w, min_t = max(int(self.window or 4), 4), float(self.threshold or 0.0)
        if self.last_reference is None:  # no proxy value yet to pair this observation with
            return None
        # values holds pairs flattened (held-out, proxy) so one deque keeps them aligned with steps.
        self.values.append(x)
        self.values.append(self.last_reference)
        self.steps.append(float(step))
        while len(self.steps) > w:
            self.steps.popleft()
            self.values.popleft()
            self.values.popleft()
        if len(self.steps) < w or self.steps[-1] <= self.steps[0]:
            return None
        vals = list(self.values)
        held, proxy = vals[0::2], vals[1::2]
        th, tp = _trend(list(self.steps), held), _trend(list(self.steps), proxy)
        if _significant(tp, min_t) > 0 and _significant(th, min_t) < 0:
            return _Finding(
                x,
                min_t,
                f"proxy reward rising while the held-out signal falls: over steps {self.steps[0]:g}-"
                f"{self.steps[-1]:g} {self.reference_metric} changed {tp.change:+.4g} (t={tp.t:.1f}) and "
                f"{self.metric} {th.change:+.4g} (t={th.t:.1f}); |t| >= {min_t:g} needed",
            )
        return None

    def _value_loss_explosion(self, step: int, x: float) -> _Finding | None:
        w, factor = int(self.window or 1), float(self.threshold or 0.0)
        found = None
        if len(self.values) >= w:
            med = statistics.median(self.values)
            limit = factor * med
            if med > 0 and x > limit:
                found = _Finding(
                    x,
                    limit,
                    f"{self.metric} = {x:.4g} exploded: more than {factor:g}x its rolling median {med:.4g} "
                    f"over the previous {w} values",
                )
        self._push(x, w)
        return found

    def _nonfinite(self, metrics: Mapping[str, Any]) -> _Finding | None:
        names = [self.metric] if self.metric else list(metrics)
        bad: list[tuple[str, float]] = []
        for name in names:
            if name in metrics:
                try:
                    v = float(metrics[name])
                except (TypeError, ValueError):
                    continue  # a None or a label is not a number to judge
                if not math.isfinite(v):
                    bad.append((name, v))
        if not bad:
            return None
        listed = ", ".join(f"{n}={v}" for n, v in bad[:8]) + (
            f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        )
        return _Finding(bad[0][1], math.nan, f"non-finite metrics: {listed}", metric=bad[0][0])


# --------------------------------------------------------------------------- the monitor


class AlertMonitor:
    """Evaluates the configured rules on every logged step and performs their actions.

    Args:
        section: the stage's `monitor.alerts`.
        defaults: the rules used when `section.rules` is None (`default_rules(cfg.stage)`). With
            `section.webhook_url` set, default rules of severity warning and above also post to it.
        store, run_id: where the `store` action writes its rows; without them the action does nothing.
        webhook_timeout: seconds per webhook POST (connect and read); a slow receiver delays training by at
            most this much per alert.
    """

    def __init__(
        self,
        section: AlertsSection,
        defaults: Sequence[AlertRule] = (),
        *,
        store: Any = None,
        run_id: str | None = None,
        webhook_timeout: float = 5.0,
    ) -> None:
        self.section = section
        self.store = store
        self.run_id = run_id
        self.webhook_url = section.webhook_url
        self.webhook_timeout = webhook_timeout
        specs = list(defaults) if section.rules is None else list(section.rules)
        self.rules = [_Rule(s) for s in specs] if section.enabled else []
        if section.rules is None and self.webhook_url:
            for r in self.rules:
                if r.severity != "info" and "webhook" not in r.actions:
                    r.actions = (*r.actions, "webhook")
        for i, r in enumerate(self.rules):
            if "webhook" in r.actions and not self.webhook_url:
                raise ConfigError(
                    f"monitor.alerts.rules[{i}] ({r.name}): the webhook action needs monitor.alerts.webhook_url"
                )
            if r.name != "nonfinite" and not r.metric:
                raise ConfigError(f"monitor.alerts.rules[{i}] ({r.name}): metric must name a logged metric")
            if r.name == "proxy_heldout_divergence" and not r.reference_metric:
                raise ConfigError(
                    f"monitor.alerts.rules[{i}] (proxy_heldout_divergence): reference_metric must name the "
                    "proxy metric"
                )
            if r.name not in ("nonfinite", "kl_ceiling") and r.window is None:
                raise ConfigError(f"monitor.alerts.rules[{i}] ({r.name}): window must be a positive integer")
        self.fired: list[Alert] = []
        self._stop_alert: Alert | None = None

    @property
    def stop_requested(self) -> bool:
        """An alert with the `stop` action fired: the run should checkpoint and stop cleanly."""
        return self._stop_alert is not None

    @property
    def stop_alert(self) -> Alert | None:
        """The first alert that asked the run to stop."""
        return self._stop_alert

    def observe(
        self, step: int, metrics: Mapping[str, float], texts: Sequence[str] | None = None
    ) -> list[Alert]:
        """Evaluate every rule on step `step` (metrics as produced, NaN/Inf included; `texts`: this step's
        sampled responses, for `repetition`), perform the actions of those that fire, return them."""
        out: list[Alert] = []
        for r in self.rules:
            finding = r.check(step, metrics, texts)
            if finding is None or not r.allowed(step):
                continue
            r.last_fired = step
            alert = Alert(
                rule=r.name,
                severity=r.severity,
                step=int(step),
                metric=finding.metric or r.metric or "",
                value=float(finding.value),
                threshold=float(finding.limit),
                message=f"step {step}: {finding.message}",
                actions=r.actions,
            )
            out.append(alert)
            self._act(alert)
        self.fired.extend(out)
        return out

    # -- actions

    def _act(self, alert: Alert) -> None:
        if "log" in alert.actions:
            _say(alert.severity, f"alert {alert.rule} ({alert.severity}) {alert.message}")
        if "store" in alert.actions and self.store is not None and self.run_id is not None:
            self.store.add_alert(
                self.run_id,
                alert.step,
                alert.rule,
                alert.severity,
                alert.metric,
                alert.value,
                alert.threshold,
                alert.message,
                alert.actions,
            )
        if "webhook" in alert.actions and self.webhook_url:
            self._post(alert)
        if "stop" in alert.actions and self._stop_alert is None:
            self._stop_alert = alert

    def payload(self, alert: Alert) -> dict[str, Any]:
        """The webhook's JSON body. NaN/Inf become null (JSON has no such numbers); `text` makes the body
        readable as-is by chat webhooks (Slack, Mattermost) that show that field."""
        return {
            "run_id": self.run_id,
            "step": alert.step,
            "rule": alert.rule,
            "severity": alert.severity,
            "metric": alert.metric,
            "value": _finite(alert.value),
            "threshold": _finite(alert.threshold),
            "message": alert.message,
            "actions": list(alert.actions),
            "text": f"[alignflow {alert.severity}] run {self.run_id}: {alert.rule} {alert.message}",
        }

    def _post(self, alert: Alert) -> None:
        import httpx

        try:
            resp = httpx.post(
                self.webhook_url,  # type: ignore[arg-type]
                json=self.payload(alert),
                timeout=self.webhook_timeout,
                headers={"User-Agent": "alignflow-alerts"},
            )
            if resp.status_code >= 400:
                _say("warning", f"alert webhook: {self._where()} answered HTTP {resp.status_code}")
        # Any failure (refused, timeout, bad URL, TLS) is reported and swallowed: monitoring must never be
        # the reason a training run dies.
        except Exception as exc:  # noqa: BLE001
            _say("warning", f"alert webhook: POST to {self._where()} failed: {type(exc).__name__}: {exc}")

    def _where(self) -> str:
        # The URL may carry a token (Slack hooks do): name only its scheme and host.
        from urllib.parse import urlsplit

        try:
            u = urlsplit(self.webhook_url or "")
            return f"{u.scheme}://{u.hostname}" if u.hostname else "the webhook URL"
        except ValueError:
            return "the webhook URL"

    # -- resume

    def state_dict(self) -> dict[str, Any]:
        """Rolling windows, baselines and cool-downs of every rule (plain JSON-able values)."""
        keys = self._keys()
        return {
            "version": STATE_VERSION,
            "rules": {k: r.state() for k, r in zip(keys, self.rules, strict=True)},
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. Rules matched by name and metrics; a rule absent from the saved state (the
        config gained it on resume) starts fresh. The stop request is not restored: resuming is the answer."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"alert monitor state version {d.get('version')!r}, expected {STATE_VERSION}")
        saved = d.get("rules", {})
        for k, r in zip(self._keys(), self.rules, strict=True):
            if k in saved:
                r.load(saved[k])

    def _keys(self) -> list[str]:
        seen: dict[str, int] = {}
        keys = []
        for r in self.rules:
            n = seen.get(r.key, 0)
            seen[r.key] = n + 1
            keys.append(f"{r.key}#{n}")
        return keys


def _say(severity: str, message: str) -> None:
    """The project's console (stderr, as the recipes print), and the `logging` record when logging is set up
    (only then: Python's last-resort handler would print the same line a second time)."""
    from rich.console import Console
    from rich.markup import escape

    style = {"info": "cyan", "warning": "yellow", "critical": "bold red"}.get(severity, "yellow")
    Console(stderr=True, soft_wrap=True).print(f"[{style}]{escape(message)}[/]")
    if log.hasHandlers():
        log.log({"info": logging.INFO, "critical": logging.CRITICAL}.get(severity, logging.WARNING), message)
