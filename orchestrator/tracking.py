"""MLflow bookkeeping: one parent run per sweep invocation, one child run per trial.

The driver creates every run and sets every final status, so a worker that dies cannot leave a
run RUNNING. Rank 0 of each trial logs its metrics and artifacts into the child run it is given
(`TrialTracker`); other ranks only report progress to Ray.

Names are the contract (README, "MLflow contract"): parent tag `sweep`; child tags `mlflow.parentRunId`,
`stage`, `method`, `trial_key`; params are the resolved config flattened with dotted keys.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from trainers.config import flatten
from trainers.tracking import FLUSH_TIMEOUT_S, MetricQueue, Tracker, TrackingError

log = logging.getLogger("orchestrator")

SECRET_KEY = re.compile(r"(token|password|passwd|secret|api_?key|access_?key|credential)", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
TERMINAL = ("FINISHED", "FAILED", "KILLED")
# Parent run: the trials a comparison left out as inapplicable to the model (orchestrator/plan.py).
SKIPPED_TAG, SKIPPED_FILE = "skipped_trials", "skipped_trials.json"
# Why the plan left a trial out (orchestrator.trials.SkippedTrial.state): its row's status in the report.
SKIP_STATES = {"INAPPLICABLE": "inapplicable to the model", "OVER_MEMORY_LIMIT": "over sweep.memory_limit"}


def skipped_summary(skipped) -> str:
    """'1 inapplicable to the model, 2 over sweep.memory_limit' of SkippedTrials (or report rows)."""
    counts = Counter(getattr(t, "state", None) or getattr(t, "status") for t in skipped)
    return ", ".join(f"{counts[state]} {what}" for state, what in SKIP_STATES.items() if counts[state])


def absolute_uri(uri: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/relative.db, so every process finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def redact(value: Any) -> Any:
    if isinstance(value, str):
        return URL_CREDENTIALS.sub(lambda m: m.group("scheme") + "***@", value)
    return value


def config_params(config: dict) -> dict[str, str]:
    """Dotted params of a resolved config; secret-looking keys dropped, URL credentials masked."""
    params = {}
    for key, value in flatten(config).items():
        if SECRET_KEY.search(key.rsplit(".", 1)[-1]):
            continue
        params[key] = "null" if value is None else str(redact(value))[:6000]
    return params


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """`env.git_commit` and `env.git_dirty` (uncommitted or untracked files) of this checkout; on a
    cluster the workers run the driver's tree (runtime_env py_modules), so this is their code too."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                                timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"env.git_commit": "unknown (not a git checkout)", "env.git_dirty": "unknown"}
    return {"env.git_commit": commit, "env.git_dirty": "true" if status.strip() else "false"}


def replay_command(uri: str, run_id: str) -> str:
    """One line that reruns a trial in a plain process from the config.yaml its run logged."""
    where = f"replay-{run_id[:8]}"
    return (f"MLFLOW_TRACKING_URI={shlex.quote(redact(uri))} mlflow artifacts download --run-id {run_id} "
            f"--artifact-path config.yaml --dst-path {where} && "
            f"python -m trainers --config {where}/config.yaml --output-dir {where}")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


