"""Request coalescing and the one adaptation worker.

Requests put their decoded queries in one bounded FIFO.  A single worker thread owns the adapter: it takes
up to B queries from the head of the FIFO — from one request or several, a long request split over
consecutive batches — as soon as B are there, or when the oldest has waited ``max_wait_ms``, adapts on
them as one batch, and hands each request its own rows' answers when all of them are done.  Control
operations (reset, checkpoint) queue in the same FIFO and run on the worker between batches, in order.

Every submitted request is settled exactly once: its result, or an exception (:class:`BatchFailed` when a
batch it was in failed and was rolled back, :class:`Unavailable` when the service stopped before its
turn).  A full FIFO refuses new work at once (:class:`QueueFull`) instead of letting it wait unboundedly.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qshift.errors import NonFiniteError
from qshift.serve.service import Service

log = logging.getLogger("qshift.serve")


class QueueFull(Exception):
    """The FIFO is full: try again after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(Exception):
    """The worker is stopping or stopped (HTTP 503)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatchFailed(Exception):
    """A batch holding this request's queries failed; the adapter was rolled back to before it."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass(eq=False)
class Answer:
    """One request's answer: per query the top-k gallery rows and scores, and the batches that held it."""

    rows: list[list[int]]
    scores: list[list[float]]
    batches: list[int]


@dataclass(eq=False)
class Job:
    """A request's decoded queries on their way through the FIFO."""

    rows: list[Any]
    k: int
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    next_row: int = 0  # the first row not yet taken into a batch
    done_rows: int = 0
    cancelled: bool = False  # its caller gave up (timeout) or a batch of it failed: skip the rest
    top: list[Any] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.top = [None] * len(self.rows)


@dataclass(eq=False)
class Control:
    """An operation on the adapter (reset, checkpoint) that runs on the worker, in FIFO order."""

    name: str
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


def _settle(future: Future, result: Any = None, error: BaseException | None = None) -> None:
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except InvalidStateError:  # already settled
        pass


