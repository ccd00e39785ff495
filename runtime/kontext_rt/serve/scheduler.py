"""Between HTTP and the model: a bounded queue, deadlines, cancellation and dynamic batching, one worker thread.

The worker thread is the only caller of the pipeline (one model per process). It takes the oldest queued job and
up to max_batch - 1 more queued jobs of the same batch key (the key of the pipeline's `check`: same output size,
steps and context sizes), and runs them as one `run_checked`: each request is checked once, when it arrives, and
never again. The pipeline is anything with `check` and `run_checked` (ServedPipeline). A job leaves
the queue before it starts when its client is gone or its deadline has passed (`cancel`); a running job whose
client is gone is marked (`abandon`), and a batch whose every job is abandoned stops at its next denoising step,
freeing the worker for the next jobs. `close` stops new jobs and, by default, lets the queue drain.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from kontext_rt import RunReport
from kontext_rt.errors import KontextError
from kontext_rt.serve.metrics import Metrics
from kontext_rt.serve.schemas import Request

log = logging.getLogger("kontext_rt.serve")


class Checked(Protocol):
    """A request as the pipeline's check returns it: runnable by its run_checked; key: which ones share a batch."""

    key: Hashable


class ServedPipeline(Protocol):
    """What the server needs of a pipeline (kontext_rt.Pipeline is one): check a request once (a KontextError
    names what is wrong with it), then run checked requests of one key together, one output per request."""

    def check(self, request: Request) -> Checked: ...

    def run_checked(self, checked: list, reports: list[RunReport], progress: Callable[[int, int], None]) -> list: ...


class QueueFull(Exception):
    """The queue holds max_queue jobs: come back after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the server is busy: {depth} requests are queued; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining its queue before it exits and takes no new work."""


class DeadlineExceeded(Exception):
    """A job still queued when its deadline passed: it never started."""


class Abandoned(Exception):
    """Every client of a running batch went away: it stopped at a denoising step."""


class RankFailure(Exception):
    """A rank of the replica's sequence-parallel group failed, died or timed out (kontext_rt.serve.ray_app): the
    request is not answered with an image, and the replica is replaced (its health check raises from now on)."""


@dataclass(eq=False)
class Job:
    """One request in the scheduler: resolved with (image, report) or an exception through `future`."""

    checked: Checked  # the request as the pipeline's check returned it; its key: jobs that may share a batch
    deadline: float  # time.monotonic() after which a queued job is dropped
    future: Future = field(default_factory=Future)
    report: RunReport = field(default_factory=RunReport)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the worker took it; None while queued
    abandoned: bool = False  # its client went away while it ran


class Scheduler:
    def __init__(
        self, pipe: ServedPipeline, max_queue: int, max_batch: int, metrics: Metrics, clock: Callable[[], float] = None
    ):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be at least 1, got {max_queue}, {max_batch}")
        self.pipe, self.max_queue, self.max_batch, self.metrics = pipe, max_queue, max_batch, metrics
        self.clock = clock or time.monotonic
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._batch_s = 0.0  # running mean of one batch's seconds (Retry-After's estimate)
        self._worker: threading.Thread | None = None

    # ---- the HTTP side ----------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="kontext-rt-worker", daemon=True)
                self._worker.start()

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def worker_alive(self) -> bool:
        """The worker thread is running: started, and neither crashed nor finished after close()."""
        return self._worker is not None and self._worker.is_alive()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(self, checked: Checked, timeout_s: float) -> Job:
        """Queue a checked request (the pipeline's check); QueueFull when max_queue are waiting, ShuttingDown once
        close() was called."""
        job = Job(checked, self.clock() + timeout_s)
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down: it finishes the queued requests and takes no new ones")
            if len(self._queue) >= self.max_queue:
                self.metrics.rejected("queue_full")
                raise QueueFull(len(self._queue), self._retry_after())
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> bool:
        """Take a job out of the queue before it starts (client gone, deadline passed). False once it has started:
        it then runs to the end."""
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            self.metrics.queue_depth.set(len(self._queue))
        job.future.cancel()
        self.metrics.rejected(reason)
        return True

    def abandon(self, job: Job) -> None:
        """A running job's client went away: its batch stops at the next step once all its jobs are abandoned."""
        if not job.abandoned:
            job.abandoned = True
            self.metrics.rejected("disconnected")

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new jobs; with drain, run the queued ones first, else fail them (ShuttingDown). Waits for the
        worker to finish its last batch."""
        with self._cond:
            self._closing = True
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
                self.metrics.queue_depth.set(0)
            self._cond.notify_all()
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDown("the server shut down before this request started"))
        if self._worker is not None:
            self._worker.join(timeout)

    def _retry_after(self) -> int:
        """Seconds until about one batch has left the queue (at least 1)."""
        return max(1, math.ceil(self._batch_s))

    # ---- the worker -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:  # closing, and drained
                    return
                jobs = self._take()
            if jobs:
                self._run(jobs)

    def _take(self) -> list[Job]:
        """The oldest live job and up to max_batch - 1 queued jobs of its key, in queue order (lock held). Jobs past
        their deadline are failed on the way."""
        now, taken, kept = self.clock(), [], deque()
        while self._queue:
            job = self._queue.popleft()
            if now > job.deadline:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(DeadlineExceeded("the request waited in the queue past its deadline"))
                    self.metrics.rejected("timeout")
            elif len(taken) < self.max_batch and (not taken or job.checked.key == taken[0].checked.key):
                taken.append(job)
            else:
                kept.append(job)
        self._queue = kept
        self.metrics.queue_depth.set(len(kept))
        return taken

    def _run(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # a cancelled future: client gone
        if not jobs:
            return
        t0 = self.clock()
        for job in jobs:
            job.started = t0
            self.metrics.stage("queue", t0 - job.enqueued)
        self.metrics.running.set(len(jobs))
        try:
            self._run_batch(jobs)
        finally:
            self.metrics.running.set(0)
            elapsed = self.clock() - t0
            self._batch_s = elapsed if self._batch_s == 0 else 0.8 * self._batch_s + 0.2 * elapsed

    def _run_batch(self, jobs: list[Job]) -> None:
        run = lambda js, progress: self.pipe.run_checked([j.checked for j in js], [j.report for j in js], progress)
        if self._run_jobs(jobs, run, isolate=len(jobs) > 1):
            return
        for job in jobs:  # one request refused the whole batch: run each alone, so only it fails
            self._run_jobs([job], run)

    def _run_jobs(self, jobs: list[Job], run, isolate: bool = False) -> bool:
        """Run jobs as one call and resolve their futures. With isolate, a KontextError resolves nothing and
        returns False (the caller reruns them one by one)."""
        self.metrics.batch_size.observe(len(jobs))

        def progress(done: int, total: int) -> None:  # after each step: stop when nobody waits any more
            if all(job.abandoned for job in jobs):
                raise Abandoned(f"every client of this batch went away: stopped after step {done} of {total}")

        try:
            images = run(jobs, progress)
        except Abandoned as e:
            for job in jobs:
                job.future.set_exception(e)
            return True
        except KontextError as e:
            if isolate:
                return False
            for job in jobs:
                job.future.set_exception(e)
            return True
        except Exception as e:  # a bug or the device (out of memory): the worker goes on with the next jobs
            log.exception("the pipeline failed on a batch of %d", len(jobs))
            for job in jobs:
                job.future.set_exception(e)
            return True
        for job, image in zip(jobs, images, strict=True):
            for stage, seconds in job.report.timings.items():
                self.metrics.stage(stage, seconds)
            job.future.set_result((image, job.report))
        return True
