"""Prometheus metrics of the serving engine, named like vLLM's so the same dashboards fit."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    """One registry per server (tests start many), labelled with the served model name."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "dsf_time_to_first_token_seconds", "Arrival to first generated token.", labels, buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "dsf_inter_token_latency_seconds",
            "Time between two generated tokens.",
            labels,
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "dsf_e2e_request_latency_seconds", "Arrival to the last token.", labels, buckets=_LATENCY, registry=r
        )
        self.queue = Histogram(
            "dsf_request_queue_time_seconds", "Time a request waited for a slot.", labels, buckets=_LATENCY, registry=r
        )
        self.prompt_tokens = Counter("dsf_prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("dsf_generation_tokens", "Tokens generated.", labels, registry=r)
        self.finished = Counter(
            "dsf_request_success", "Finished requests by finish reason.", labels + ["finished_reason"], registry=r
        )
        self.running = Gauge("dsf_num_requests_running", "Requests decoding now.", labels, registry=r)
        self.waiting = Gauge("dsf_num_requests_waiting", "Requests waiting for a slot.", labels, registry=r)
        self.restarts = Counter(
            "dsf_engine_restarts", "Times the engine loop restarted after a failed step.", labels, registry=r
        )
        self.model_name = model_name

    def observe_queue(self, seconds: float, prompt_tokens: int) -> None:
        self.queue.labels(self.model_name).observe(seconds)
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def observe_token(self, first: bool, seconds: float) -> None:
        """``seconds``: since arrival for the first token, since the previous token otherwise."""
        (self.ttft if first else self.itl).labels(self.model_name).observe(seconds)
        self.generation_tokens.labels(self.model_name).inc()

    def observe_finish(self, seconds: float, reason: str) -> None:
        self.e2e.labels(self.model_name).observe(seconds)
        self.finished.labels(self.model_name, reason).inc()

    def observe_restart(self) -> None:
        self.restarts.labels(self.model_name).inc()

    def set_load(self, running: int, waiting: int) -> None:
        self.running.labels(self.model_name).set(running)
        self.waiting.labels(self.model_name).set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
