"""Metrics leave the training thread through a bounded queue (trainers/tracking.py MetricQueue) and
reach MLflow (orchestrator/tracking.py TrialTracker) in order, once, or fail the trial with the
reason: the queue's rules on plain sinks, then a real SQLite store (resume) and a real
`mlflow server` that stops answering mid-trial (SIGSTOP).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from orchestrator.tracking import SweepTracker, TrialTracker
from trainers.config import ConfigError
from trainers.tracking import MetricQueue, TrackingError


def steps_written(batches: list) -> list:
    return [p.step for batch in batches for p in batch]


def test_queue_writes_every_point_in_order_in_batches():
    batches = []
    queue = MetricQueue("sink", batches.append, max_batch=7, gather_s=0.5)
    for step in range(1, 101):
        queue.put({"train/loss": 1.0 / step}, step)
    queue.put_final({"eval/loss": 0.5}, timeout_s=10)
    assert steps_written(batches) == list(range(1, 101)) + [None]
    assert max(len(b) for b in batches) <= 7 and len(batches) < 101  # batched, not one write per point
    queue.close(timeout_s=5)


def test_per_step_points_are_gathered_into_one_write():
    """A write holds the GIL a training step needs: points a step apart go out together."""
    batches = []
    queue = MetricQueue("sink", batches.append, gather_s=2.0)
    for step in range(1, 21):
        queue.put({"train/loss": 1.0}, step)
        time.sleep(0.01)
    queue.wait(timeout_s=10)  # a flush does not wait out the gathering
    assert steps_written(batches) == list(range(1, 21)) and len(batches) == 1
    queue.close(timeout_s=5)


def test_gathered_per_step_points_do_not_wake_the_writer_each():
    """Every wake-up of the writer is a GIL hand-off the training thread waits out on a busy box:
    a second's per-step points wake it once (the first), not once each."""
    batches, wakeups = [], []
    queue = MetricQueue("sink", batches.append, gather_s=1.0)
    notify = queue.cond.notify_all
    queue.cond.notify_all = lambda: (wakeups.append(1), notify())
    for step in range(1, 101):
        queue.put({"train/loss": 1.0}, step)
    assert len(wakeups) <= 2
    queue.wait(timeout_s=10)
    assert steps_written(batches) == list(range(1, 101))
    queue.close(timeout_s=5)


def test_a_held_writer_starts_at_its_event_or_for_a_waiter():
    """A Ray worker holds MLflow writes until its first step; a flush, a final metric or close()
    does not wait for that."""
    from trainers import timeline

    timeline.clear()
    batches = []
    queue = MetricQueue("sink", batches.append, gather_s=0.1, hold=timeline.reached("first_step"))
    queue.put({"env.torch": "2"}, None, kind="tags")
    queue.put({"train/loss": 1.0}, 1)
    time.sleep(0.6)
    assert batches == []  # held
    timeline.mark("first_step")
    queue.wait(timeout_s=10)
    assert steps_written(batches) == [None, 1]
    timeline.clear()

    held = MetricQueue("sink", batches.append, gather_s=0.1, hold=threading.Event())  # never released
    held.put({"train/loss": 2.0}, 2)
    held.put_final({"eval/loss": 0.5}, timeout_s=10)  # a waiter: written without the event
    assert steps_written(batches)[-2:] == [2, None]
    held.put({"train/loss": 3.0}, 3)
    held.close(timeout_s=10)
    assert steps_written(batches)[-1] == 3


def test_queue_drops_oldest_per_step_points_beyond_its_bound_with_a_warning(caplog):
    release, batches = threading.Event(), []

    def stuck_sink(points):  # a sink that stops answering until released
        release.wait(30)
        batches.append(points)

    queue = MetricQueue("sink", stuck_sink, max_points=10, max_batch=1)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="trainers.tracking"):
        queue.put({"x": 0.0}, None)  # a final point: never dropped
        for step in range(1, 51):
            queue.put({"x": float(step)}, step)
    assert time.perf_counter() - started < 5  # put never waited for the stuck sink
    assert any("dropping the oldest per-step points beyond 10" in r.message for r in caplog.records)
    release.set()
    queue.close(timeout_s=10)
    written = steps_written(batches)
    assert written[0] is None and written[1:] == list(range(41, 51))


def test_final_metrics_are_retried_until_written():
    attempts, batches = [], []

    def flaky_sink(points):
        attempts.append(1)
        if len(attempts) <= 2:
            raise ConnectionError("server restarting")
        batches.append(points)

    queue = MetricQueue("sink", flaky_sink)
    queue.put_final({"eval/loss": 0.5}, timeout_s=20)
    assert len(attempts) == 3 and steps_written(batches) == [None]
    queue.close(timeout_s=5)


