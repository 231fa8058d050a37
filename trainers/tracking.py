"""What a recipe reports to: metrics per step, final metrics, artifact directories.

trainers never imports MLflow or Ray; the orchestrator passes a Tracker that forwards to MLflow
(rank 0 only) and to Ray. Every other rank, and tests, get the null tracker below.

A real tracker must never hold up a training step: `MetricQueue` hands its points to a background
thread that writes them in batches, drops the oldest per-step points when the sink falls behind by
more than a bound, and waits (with a deadline) only for what must not be lost: final metrics.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("trainers.tracking")

# How long a trial waits, at its end, for its tracker to write what is queued.
FLUSH_TIMEOUT_S = 120.0


class TrackingError(RuntimeError):
    """Metrics that must be recorded (a trial's final metrics, its artifacts) could not be."""


class Tracker:
    """Null tracker: same methods as the real ones, does nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def flush(self, timeout_s: float | None = None) -> None:
        """Returns once everything logged so far is written; raises TrackingError if final metrics
        could not be within `timeout_s` (default: the tracker's own)."""

    def settle(self) -> None:
        """Before a checkpoint: returns once the per-step metrics logged so far are recorded, so a
        run resumed from that checkpoint (which logs only the steps after it) has every earlier
        point; at once when the sink is failing, which must not stall training."""


class ConsoleTracker(Tracker):
    """Prints per-step metrics: the tracker of a plain-process run (`python -m trainers`)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.started = time.monotonic()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        prefix = f"step {step:>5}" if step is not None else "final     "
        print(f"[{time.monotonic() - self.started:7.1f}s] {prefix}  {shown}", file=self.stream, flush=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        shown = "  ".join(f"{k}={v}" for k, v in tags.items())
        print(f"[{time.monotonic() - self.started:7.1f}s] tags        {shown}", file=self.stream, flush=True)


@dataclass
class Point:
    """One log_metrics call: its metrics, its step (None: final, never dropped) and when it was made."""

    metrics: dict
    step: int | None
    timestamp_ms: int
    seq: int = 0
    pinned: bool = False  # must reach the sink even under coalescing (see MetricQueue)
    kind: str = "metrics"  # what the sink writes it as (a tracker may queue tags too)


class MetricQueue:
    """Writes metric points from a background thread: `put` never waits for the sink.

    The writer thread takes up to `max_batch` waiting points at a time and calls `write(points)`;
    a failed write is retried (backing off up to 5 s) while new points queue behind it. Per-step
    points beyond `max_points` waiting are dropped oldest first, with a warning: a sink that stops
    answering costs the trial its oldest unwritten curve points, never its progress. Points
    without a step are never dropped; `put_final` waits until its point is written.

    `gather_s`: per-step points wait up to this long to be written together. A write is Python
    work (MLflow's log_batch on SQLite: ~4 ms) that holds the GIL, and a training step of a small
    model is mostly Python too: one write per second instead of one per step keeps the steps'
    share of the interpreter (measured: log_every=1 without it took 2x the time of log_every=40).

    `coalesce`: a live feed, where only the newest value of a metric matters (the progress Ray
    reports; with `gather_s`, at most one per-step write per gather_s). A waiting per-step point
    is replaced by a later one that has all its keys, except a `pinned` one (what a scheduler
    decides on), which is delivered; putting a pinned point waits until the previous pinned point
    is delivered, so a consumer is never more than one behind. A
    point without a step (the trial's last report) replaces the waiting unpinned per-step points,
    taking their values under its own: each delivery to Ray waits for the controller's poll, and
    a trial's end should not wait for one more progress point the last report makes stale.

    `hold`: the writer starts only once this event is set (or a caller waits, or close()). A Ray
    worker holds MLflow until its trial's first step: the writer's first work (importing MLflow,
    opening the store: ~2 s of CPU) would otherwise compete with the imports and model load that
    the first step waits for.
    """

    def __init__(self, name: str, write: Callable[[list[Point]], None], max_points: int = 10_000,
                 max_batch: int = 500, coalesce: bool = False, pinned: Callable[[dict], bool] = lambda m: False,
                 gather_s: float = 0.0, hold: threading.Event | None = None):
        self.name, self.write, self.hold = name, write, hold
        self.max_points, self.max_batch, self.coalesce, self.pinned = max_points, max_batch, coalesce, pinned
        self.gather_s = gather_s
        self.waiters = 0  # threads in wait(): what they wait for is written without gathering
        self.waiting: collections.deque[Point] = collections.deque()
        self.cond = threading.Condition()
        self.seq = 0
        self.dropped = 0
        self.error: BaseException | None = None  # the last failed write's, cleared by a success
        self.closing = False
        self.gathering = False  # the writer is waiting out gather_s (a new point need not wake it)
        self.last_write = 0.0  # time.time() of the last write (a live feed's gather_s counts from it)
        self.thread = threading.Thread(target=self._drain, name=f"tracker-{name}", daemon=True)
        self.thread.start()

    def put(self, metrics: dict, step: int | None, kind: str = "metrics") -> int:
        """Queues a point; returns its sequence number (for `wait`)."""
        pinned = step is not None and self.pinned(metrics)
        with self.cond:
            if pinned and self.coalesce:  # the previous decision point reaches the consumer first
                self._wait_locked(lambda: not any(p.pinned for p in self.waiting), FLUSH_TIMEOUT_S)
            self.seq += 1
            point = Point(dict(metrics), step, int(time.time() * 1000), self.seq, pinned, kind)
            if self.coalesce and step is not None:
                keys = point.metrics.keys()
                self.waiting = collections.deque(
                    p for p in self.waiting if p.step is None or p.pinned or not p.metrics.keys() <= keys)
            elif self.coalesce:  # a last point ends the feed: it carries the newest waiting values
                live = [p for p in self.waiting if p.step is not None and not p.pinned]
                for superseded in live:
                    point.metrics = {**superseded.metrics, **point.metrics}
                    self.waiting.remove(superseded)
            self.waiting.append(point)
            self._bound()
            # A per-step point the writer will gather anyway does not wake it: on a busy box every
            # wake-up is a GIL hand-off the training thread waits out (the writer then sleeps until
            # its oldest point is gather_s old, or until something below asks for a write now).
            if (self.gather_s <= 0 or step is None or pinned or self._full()
                    or len(self.waiting) == 1 and not self.gathering):
                self.cond.notify_all()
            return point.seq

    def put_final(self, metrics: dict, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Queues a point without a step and waits until it is written (TrackingError if not)."""
        self.wait(self.put(metrics, None), timeout_s)

    def wait(self, seq: int | None = None, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Until point `seq` (default: all put so far) is written or dropped. TrackingError if a point
        without a step is still unwritten after `timeout_s`; per-step points left then are given
        up, with a warning."""
        with self.cond:
            seq = self.seq if seq is None else seq
            self.waiters += 1
            self.cond.notify_all()
            try:
                if self._wait_locked(lambda: not any(p.seq <= seq for p in self.waiting), timeout_s):
                    return
            finally:
                self.waiters -= 1
            final = [p for p in self.waiting if p.seq <= seq and p.step is None]
            stepped = sum(1 for p in self.waiting if p.seq <= seq and p.step is not None)
        if stepped:
            log.warning("%s: %d per-step point(s) not written after %.0f s: %s", self.name, stepped, timeout_s,
                        self.error or "the sink did not answer")
        if final:
            names = ", ".join(sorted(final[0].metrics))[:200]
            raise TrackingError(f"{self.name}: final metrics not recorded after {timeout_s:.0f} s ({names}): "
                                f"{self.error or 'the sink did not answer'}")

    def settle(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Until every point put so far is written, unless a write fails first (a sink that does not
        answer is not waited for) or `timeout_s` passes; True when all were written."""
        with self.cond:
            seq, self.waiters = self.seq, self.waiters + 1
            self.cond.notify_all()
            try:
                return self._wait_locked(lambda: self.error is not None or not any(p.seq <= seq for p in self.waiting),
                                         timeout_s) and self.error is None
            finally:
                self.waiters -= 1

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Writes what is queued (as `wait`), then stops the thread."""
        try:
            self.wait(timeout_s=timeout_s)
        finally:
            with self.cond:
                self.closing = True
                self.cond.notify_all()

    def _wait_locked(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self.thread.is_alive():
                return False
            self.cond.wait(min(left, 1.0))
        return True

    def _bound(self) -> None:
        if len(self.waiting) <= self.max_points:  # the usual case, without a pass over the queue per put
            return
        stepped = sum(1 for p in self.waiting if p.step is not None)
        if stepped <= self.max_points:
            return
        kept, excess = collections.deque(), stepped - self.max_points
        for point in self.waiting:
            if excess and point.step is not None:
                excess -= 1
                continue
            kept.append(point)
        drops = stepped - self.max_points
        if self.dropped == 0 or (self.dropped + drops) // 1000 > self.dropped // 1000:
            log.warning("%s falls behind (%s): dropping the oldest per-step points beyond %d (%d dropped so far)",
                        self.name, self.error or "writes are slow", self.max_points, self.dropped + drops)
        self.dropped += drops
        self.waiting = kept

    def _gather(self) -> None:
        """Waits (lock held) until the oldest per-step point is gather_s old (a live feed: until
        gather_s after its last write), unless a point without a step, a pinned one, a waiter,
        close() or a full batch asks for the write now."""
        self.gathering = True
        try:
            while not (self.closing or self.waiters or not self.waiting or self._full()
                       or any(p.step is None or p.pinned for p in self.waiting)):
                since = self.last_write if self.coalesce else self.waiting[0].timestamp_ms / 1000
                left = since + self.gather_s - time.time()
                if left <= 0:
                    return
                self.cond.wait(left)
        finally:
            self.gathering = False

    def _full(self) -> bool:
        """A batch is full (a live feed never is: its waiting points replace each other)."""
        return not self.coalesce and len(self.waiting) >= self.max_batch

    def _drain(self) -> None:
        backoff = 0.0
        while True:
            with self.cond:
                while not self.waiting and not self.closing:
                    self.cond.wait()
                if not self.waiting:
                    return
                while self.hold is not None and not (self.hold.is_set() or self.closing or self.waiters):
                    self.cond.wait(0.25)  # an Event cannot notify this condition: look 4 times a second
                self._gather()
                batch = list(self.waiting)[:self.max_batch]
            try:
                self.write(batch)
            except Exception as err:  # the sink is down or slow: retry, new points queue behind
                if self.closing:  # close() gave up waiting: so does the thread
                    return
                if self.error is None:
                    log.warning("%s: write failed, retrying: %s", self.name, err)
                self.error = err
                backoff = min(5.0, max(0.2, backoff * 2))
                with self.cond:
                    self.cond.wait(backoff)
                continue
            backoff, self.error, self.last_write = 0.0, None, time.time()
            with self.cond:
                done = {p.seq for p in batch}
                self.waiting = collections.deque(p for p in self.waiting if p.seq not in done)
                self.cond.notify_all()
