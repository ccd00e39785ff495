"""Prometheus metrics of one server, in its own registry (several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

# seconds: from a cached text encode on a GPU (~ms) to a 50-step full-size edit on a slow device (minutes)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


COUNTERS = {  # the pipeline's cache -> (its stats field, the metric's help)
    "text_cache": (("hits", "prompts found in the text-embedding cache"), ("misses", "prompts encoded")),
    "context_cache": (
        ("hits", "context images whose latents were found in the context cache"),
        ("kept_hits", "context images that were earlier outputs, taken from their kept latents (reuse_latents)"),
        ("misses", "context images encoded by the VAE"),
    ),
}


class _CacheCollector:
    """The pipeline's cache counters (pipe.text_cache.stats, pipe.context_cache.stats), read at each scrape."""

    def __init__(self, pipe):
        self.pipe = pipe

    def describe(self):
        return []  # no collect at registration: the counters are read at scrape time

    def collect(self):
        for cache, fields in COUNTERS.items():
            stats = getattr(getattr(self.pipe, cache, None), "stats", None)
            for name, what in fields:
                family = CounterMetricFamily(f"kontext_rt_{cache}_{name}", what)
                family.add_metric([], getattr(stats, name, 0))
                yield family


class Metrics:
    def __init__(self, pipe=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("kontext_rt_queue_depth", "requests waiting for the model", registry=r)
        self.running = Gauge("kontext_rt_running", "requests in the model now (one batch)", registry=r)
        self.batch_size = Histogram(
            "kontext_rt_batch_size", "requests run in one pipeline call", buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "kontext_rt_stage_seconds",
            "seconds per request and stage: queue (waiting), text_encode, vae_encode, denoise, vae_decode, total",
            ["stage"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.rejections = Counter(
            "kontext_rt_rejections",
            "requests dropped without running: queue_full, timeout, disconnected, shutting_down",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("kontext_rt_errors", "error responses by kind (the error's code)", ["kind"], registry=r)
        self.requests = Counter("kontext_rt_requests", "responses by route and status", ["route", "status"], registry=r)
        if pipe is not None:
            r.register(_CacheCollector(pipe))

    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=name).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)
