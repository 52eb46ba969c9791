"""The `dgemma` model's step-level scheduler: every active request is one row of a shared batch
(dgemma.generation.batch.InFlight), advanced by one thread, one iteration at a time (encoder passes of the rows
that prefill or commit, then one batched denoising step). Independent of Triton.

Admission is first come, first served: at most GpuProfile.max_batch rows; up to `max_queued` more requests wait
in arrival order; beyond that `Busy` (UNAVAILABLE). Rows join at step boundaries and leave when they finish, fail
or are cancelled (the slot is free for the next request at once). The request's own thread (Triton's) waits in
`submit` until its row is gone; responses are sent from the scheduler thread. A failing row fails alone; a
failing batched call fails the rows in it; the scheduler keeps serving.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from ..core.errors import Busy, Cancelled
from ..generation.batch import InFlight, Row
from .loop import Job
from .metrics import Recorder


class _Ticket:
    def __init__(self, job: Job, should_stop: Callable[[], bool]):
        self.job, self.should_stop = job, should_stop
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.outcome = "error"
        self.admitted_s: float | None = None


class Scheduler:
    def __init__(self, backend, max_batch: int, max_queued: int, recorder: Recorder | None = None,
                 prefill_chunk: int = 512, log: Callable[[str], None] = lambda s: None, poll_s: float = 0.05):
        self.runner = InFlight(backend, max_batch, prefill_chunk)
        self.max_batch, self.max_queued = max_batch, max_queued
        self.recorder = recorder or Recorder(None)
        self.log, self.poll_s = log, poll_s
        self._queue: deque[_Ticket] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- the request threads' side -----------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self.runner.rows)

    def submit(self, job: Job, should_stop: Callable[[], bool]) -> str:
        """Queue the job, wait until its row is gone. -> "ok" | "cancelled"; raises Busy when the queue is full
        and the job's error when it failed."""
        t = _Ticket(job, should_stop)
        with self._cv:
            if len(self._queue) >= self.max_queued and self.runner.free == 0:
                self.recorder.count("dgemma_requests_total", outcome="busy")
                raise Busy(f"dgemma is full: {self.active} requests generating (max_batch={self.max_batch}, "
                           f"GpuProfile.max_batch) and {len(self._queue)} queued (max {self.max_queued}); retry later.")
            self._queue.append(t)
            self._occupancy()
            self._ensure_thread()
            self._cv.notify_all()
        t.done.wait()
        if t.error is not None:
            raise t.error
        return t.outcome

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- the scheduler thread --------------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="dgemma-scheduler")
            self._thread.start()

    def _occupancy(self) -> None:
        self.recorder.occupancy(self.active, len(self._queue))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._queue and not self.runner.rows:
                    self._cv.wait()
                if self._stopping:
                    return
                self._drop_cancelled_queued()
                admitted = self._admit()
                self._occupancy()
            if not self.runner.rows:
                continue
            try:
                rep = self.runner.step()
            except BaseException as e:  # noqa: BLE001 - a bug in the runner itself: fail every row, keep serving
                self.log(f"dgemma scheduler: iteration failed: {type(e).__name__}: {e}")
                for row in list(self.runner.rows):
                    self.runner.leave(row)
                    self._end(row.tag, "error", e)
                continue
            self._report(rep, admitted)

    def _drop_cancelled_queued(self) -> None:
        for t in list(self._queue):
            try:
                gone = t.should_stop()
            except Exception:  # noqa: BLE001 - a broken hook counts as gone
                gone = True
            if gone:
                self._queue.remove(t)
                self._end(t, "cancelled")

    def _admit(self) -> int:
        n = 0
        while self._queue and self.runner.free:
            t = self._queue.popleft()
            t.admitted_s = time.perf_counter()
            self.recorder.observe("dgemma_queue_seconds", t.admitted_s - t.job.arrived)
            job = t.job
            self.runner.add(Row(job.gen, job.prompt, job.on_step, job.on_canvas, t.should_stop, tag=t))
            n += 1
        return n

    def _report(self, rep, admitted: int) -> None:
        for rows, s, seconds in rep.encoded:
            self.recorder.observe("dgemma_graph_seconds", seconds, graph="encoder", rows=str(rows))
        if rep.denoised is not None:
            rows, seconds = rep.denoised
            self.recorder.observe("dgemma_graph_seconds", seconds, graph="denoiser", rows=str(rows))
            self.recorder.observe("dgemma_rows_per_step", rows)
        for row in rep.finished:
            t = row.tag
            try:
                t.job.finish()
                self._end(t, "ok")
            except Exception as e:  # noqa: BLE001 - sending the last response failed
                self._end(t, "error", e)
        for row in rep.cancelled:
            self.log(f"dgemma: request cancelled after {len(row.gen.steps_per_canvas)} committed canvas(es); "
                     "row freed")
            self._end(row.tag, "cancelled")
        for row, e in rep.failed:
            self._end(row.tag, "error", e)
        if rep.finished or rep.cancelled or rep.failed:
            with self._cv:
                self._occupancy()

    def _end(self, t: _Ticket, outcome: str, error: BaseException | None = None) -> None:
        job = t.job
        t.outcome, t.error = outcome, error
        if outcome != "busy":
            self.recorder.observe("dgemma_canvases_per_request", len(job.gen.steps_per_canvas))
            for steps in job.gen.steps_per_canvas:
                self.recorder.observe("dgemma_steps_per_canvas", steps)
            if job.first_canvas_s is not None:
                self.recorder.observe("dgemma_time_to_first_canvas_seconds", job.first_canvas_s)
        self.recorder.count("dgemma_requests_total", outcome=outcome)
        if isinstance(error, Cancelled):
            t.outcome, t.error = "cancelled", None
        t.done.set()
