"""The `dgemma` model's custom metrics on Triton's metrics endpoint (`METRICS`, updated through `Recorder`) and the
Prometheus text reader the benchmarks and tests use (`parse_metrics`, `metric`)."""

from __future__ import annotations

import re
import threading
from typing import Any, Callable


SECONDS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 1.0, 4.0, 16.0)
# custom metrics the dgemma model reports on Triton's metrics endpoint: name -> (kind, description, buckets)
METRICS = {
    "dgemma_steps_per_canvas": ("histogram", "Denoising steps per committed canvas",
                                (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48)),
    "dgemma_canvases_per_request": ("histogram", "Canvases committed per request (cancelled requests included)",
                                    (1, 2, 3, 4, 6, 8, 16, 32, 64, 128)),
    "dgemma_requests_total": ("counter", "Requests the dgemma model finished, by outcome (ok, cancelled, error, busy)",
                              None),
    "dgemma_graph_seconds": ("histogram", "Wall time of one batched backend call of the scheduler (graph=encoder: "
                             "prefill chunks / commits; graph=denoiser: one denoising step; rows=the requests in the "
                             "call; BLS round trip included)", SECONDS),
    "dgemma_rows_per_step": ("histogram", "Requests sharing one batched denoising step", (1, 2, 3, 4, 6, 8, 12, 16, 32)),
    "dgemma_queue_seconds": ("histogram", "Time a request waited for a row (arrival -> admitted)", SECONDS),
    "dgemma_time_to_first_canvas_seconds": ("histogram", "Arrival -> first committed canvas", SECONDS),
    "dgemma_requests_active": ("gauge", "Requests generating now (rows in use)", None),
    "dgemma_requests_queued": ("gauge", "Requests waiting for a row", None),
}


class Recorder:
    """Updates METRICS through `make(name, labels)` -> an object with observe/increment/set (pb_utils.Metric in
    the model; anything alike in tests). Thread-safe; without `make` it records nothing."""

    def __init__(self, make: Callable[[str, dict], Any] | None):
        self._lock = threading.Lock()
        self._m: dict[tuple, Any] = {}
        self._make = make

    def _get(self, name: str, **labels):
        key = (name, tuple(sorted(labels.items())))
        if key not in self._m:
            self._m[key] = self._make(name, labels)
        return self._m[key]

    def observe(self, name: str, value: float, **labels) -> None:
        if self._make:
            with self._lock:
                self._get(name, **labels).observe(float(value))

    def count(self, name: str, **labels) -> None:
        if self._make:
            with self._lock:
                self._get(name, **labels).increment(1)

    def occupancy(self, active: int, queued: int) -> None:
        if self._make:
            with self._lock:
                self._get("dgemma_requests_active").set(float(active))
                self._get("dgemma_requests_queued").set(float(queued))


def parse_metrics(text: str, prefixes: tuple[str, ...] = ("dgemma_", "nv_inference_")) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} for the series whose names start with `prefixes`."""
    out = {}
    for line in text.splitlines():
        if line.startswith(prefixes):
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
    return out


def metric(m: dict[str, float], name: str, **labels) -> float:
    """Sum of the series `name` whose labels include `labels`."""
    total = 0.0
    for key, v in m.items():
        base, _, lab = key.partition("{")
        if base != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', lab))
        if all(have.get(k) == str(x) for k, x in labels.items()):
            total += v
    return total
