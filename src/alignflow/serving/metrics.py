"""Prometheus metrics of one gateway app, on the app's own registry (not the process-global one), so a test
or a benchmark can build several apps in one process without duplicate-metric errors.

Labels: `model` (the deploy.yaml name), `version` (the label the engine reports), `arm` ("" when the request
named a model directly) and, on request counters, `endpoint` and `status`. Requests refused before routing
(401, 422, 429) have empty model/version/arm labels.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

# Seconds; tiny CPU models answer in tens of milliseconds, real ones in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROUTE_LABELS = ("model", "version", "arm")


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "alignflow_gateway_requests",
            "Requests to /v1 endpoints, by endpoint, route and HTTP status.",
            ("endpoint", *ROUTE_LABELS, "status"),
            registry=self.registry,
        )
        self.errors = Counter(
            "alignflow_gateway_errors",
            "Requests answered with an error (status >= 400, or an error event inside a stream).",
            ("endpoint", *ROUTE_LABELS, "status", "type"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "alignflow_gateway_latency_seconds",
            "Completion latency, request received to last token sent.",
            ("endpoint", *ROUTE_LABELS),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "alignflow_gateway_tokens",
            "Tokens processed, kind = prompt | completion.",
            (*ROUTE_LABELS, "kind"),
            registry=self.registry,
        )

    def completion(
        self,
        endpoint: str,
        model: str,
        version: str,
        arm: str | None,
        seconds: float,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        route = (model, version, arm or "")
        self.latency.labels(endpoint, *route).observe(seconds)
        self.tokens.labels(*route, "prompt").inc(prompt_tokens)
        self.tokens.labels(*route, "completion").inc(completion_tokens)

    def request(self, endpoint: str, route: tuple[str, str, str], status: int) -> None:
        self.requests.labels(endpoint, *route, str(status)).inc()

    def error(self, endpoint: str, route: tuple[str, str, str], status: int, kind: str) -> None:
        self.errors.labels(endpoint, *route, str(status), kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
