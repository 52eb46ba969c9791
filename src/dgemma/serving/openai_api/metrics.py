"""The HTTP door's own Prometheus metrics (text format 0.0.4), kept in-process without a client library:
requests by endpoint and status, request latency and time to the first streamed chunk (histograms), and
streams open now. The `dgemma` model's metrics (dgemma_requests_active, steps per canvas, ...) stay on
Triton's metrics endpoint, which Prometheus scrapes as its own target: proxying them here would tie this
endpoint's health to Triton's and count every series twice when both are scraped (README, Serving)."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health/ready", "/health/live", "/metrics")


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v

    def lines(self, name: str, labels: str) -> list[str]:
        out, acc = [], 0
        for le, n in zip((*map(str, self.buckets), "+Inf"), self.counts):
            acc += n
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {acc}')
        return out + [f"{name}_sum{{{labels}}} {self.sum:.6f}", f"{name}_count{{{labels}}} {acc}"]


class Metrics:
    def __init__(self, triton_metrics_hint: str = ""):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.first_chunk: dict[str, Histogram] = {}
        self.streams_active = 0
        self.hint = triton_metrics_hint

    @staticmethod
    def endpoint(path: str) -> str:
        return path if path in ENDPOINTS else "other"  # unknown paths share one label: no unbounded series

    def finished(self, path: str, status: int, seconds: float) -> None:
        ep = self.endpoint(path)
        with self._lock:
            self.requests[(ep, status)] = self.requests.get((ep, status), 0) + 1
            self.latency.setdefault(ep, Histogram()).observe(seconds)

    def first(self, path: str, seconds: float) -> None:
        with self._lock:
            self.first_chunk.setdefault(self.endpoint(path), Histogram()).observe(seconds)

    def stream(self, delta: int) -> None:
        with self._lock:
            self.streams_active += delta

    def text(self) -> str:
        with self._lock:
            out = [f"# {self.hint}"] if self.hint else []
            out += ["# HELP dgemma_openai_requests_total HTTP requests answered, by endpoint and status",
                    "# TYPE dgemma_openai_requests_total counter"]
            out += [f'dgemma_openai_requests_total{{endpoint="{ep}",status="{st}"}} {n}'
                    for (ep, st), n in sorted(self.requests.items())]
            out += ["# HELP dgemma_openai_request_seconds Time from request to the last byte of the answer",
                    "# TYPE dgemma_openai_request_seconds histogram"]
            for ep, h in sorted(self.latency.items()):
                out += h.lines("dgemma_openai_request_seconds", f'endpoint="{ep}"')
            out += ["# HELP dgemma_openai_first_chunk_seconds Time from request to the first streamed chunk "
                    "(one committed canvas, or a draft with stream_drafts)",
                    "# TYPE dgemma_openai_first_chunk_seconds histogram"]
            for ep, h in sorted(self.first_chunk.items()):
                out += h.lines("dgemma_openai_first_chunk_seconds", f'endpoint="{ep}"')
            out += ["# HELP dgemma_openai_streams_active Server-sent event streams open now",
                    "# TYPE dgemma_openai_streams_active gauge", f"dgemma_openai_streams_active {self.streams_active}"]
            return "\n".join(out) + "\n"
