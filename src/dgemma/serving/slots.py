"""Admission of the Triton `dgemma` model: at most GpuProfile.max_batch requests generate at once, a bounded FIFO
queue beyond, `Busy` (UNAVAILABLE) past it; a finished, failed or cancelled request frees its slot at once."""

from __future__ import annotations

import threading
from typing import Callable

from ..core.errors import Cancelled, RequestError


class Busy(RequestError):
    """Every slot is taken and the queue is full."""


class Slots:
    """At most `size` requests generate at once (GpuProfile.max_batch: the canvases the graphs' batch holds);
    up to `max_queued` more wait in arrival order; beyond that a request is refused with Busy. A finished,
    failed or cancelled request frees its slot at once (`release` in a finally)."""

    def __init__(self, size: int, max_queued: int):
        self.size, self.max_queued = size, max_queued
        self.in_use = 0
        self._waiting: list[object] = []
        self._cv = threading.Condition()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def acquire(self, should_stop: Callable[[], bool] | None = None, poll_s: float = 0.05,
                on_queued: Callable[[], None] | None = None) -> None:
        """Take a slot; wait in line when none is free (on_queued() once in line). Raises Busy when the line is
        full and Cancelled when should_stop() turns true while waiting."""
        with self._cv:
            if self.in_use < self.size and not self._waiting:
                self.in_use += 1
                return
            if len(self._waiting) >= self.max_queued:
                raise Busy(f"dgemma is full: {self.in_use} requests generating (max_batch={self.size}, "
                           f"GpuProfile.max_batch) and {len(self._waiting)} queued (max {self.max_queued}); "
                           "retry later.")
            me = object()
            self._waiting.append(me)
            if on_queued is not None:
                on_queued()
            try:
                while not (self.in_use < self.size and self._waiting[0] is me):
                    if should_stop is not None and should_stop():
                        raise Cancelled("cancelled while queued for a slot")
                    self._cv.wait(poll_s)
                self.in_use += 1
            finally:
                self._waiting.remove(me)
                self._cv.notify_all()

    def release(self) -> None:
        with self._cv:
            self.in_use -= 1
            self._cv.notify_all()