class SweepTracker:
    """Driver-side: creates the parent and child runs and owns their statuses."""

    def __init__(self, uri: str, experiment: str):
        self.uri = absolute_uri(uri)
        self.client = client(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=self._artifact_root())
        else:
            self.experiment_id = found.experiment_id
        self.parent_id: str | None = None
        self.open_runs: set[str] = set()
        self.git = git_state()

    def _artifact_root(self) -> str | None:
        """Artifact location of a new experiment. A sqlite store keeps artifacts beside the database,
        as an absolute path every worker shares. Anything else gets the store's default (None): for
        an MLflow server (http://) that is the server's, which with --serve-artifacts is
        `mlflow-artifacts:/`, so every worker uploads through the server, not to its own disk."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
        return None

    def start_parent(self, sweep: str, overrides: list[str], plan_key: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{sweep}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"sweep": sweep, "plan_key": plan_key, **self.git},
        )
        self.parent_id = run.info.run_id
        self.open_runs.add(self.parent_id)
        _log_params(self.client, self.parent_id, {"overrides": " ".join(redact(o) for o in overrides) or "(none)"})
        return self.parent_id

    def record_skipped(self, run_id: str, skipped) -> None:
        """The plan's skipped trials (orchestrator.trials.SkippedTrial) on the parent run: tag
        `skipped_trials` says how many and which (the MLflow UI's runs list), artifact
        skipped_trials.json holds each one's label, reason, overrides and config params (what
        orchestrator.report rebuilds their rows from)."""
        if not skipped:
            return
        records = [{"label": t.label, "method": t.cfg.method.name, "stage": t.cfg.stage.name, "reason": t.reason,
                    "state": t.state, "overrides": " ".join(t.overrides), "params": config_params(t.config)}
                   for t in skipped]
        self.client.log_dict(run_id, records, SKIPPED_FILE)
        summary = f"{skipped_summary(skipped)}, see {SKIPPED_FILE}: " + "; ".join(t.label for t in skipped)
        self.client.set_tag(run_id, SKIPPED_TAG, summary[:5000])

    def find_unfinished_parent(self, plan_key: str):
        """Newest parent run of the same plan that did not finish (killed driver, failed trials)."""
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.plan_key = '{plan_key}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def reopen(self, parent) -> dict[str, tuple[str, str]]:
        """Resume a parent run; returns {trial_key: (child run id, status)} of its children."""
        self.parent_id = parent.info.run_id
        self.client.update_run(self.parent_id, status="RUNNING")
        self.open_runs.add(self.parent_id)
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=5000)
        found = {}
        for child in children:
            key = child.data.tags.get("trial_key")
            if key:
                found[key] = (child.info.run_id, child.info.status)
        return found

    def __getstate__(self) -> dict:
        # Under Ray Client the sweep's searcher, which creates child runs, runs on the cluster:
        # it takes the tracker along and opens its own connection to the store.
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.client = client(self.uri)

    def finished_samples(self, parent_id: str) -> dict[str, int]:
        """Searched grid point key -> its drawn trials that finished under `parent_id`."""
        children = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                "attributes.status = 'FINISHED'", max_results=5000)
        counts: dict[str, int] = {}
        for child in children:
            group, sample = child.data.tags.get("search_group_key"), child.data.tags.get("sample")
            if group and sample != "default":
                counts[group] = counts.get(group, 0) + 1
        return counts

    def create_child(self, trial, config: dict, input_run_ids: list[str] = (), tags: dict | None = None) -> str:
        """The child run of a trial; `input_run_ids` are the runs of the trials it starts from
        (a pipeline stage), tagged `input_run_id` as a comma-separated list; `tags` are added."""
        inputs = {"input_run_id": ",".join(input_run_ids)} if input_run_ids else {}
        inputs.update(tags or {})
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial.label,
            tags={"mlflow.parentRunId": self.parent_id, "stage": trial.cfg.stage.name,
                  "method": trial.cfg.method.name, "trial_key": trial.key,
                  "overrides": " ".join(trial.overrides), **inputs, **self.git},
        )
        run_id = run.info.run_id
        self.client.set_tag(run_id, "replay", replay_command(self.uri, run_id))
        self.open_runs.add(run_id)
        _log_params(self.client, run_id, config_params(config))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "config.yaml")
            with open(path, "w") as handle:
                yaml.safe_dump(config, handle, sort_keys=False)
            self.client.log_artifact(run_id, path)
        self.client.update_run(run_id, status="SCHEDULED")
        return run_id

    def set_status(self, run_id: str, status: str, reason: str | None = None) -> None:
        if reason:
            self.client.set_tag(run_id, "failure_reason", reason[:5000])
        if status in TERMINAL:
            self.client.set_terminated(run_id, status=status)
            self.open_runs.discard(run_id)
        else:
            self.client.update_run(run_id, status=status)

    def skip(self, run_id: str, reason: str) -> None:
        """End a trial that will not run (an upstream failed): KILLED, since MLflow has no SKIPPED
        status, with the reason in tag `skip_reason` (the report shows it as SKIPPED)."""
        self.client.set_tag(run_id, "skip_reason", reason[:5000])
        self.set_status(run_id, "KILLED")

    def close_all(self, status: str, reason: str | None = None) -> None:
        """Give every run this driver opened a terminal status (children first, then the parent)."""
        for run_id in sorted(self.open_runs, key=lambda r: r == self.parent_id):
            try:
                self.set_status(run_id, status, reason if run_id != self.parent_id else None)
            except Exception:  # the store may be gone; keep closing the rest
                pass


class TrialTracker(Tracker):
    """Worker-side: rank 0 logs into its child run; rank 0's progress goes to Ray (`report`).

    Neither blocks a training step: both go through a MetricQueue (trainers/tracking.py) drained
    by a background thread. MLflow gets every point, in batches (a server that stops answering
    loses the oldest per-step points beyond `max_points`, with a warning); Ray gets the newest
    progress, and every eval/loss (what ASHA decides on) in order. Final metrics (no step) are
    written before log_metrics returns, retried until `timeout_s`, else TrackingError fails the
    trial. close() (also run at interpreter exit: Ray turns a worker's SIGTERM into one) writes
    what is queued. `hold` (an Event): MLflow writes wait for it, or for a flush, a final metric,
    a checkpoint or close() (a Ray worker passes its first step: see MetricQueue).
    """

    def __init__(self, uri: str, run_id: str, rank: int, report=None, total_steps: int | None = None,
                 timeout_s: float = FLUSH_TIMEOUT_S, max_points: int = 10_000, hold: threading.Event | None = None):
        from orchestrator.search import METRIC

        self.uri, self.run_id, self.rank = uri, run_id, rank
        self.total_steps, self.timeout_s = total_steps, timeout_s
        self._client, self._client_lock = None, threading.Lock()
        self.mlflow = (MetricQueue("mlflow", self._write_mlflow, max_points, gather_s=1.0, hold=hold)
                       if rank == 0 else None)
        self.report = report
        # Ray's progress: the newest point at most once a second (each report is Python work beside
        # the training thread; the board redraws about as often), a rung's eval/loss and the last
        # report at once.
        self.progress = MetricQueue("ray progress", self._write_progress, max_batch=1, coalesce=True,
                                    pinned=lambda metrics: METRIC in metrics,
                                    gather_s=1.0) if report is not None else None
        # A resumed trial replays the steps after its last checkpoint: each step is written once.
        self.logged_up_to: int | None = None  # the run's last step in the store, read by the first write
        self.written_seq = 0  # the last point written: a retried batch skips what went through
        atexit.register(self.close)

    @property
    def client(self):
        """Rank 0's MLflow client, made on first use, normally by the writer thread: importing
        mlflow and asking the store where a resumed run got to cost seconds the start of a trial
        need not wait for."""
        if self.rank != 0:
            return None
        with self._client_lock:
            if self._client is None:
                self._client = client(self.uri)
            return self._client

    def _last_logged_step(self) -> int:
        keys = self.client.get_run(self.run_id).data.metrics
        return max((m.step for key in keys for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.mlflow is not None and step is None:
            self.mlflow.put_final(metrics, self.timeout_s)
        elif self.mlflow is not None and metrics:
            self.mlflow.put(metrics, step)
        if step is not None and self.progress is not None:
            seq = self.progress.put({**metrics, "progress/step": step, "progress/total": self.total_steps or 0}, step)
            if self.progress.pinned(metrics):  # a rung's metric: Tune has it (may stop the trial) first
                self.progress.wait(seq, self.timeout_s)

    def report_final(self, metrics: dict) -> None:
        """The trial's last Ray report (after every progress report), waited for."""
        if self.progress is not None:
            self.progress.put_final(metrics, self.timeout_s)

    def _write_mlflow(self, points) -> None:
        """Writes in order, up to 900 metrics per log_batch (MLflow takes 1000, tags 100); after a
        failed call the retry starts after the last point that went through."""
        from mlflow.entities import Metric, RunTag

        if self.logged_up_to is None:
            self.logged_up_to = self._last_logged_step()
        chunk: list = []
        for point in [p for p in points if p.seq > self.written_seq]:
            if point.kind == "tags":
                self._send(chunk, point.seq - 1)
                tags = [RunTag(k, str(v)[:5000]) for k, v in point.metrics.items()]
                for start in range(0, len(tags), 100):
                    self.client.log_batch(self.run_id, tags=tags[start:start + 100])
            elif point.step is None or point.step > self.logged_up_to:
                chunk += [Metric(k, float(v), point.timestamp_ms, point.step or 0) for k, v in point.metrics.items()]
            if len(chunk) >= 900 or point.kind == "tags":
                self._send(chunk, point.seq)
        self._send(chunk, points[-1].seq)

    def _send(self, chunk: list, seq: int) -> None:
        if chunk:
            self.client.log_batch(self.run_id, metrics=chunk)
            chunk.clear()
        self.written_seq = max(self.written_seq, seq)

    def _write_progress(self, points) -> None:
        for point in points:
            self.report(point.metrics)

    def flush(self, timeout_s: float | None = None) -> None:
        for queue in (self.mlflow, self.progress):
            if queue is not None:
                queue.wait(timeout_s=self.timeout_s if timeout_s is None else timeout_s)

    def settle(self) -> None:
        if self.mlflow is not None and not self.mlflow.settle(self.timeout_s):
            log.warning("metrics before this checkpoint not all recorded yet (%s): a resume from it may miss "
                        "some earlier points", self.mlflow.error or "the store is slow")

    def close(self, timeout_s: float | None = None) -> None:
        atexit.unregister(self.close)
        for queue in (self.mlflow, self.progress):
            if queue is not None:
                queue.close(self.timeout_s if timeout_s is None else timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        """Uploads now (a trial's outputs, once, at its end), retried until `timeout_s`."""
        if self.client is None:
            return
        deadline, wait = time.monotonic() + self.timeout_s, 0.5
        while True:
            try:
                return self.client.log_artifacts(self.run_id, local_dir, artifact_path)
            except Exception as err:
                if time.monotonic() + wait > deadline:
                    raise TrackingError(f"artifacts {artifact_path}/ not recorded after {self.timeout_s:.0f} s: "
                                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
                time.sleep(wait)
                wait = min(5.0, wait * 2)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queued like final metrics: written in order, never dropped, without waiting here."""
        if self.mlflow is not None:
            self.mlflow.put(tags, None, kind="tags")
