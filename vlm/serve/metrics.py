"""The server's Prometheus metrics (`GET /metrics`), one registry per app.

Latencies and token counts are observed by the HTTP layer as each request ends; the engine's state
(running and waiting requests, KV slots in use, cache hits and misses, tokens processed) is read
from `engine.stats()` at scrape time, so the engine needs no metrics code of its own and both
engines are covered. Each app owns its `CollectorRegistry`: several apps in one process (tests,
two models) never share or clash.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from vlm.serve.api import Finished

__all__ = ["CONTENT_TYPE_LATEST", "ServerMetrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_GAP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class _EngineCollector:
    """Gauges and counters read from `engine.stats()` when Prometheus scrapes."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        gauges = {
            "vlm_requests_running": ("requests prefilling or decoding", s.get("running", 0) + s.get("prefilling", 0)),
            "vlm_requests_waiting": ("requests submitted and not running yet", s.get("queue_depth", 0)),
            "vlm_kv_slots_used": ("KV slots held by running requests", s.get("max_batch", 1) - s.get("free_slots", 1)),
            "vlm_kv_slots": ("KV slots in all (requests that can run at once)", s.get("max_batch", 1)),
            "vlm_engine_alive": ("1 while the engine thread runs", int(bool(s.get("alive", True)))),
        }
        if "free_slots" not in s:  # the serial engine: its one running request holds the one slot
            gauges["vlm_kv_slots_used"] = (gauges["vlm_kv_slots_used"][0], s.get("running", 0))
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        for name, key, doc in (
            ("vlm_prompt_tokens_prefilled", "prefill_tokens", "prompt tokens run through the decoder"),
            ("vlm_generated_tokens", "generated_tokens", "tokens generated"),
        ):
            if key in s:
                c = CounterMetricFamily(name, doc)
                c.add_metric([], float(s[key]))
                yield c
        for cache in ("prefix_cache", "embed_cache"):
            stats = s.get(cache) or {}
            for what in ("hits", "misses"):
                c = CounterMetricFamily(f"vlm_{cache}_{what}", f"{cache.replace('_', ' ')} {what}")
                c.add_metric([], float(stats.get(what, 0)))
                yield c


class ServerMetrics:
    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(
            "vlm_time_to_first_token_seconds", "arrival to first generated token", buckets=_LATENCY, registry=r
        )
        self.itl = Histogram(
            "vlm_inter_token_latency_seconds", "time between generated tokens", buckets=_TOKEN_GAP, registry=r
        )
        self.e2e = Histogram(
            "vlm_e2e_request_latency_seconds", "arrival to the request's end", buckets=_LATENCY, registry=r
        )
        self.prompt_tokens = Histogram(
            "vlm_request_prompt_tokens", "prompt tokens per request (visual included)", buckets=_TOKENS, registry=r
        )
        self.generation_tokens = Histogram(
            "vlm_request_generation_tokens", "generated tokens per request", buckets=_TOKENS, registry=r
        )
        self.requests = Counter(
            "vlm_requests", "requests that reached the engine, by how they ended", ["finish_reason"], registry=r
        )
        self.refused = Counter(
            "vlm_requests_refused", "requests answered with an error, by reason", ["reason"], registry=r
        )
        r.register(_EngineCollector(engine))

    def refusal(self, reason: str | None) -> None:
        self.refused.labels(reason or "other").inc()

    def token_gap(self, seconds: float, tokens: int) -> None:
        """A `Delta` of `tokens` tokens came `seconds` after the previous one."""
        n = max(1, tokens)
        for _ in range(n):
            self.itl.observe(seconds / n)

    def finished(self, ev: Finished | None, reason: str, arrived: float, now: float, first_token_at: float | None):
        """A request ended (`ev` None: before its `Finished`, e.g. its client left); times are
        `time.perf_counter()` values."""
        self.requests.labels(reason).inc()
        self.e2e.observe(max(0.0, now - arrived))
        if first_token_at is not None:
            self.ttft.observe(max(0.0, first_token_at - arrived))
        if ev is not None and ev.usage.prompt_tokens:
            self.prompt_tokens.observe(ev.usage.prompt_tokens)
            self.generation_tokens.observe(ev.usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
