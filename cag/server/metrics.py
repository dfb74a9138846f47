"""Prometheus metrics of ``cag serve``, in a registry of the server's own (``GET /metrics``)."""

from __future__ import annotations

import threading
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Request counts, token counts, prompt-cache hit rate, time to first token and cache memory."""

    def __init__(self, cache_bytes: Callable[[], float], running: Callable[[], float], waiting: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cag_requests", "Requests answered, by route, model and HTTP status (499: the client left).",
                                ["route", "model", "status"], registry=r)
        self.prompt_tokens = Counter("cag_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self.cached_tokens = Counter("cag_cached_tokens", "Prompt tokens restored from a cache rather than prefilled.",
                                     registry=r)
        self.completion_tokens = Counter("cag_completion_tokens", "Tokens generated.", registry=r)
        self.lookups = Counter("cag_prompt_cache_lookups", "Answered requests by whether a cached prefix was reused.",
                               ["result"], registry=r)
        self.ttft = Histogram("cag_time_to_first_token_seconds", "From a request's arrival to its first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        hit_rate = Gauge("cag_prompt_cache_hit_rate", "Share of prompt tokens restored from a cache rather than prefilled.",
                         registry=r)
        hit_rate.set_function(self._hit_rate)
        Gauge("cag_cache_memory_bytes", "Bytes of KV caches held in memory (bounded by --cache-ram).",
              registry=r).set_function(cache_bytes)
        Gauge("cag_running_requests", "Requests decoding now.", registry=r).set_function(running)
        Gauge("cag_waiting_requests", "Requests waiting for a place in a batch.", registry=r).set_function(waiting)
        self._lock = threading.Lock()
        self._prompt_total = 0
        self._cached_total = 0

    def answered(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int, ttft_s: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.completion_tokens.inc(completion_tokens)
        self.lookups.labels("hit" if cached_tokens else "miss").inc()
        self.ttft.observe(ttft_s)
        with self._lock:
            self._prompt_total += prompt_tokens
            self._cached_total += cached_tokens

    def request(self, route: str, model: str, status: int) -> None:
        self.requests.labels(route, model, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def _hit_rate(self) -> float:
        with self._lock:
            return self._cached_total / self._prompt_total if self._prompt_total else 0.0
