"""Prometheus collectors of the service (prometheus_client), and the ASGI middleware that feeds them.

Every series the dashboards and alert rules use is defined here; rates and quantiles are Prometheus' job
(`rate()` over the counters, `histogram_quantile()` over the histograms).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "dsft"
# Latency from a few ms (healthz, a 1-token answer on a small model) to a minute (long answers on a big one).
# Every latency threshold of monitoring/alerts.yml must be one of these boundaries (a test checks it): then
# "p95 > X" holds exactly when more than 5 % of requests took longer than X, instead of depending on how
# histogram_quantile interpolates inside a bucket (a 2 s threshold inside (1, 2.5] fired or not at a client
# p95 of 2.04 s depending on the spread within the bucket).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# One decode step costs ~1 ms (tiny model) to ~1 s (a large model on CPU).
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNMATCHED = "unmatched"  # label of paths no route matches: keeps label cardinality bounded


class ServeMetrics:
    """The service's collectors, in their own registry (so several apps can live in one process, e.g. tests)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Wall time of an HTTP request, by endpoint (route template)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "HTTP requests being handled now, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.time_per_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Generation wall time of a request's batch divided by the request's generated tokens",
            ["endpoint"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens",
            "Tokens generated (EOS excluded), by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens fed to the model, by endpoint", ["endpoint"], registry=r
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size",
            "Requests generated together in one model.generate call",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_rejected_requests",
            "Requests refused before generation, by reason",
            ["reason"],
            registry=r,
        )
        self.rejected.labels(
            "saturated"
        )  # export the known reason at 0, so rate() has a series from the start
        self.model_ready = Gauge(
            f"{PREFIX}_model_ready", "1 once the model is loaded and serving", registry=r
        )
        self.model_info = Info(
            f"{PREFIX}_model",
            "What is being served: model name and type, git commit, DVC experiment",
            registry=r,
        )
        self.stuck_requests = Gauge(
            f"{PREFIX}_engine_stuck_requests",
            "Requests in the engine (queued or generating) for longer than serve.stuck_after_s",
            registry=r,
        )
        self.oldest_request_age = Gauge(
            f"{PREFIX}_engine_oldest_request_age_seconds",
            "Age of the oldest request in the engine (0 when it holds none)",
            registry=r,
        )
        self.worker_up = Gauge(
            f"{PREFIX}_engine_worker_up", "1 while the generation worker thread runs", registry=r
        )

    def watch_engine(self, engine, stuck_after_s: float) -> None:
        """Read the engine's stuck count, oldest request age and worker state at every scrape."""
        self.stuck_requests.set_function(lambda: engine.in_flight.older_than(stuck_after_s))
        self.oldest_request_age.set_function(lambda: max(engine.in_flight.ages(), default=0.0))
        self.worker_up.set_function(lambda: 1.0 if engine.worker_alive else 0.0)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of every collector and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def observe_generation(self, endpoint: str, prompt_tokens: int, new_tokens: int, seconds: float) -> None:
        """Record one request's token counts and its time per output token."""
        self.prompt_tokens.labels(endpoint).inc(prompt_tokens)
        self.generated_tokens.labels(endpoint).inc(new_tokens)
        if new_tokens > 0:
            self.time_per_token.labels(endpoint).observe(seconds / new_tokens)


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """`git rev-parse HEAD` of the working directory, or "unknown" (no git, not a repository)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def model_name(model_dir: str | os.PathLike, configured: str | None = None) -> str:
    """The name the service publishes for its model: serve.model_name, else the directory's own name
    (`sft`, `int8`); never the absolute path, which tells a client about the host and nothing about the model."""
    return configured or Path(model_dir).resolve().name


def model_info_labels(name: str, model_type: str, commit: str, env=os.environ) -> dict[str, str]:
    """Labels of the model info metric; DVC sets DVC_EXP_NAME while it runs an experiment."""
    return {
        "model_name": name,
        "model_type": model_type or "unknown",
        "git_commit": commit,
        "dvc_exp": env.get("DVC_EXP_NAME") or "none",
    }


def endpoint_label(scope: dict, known_paths: frozenset[str]) -> str:
    """The matched route's path template, else the raw path if it is one of the app's, else UNMATCHED.

    Requests refused before routing (401, 413) keep their path; unknown paths share one label, so a
    scanner cannot blow up the label set.
    """
    template = getattr(scope.get("route"), "path", None)
    if isinstance(template, str):
        return template
    path = scope.get("path", "")
    return path if path in known_paths else UNMATCHED


class MetricsMiddleware:
    """Pure ASGI middleware: latency, status and in-flight count of every HTTP request.

    It sits outside authentication and error handling so 401s, 4xx and 5xx are all counted; an exception
    escaping the app is counted as 500 before Starlette's error middleware turns it into a response.
    """

    def __init__(self, app, metrics: ServeMetrics, known_paths: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()
        gauge = self.metrics.in_flight.labels(endpoint_label(scope, self.known_paths))  # before routing
        gauge.inc()

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            gauge.dec()
            endpoint = endpoint_label(scope, self.known_paths)
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)
            self.metrics.requests.labels(endpoint, str(status)).inc()