def quantiles_ms(values: Any, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``p50`` / ``p95`` / ``p99`` of durations in seconds, in milliseconds (None without data)."""
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    return {f"p{q:g}": round(float(np.percentile(arr, q)) * 1000, 2) for q in qs}


class Batcher:
    """The FIFO and the worker thread over one :class:`Service`."""

    def __init__(self, service: Service, *, max_wait_ms: float = 20.0, max_queue: int = 1024,
                 max_controls: int = 16, window: int = 2048) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be positive, got {max_queue}")
        self.service, self.B = service, service.batch_size
        self.max_wait, self.max_queue, self.max_controls = max_wait_ms / 1000.0, max_queue, max_controls
        self._pending: deque[Job | Control] = deque()
        self._queued_rows = 0
        self._queued_controls = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_seconds: deque[float] = deque(maxlen=window)
        self.latencies: deque[float] = deque(maxlen=window)
        self.failures = 0
        self.last_failure: str | None = None
        self.last_batch: dict[str, Any] | None = None
        self.started_at = time.time()

    # ------------------------------------------------------------------ callers' side
    def start(self) -> None:
        """Start the worker (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qshift-adapter", daemon=True)
            self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, rows: list[Any], k: int) -> Job:
        """Queue one request's decoded queries; its ``future`` settles with an :class:`Answer`."""
        job = Job(rows, k)
        with self._cond:
            self._check_open()
            if self._queued_rows + len(rows) > self.max_queue:
                raise QueueFull(f"the queue holds {self._queued_rows} of at most {self.max_queue} queries; this "
                                f"request brings {len(rows)}", self.retry_after())
            self._pending.append(job)
            self._queued_rows += len(rows)
            self._cond.notify_all()
        return job

    def control(self, name: str, fn: Callable[[], Any]) -> Future:
        """Queue ``fn`` to run on the worker after the batches queued before it."""
        op = Control(name, fn)
        with self._cond:
            self._check_open()
            if self._queued_controls >= self.max_controls:
                raise QueueFull(f"{self._queued_controls} operations already queued", self.retry_after())
            self._pending.append(op)
            self._queued_controls += 1
            self._cond.notify_all()
        return op.future

    def cancel(self, job: Job) -> None:
        """Give up on ``job``: its rows not yet in a batch are dropped (it still may have adapted on some)."""
        with self._cond:
            job.cancelled = True
            self._drop(job)

    def _check_open(self) -> None:
        if self._stopping:
            raise Unavailable("the server is shutting down")
        if self._thread is None or not self._thread.is_alive():
            raise Unavailable("the adaptation worker is not running")

    def retry_after(self) -> int:
        """Seconds after which the queue will likely have room (whole seconds, at least 1)."""
        mean = float(np.mean(self.batch_seconds)) if self.batch_seconds else 1.0
        return max(1, math.ceil((self._queued_rows / self.B + 1) * mean))

    def queue_depth(self) -> dict[str, int]:
        with self._cond:
            jobs = sum(1 for x in self._pending if isinstance(x, Job) and not x.cancelled)
            return {"queries": self._queued_rows, "requests": jobs, "operations": self._queued_controls,
                    "limit": self.max_queue}

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, finish what is queued (for up to ``timeout`` s; the rest is answered 503), and
        let the worker write its final checkpoint."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the queue did not drain in %.0f s; answering what is left with 503", timeout)
            self._fail_pending(Unavailable("the server shut down before this request's turn"))
            self._thread.join(timeout)

    def _fail_pending(self, error: BaseException) -> None:
        with self._cond:
            while self._pending:
                item = self._pending.popleft()
                if isinstance(item, Job):
                    item.cancelled = True
                _settle(item.future, error=error)
            self._queued_rows = self._queued_controls = 0

    # ------------------------------------------------------------------ the worker
    def _run(self) -> None:
        try:
            while True:
                item = self._next()
                if item is None:
                    break
                if isinstance(item, Control):
                    self._run_control(item)
                else:
                    self._run_batch(item)
        except BaseException:  # a bug here must not leave callers waiting
            log.exception("the adaptation worker stopped on an unexpected error")
            raise
        finally:
            with self._cond:
                self._stopping = True
            self._fail_pending(Unavailable("the adaptation worker stopped"))
            if self.service.store is not None:
                try:
                    self.service.checkpoint()
                except Exception:
                    log.exception("the final checkpoint failed")

    def _next(self) -> Control | list[tuple[Job, int, int]] | None:
        """Block until there is a batch to run (a list of row ranges), an operation, or nothing more (None)."""
        with self._cond:
            while True:
                while self._pending and isinstance(self._pending[0], Job) and self._pending[0].cancelled:
                    self._drop(self._pending.popleft())
                if not self._pending:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._pending[0]
                if isinstance(head, Control):
                    self._pending.popleft()
                    self._queued_controls -= 1
                    return head
                ready, barrier = 0, False
                for x in self._pending:
                    if isinstance(x, Control):
                        barrier = True
                        break
                    if not x.cancelled:
                        ready += len(x.rows) - x.next_row
                wait = head.enqueued + self.max_wait - time.monotonic()
                if ready >= self.B or wait <= 0 or barrier or self._stopping:
                    return self._take()
                self._cond.wait(wait)

    def _drop(self, job: Job) -> None:
        self._queued_rows -= len(job.rows) - job.next_row
        job.next_row = len(job.rows)

    def _take(self) -> list[tuple[Job, int, int]]:
        segments, n = [], 0
        while self._pending and n < self.B and isinstance(self._pending[0], Job):
            job = self._pending[0]
            if job.cancelled:
                self._drop(self._pending.popleft())
                continue
            take = min(self.B - n, len(job.rows) - job.next_row)
            segments.append((job, job.next_row, job.next_row + take))
            job.next_row += take
            self._queued_rows -= take
            n += take
            if job.next_row == len(job.rows):
                self._pending.popleft()
        return segments

    def _run_batch(self, segments: list[tuple[Job, int, int]]) -> None:
        svc = self.service
        rows = [r for job, a, b in segments for r in job.rows[a:b]]
        jobs = list(dict.fromkeys(job for job, _, _ in segments))
        t0 = time.perf_counter()
        try:
            scores = svc.adapt(svc.codec.collate(rows))
            rows_t, values = svc.adapter.method.top(scores, max(j.k for j in jobs))
            idx, vals = rows_t.cpu().tolist(), values.float().cpu().tolist()
        except Exception as e:
            self.failures += 1
            status = 500
            if len(jobs) == 1 and isinstance(e, (ValueError, TypeError)) and not isinstance(e, NonFiniteError):
                status = 422  # only this request's queries were in it
            what = "NonFiniteError" if isinstance(e, NonFiniteError) else type(e).__name__
            self.last_failure = f"{what}: {e}"
            log.error("batch of %d queries from %d request(s) failed and was rolled back: %s", len(rows), len(jobs),
                      self.last_failure)
            error = BatchFailed(f"{what}: {e} (the batch of {len(rows)} queries was rolled back; the adapter is as "
                                "it was before it)", status)
            with self._cond:
                for job in jobs:
                    job.cancelled = True
                    self._drop(job)
            for job in jobs:
                _settle(job.future, error=error)
            return
        seconds = time.perf_counter() - t0
        self.batch_seconds.append(seconds)
        n = svc.counters["batches"]
        record = svc.adapter.last_record
        self.last_batch = {"batch": n, "size": len(rows), "requests": len(jobs), "ms": round(1000 * seconds, 1),
                           "guard": record.get("guard"), "collapse_reset": bool(record.get("collapse_reset"))}
        offset = 0
        for job, a, b in segments:
            for i in range(a, b):
                job.top[i] = (idx[offset][:job.k], vals[offset][:job.k])
                offset += 1
            job.batches.append(n)
            job.done_rows += b - a
            if job.done_rows == len(job.rows):
                _settle(job.future, Answer([t[0] for t in job.top], [t[1] for t in job.top], job.batches))
        if svc.checkpoint_due():
            try:
                svc.checkpoint()
            except Exception:
                log.exception("checkpoint at batch %d failed (serving goes on)", n)

    def _run_control(self, op: Control) -> None:
        try:
            _settle(op.future, op.fn())
        except Exception as e:
            log.error("%s failed: %s: %s", op.name, type(e).__name__, e)
            _settle(op.future, error=e)