def test_final_metrics_that_cannot_be_written_fail_with_the_reason():
    def down(points):
        raise ConnectionError("Connection refused: mlflow at 127.0.0.1:5000")

    queue = MetricQueue("mlflow", down)
    queue.put({"train/loss": 1.0}, 1)
    with pytest.raises(TrackingError, match="final metrics not recorded.*eval/loss.*Connection refused"):
        queue.put_final({"eval/loss": 0.5}, timeout_s=1.5)
    with pytest.raises(TrackingError):
        queue.close(timeout_s=0.1)  # and its thread gives up


def test_progress_feed_keeps_the_newest_point_and_every_pinned_one():
    """Ray's progress: a stale train window is replaced by a newer one, but every eval/loss (what
    ASHA decides on) is delivered, in order, and a second one waits until the first is delivered."""
    taken, release, delivered = threading.Event(), threading.Event(), []

    def slow_report(points):  # Ray takes a report per controller poll
        taken.set()
        release.wait(30)
        delivered.extend((p.step, sorted(p.metrics)) for p in points)

    queue = MetricQueue("ray", slow_report, max_batch=1, coalesce=True, pinned=lambda m: "eval/loss" in m)
    queue.put({"train/loss": 1.0}, 1)
    assert taken.wait(10)  # in flight, held by the slow consumer
    for step in (2, 3, 4):
        queue.put({"train/loss": 1.0, "train/lr": 0.1}, step)
    queue.put({"eval/loss": 2.0}, 4)
    queue.put({"train/loss": 1.0, "train/lr": 0.1}, 5)
    release.set()
    queue.put({"eval/loss": 1.5}, 8)  # returns once eval/loss of step 4 is delivered
    assert (4, ["eval/loss"]) in delivered
    queue.close(timeout_s=10)
    assert delivered == [(1, ["train/loss"]), (4, ["eval/loss"]), (5, ["train/loss", "train/lr"]), (8, ["eval/loss"])]


def test_a_trials_last_report_replaces_the_waiting_progress_and_keeps_its_values():
    """The last report (no step) does not queue behind a stale progress point: each delivery waits
    for a controller poll. It carries the newest waiting values under its own; a pinned eval/loss
    waiting before it is still delivered first."""
    taken, release, delivered = threading.Event(), threading.Event(), []

    def slow_report(points):
        taken.set()
        release.wait(30)
        delivered.extend((p.step, dict(p.metrics)) for p in points)

    queue = MetricQueue("ray", slow_report, max_batch=1, coalesce=True, pinned=lambda m: "eval/loss" in m)
    queue.put({"train/loss": 3.0}, 1)
    assert taken.wait(10)
    queue.put({"eval/loss": 2.5}, 2)
    queue.put({"train/loss": 2.0, "progress/step": 9}, 9)
    final = threading.Thread(target=queue.put_final, args=({"eval/loss": 1.0, "progress/step": 10},))
    final.start()
    release.set()
    final.join(10)
    queue.close(timeout_s=10)
    assert delivered == [(1, {"train/loss": 3.0}), (2, {"eval/loss": 2.5}),
                         (None, {"train/loss": 2.0, "progress/step": 10, "eval/loss": 1.0})]


def test_a_gathered_progress_feed_reports_at_most_once_a_gather_interval_but_a_rung_at_once():
    """Ray's progress with gather_s: a report per step would be Python work beside every step;
    at most one per interval goes out, the newest, while a pinned eval/loss is not held back."""
    writes = []
    queue = MetricQueue("ray", writes.extend, max_batch=1, coalesce=True, pinned=lambda m: "eval/loss" in m,
                        gather_s=0.5)
    started = time.time()
    step = 0
    while time.time() - started < 1.2:
        step += 1
        queue.put({"train/loss": 1.0 / step}, step)
        time.sleep(0.005)
    queue.put({"eval/loss": 2.0}, step)
    queue.wait(timeout_s=10)  # the rung's point is written without waiting out the interval
    queue.close(timeout_s=10)
    stepped = [p for p in writes if "train/loss" in p.metrics]
    assert step > 50 and 1 <= len(stepped) <= 4  # ~every 0.5 s, not once a step
    assert writes[-1].metrics == {"eval/loss": 2.0}


def test_log_every_below_one_is_refused_naming_the_key():
    from orchestrator.plan import make_plan

    with pytest.raises(ConfigError) as err:
        make_plan(["+sweep=lora_rank", "train.log_every=0"])
    assert ("train.log_every", "must be > 0, got 0") in err.value.problems


def test_resumed_trial_logs_no_step_twice(tmp_path):
    """A resumed trial replays the steps after its checkpoint; MLflow keeps one point per step, eval
    points past the last train/loss included."""
    from orchestrator.plan import make_plan

    plan = make_plan(["+sweep=lora_rank", "sweep.axes={method.r:[4]}"])
    sweep = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    sweep.start_parent("resume", [], "k")
    run_id = sweep.create_child(plan.trials[0], plan.trials[0].config)
    with TrialTracker(sweep.uri, run_id, 0) as first:
        for step in range(1, 11):
            first.log_metrics({"train/loss": 1.0}, step=step)
        first.log_metrics({"eval/loss": 2.0}, step=12)  # evaluated, then the worker died before step 13's log
    with TrialTracker(sweep.uri, run_id, 0) as resumed:  # replays from the checkpoint at step 8
        for step in range(9, 17):
            resumed.log_metrics({"train/loss": 0.5}, step=step)
            if step % 4 == 0:
                resumed.log_metrics({"eval/loss": 1.0}, step=step)
        resumed.log_metrics({"eval/loss": 0.9})
    losses = sweep.client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, 11)) + [13, 14, 15, 16]
    evals = [(m.step, m.value) for m in sweep.client.get_metric_history(run_id, "eval/loss")]
    assert sorted(evals) == [(0, 0.9), (12, 2.0), (16, 1.0)]


def _server_group(uri: str) -> int:
    """Process group of the `mlflow server` listening at uri (tests/servers.py starts it in its own)."""
    import psutil

    port = int(uri.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return os.getpgid(conn.pid)
    raise RuntimeError(f"no process listens on {port}")


class StopsServerAt(TrialTracker):
    """The real tracker; the server stops answering (SIGSTOP) when step `at` is logged. Records
    how long the training loop's log calls took: a write on the loop's thread would hang."""

    def __init__(self, *args, group: int, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.group, self.at, self.call_s = group, at, []

    def log_metrics(self, metrics, step=None):
        if step == self.at:
            self.flush()  # the steps before are in the store (they gather up to 1 s before a write)
            os.killpg(self.group, signal.SIGSTOP)
        started = time.perf_counter()
        super().log_metrics(metrics, step)
        if step is not None:
            self.call_s.append(time.perf_counter() - started)


def test_a_server_that_stops_answering_neither_stalls_training_nor_passes_silently(tmp_path, make_cfg, monkeypatch,
                                                                                   caplog):
    from servers import mlflow_server

    from trainers.trial import run_trial

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = make_cfg("train.max_steps=12", "train.log_every=1", "train.checkpoint_every=0", "data.max_eval_rows=8",
                   "data.max_train_rows=64", "data.max_new_tokens=4")
    with mlflow_server(tmp_path) as (uri, _):
        sweep = SweepTracker(uri, "stalled")
        sweep.start_parent("stalled", [], "k")
        run_id = sweep.client.create_run(sweep.experiment_id).info.run_id
        group = _server_group(uri)
        tracker = StopsServerAt(uri, run_id, 0, group=group, at=4, timeout_s=4, max_points=3)
        try:
            with caplog.at_level(logging.WARNING), pytest.raises(TrackingError, match="not recorded after"):
                run_trial(cfg, tmp_path / "trial", tracker=tracker)
        finally:
            os.killpg(group, signal.SIGCONT)
        assert len(tracker.call_s) == 12 and max(tracker.call_s) < 5  # none waited for a request hanging 10 s
        assert any("dropping the oldest per-step points" in r.message for r in caplog.records)
        tracker.close(timeout_s=30)  # the server answers again: the newest points are written
        steps = sorted(m.step for m in sweep.client.get_metric_history(run_id, "train/loss"))
        assert steps[:3] == [1, 2, 3] and steps[-3:] == [10, 11, 12] and len(steps) < 12


CHILD = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # what a Ray worker does with SIGTERM
from orchestrator.tracking import TrialTracker
tracker = TrialTracker(sys.argv[1], sys.argv[2], 0, timeout_s=60)
tracker.log_metrics({"model/trainable_params": 10.0})  # written: the store answers
print("started", flush=True)
sys.stdin.readline()  # the store is locked now
for step in range(1, 51):
    tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
print("logged", flush=True)
time.sleep(600)
"""


def test_sigterm_writes_what_is_queued(tmp_path):
    """The store is locked (another writer holds it) while a worker logs, then the worker gets
    SIGTERM: its queued points are still written once the store frees up."""
    import sqlite3
    import subprocess
    import sys
    from pathlib import Path

    db = tmp_path / "mlflow.db"
    sweep = SweepTracker(f"sqlite:///{db}", "sigterm")
    run_id = sweep.client.create_run(sweep.experiment_id).info.run_id
    repo = Path(__file__).resolve().parent.parent
    child = subprocess.Popen([sys.executable, "-c", CHILD, sweep.uri, run_id], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert child.stdout.readline().strip() == "started"
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "logged"
        child.send_signal(signal.SIGTERM)
        time.sleep(1)
    finally:
        lock.execute("COMMIT")
        lock.close()
    assert child.wait(timeout=120) == 1
    steps = [m.step for m in sweep.client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 51))
