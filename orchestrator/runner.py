"""Schedule a planned sweep on Ray: each trial is a Ray Tune trial whose function runs a Ray Train
`TorchTrainer` (Train V2) with that trial's ScalingConfig; rank 0 logs into the trial's MLflow
child run, which the driver created and whose final status only the driver sets.

A sweep is one Tune run driven by orchestrator/scheduling.py: a trial starts as soon as its own
inputs are finished (a pipeline stage does not wait for unrelated trials), searched grid points
draw their trials as it goes, and ASHA may stop a drawn trial early (its run ends FINISHED with
tag `early_stopped=true`). A trial's child run is created when Tune takes it, so MLflow's start
and end times are when it ran. A failed trial skips everything downstream of it: those child runs
end KILLED with a `skip_reason` tag (MLflow has no SKIPPED status), while other branches carry on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.trials import Plan
from orchestrator.progress import ProgressBoard
from orchestrator.tracking import SweepTracker
from trainers.faults import ENV as FAULTS_ENV

log = logging.getLogger("orchestrator")


# --------------------------------------------------------------------------- inside Ray


def train_worker(config: dict) -> None:
    """Body of every Ray Train worker: run the trial with `trainers`, report progress to Ray."""
    from trainers import timeline

    timeline.mark("running", at=config.get("started_at"))
    timeline.mark("worker_started")
    import ray.train
    import ray.train.torch

    from orchestrator.tracking import TrialTracker
    from trainers.runtime import set_threads
    from trainers.trial import environment, run_trial
    from trainers.validate import from_container

    cfg = from_container(config["cfg"])
    set_threads(cfg.train.cpus_per_worker)  # before env.torch_threads is recorded
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Where this worker runs. On one machine several Ray nodes share an IP: the node id tells them apart.
    node_id = ray.get_runtime_context().get_node_id()
    node = {"node/ip": _node_ip(node_id), "node/id": node_id}
    timeline.mark("imported")

    progress = RayProgress(node, rank, world_size)
    tracker = TrialTracker(config["tracking_uri"], config["run_id"], rank, total_steps=cfg.train.max_steps,
                           report=progress.report if rank == 0 else None, hold=timeline.reached("first_step"))
    try:
        device = ray.train.torch.get_device() if cfg.train.use_gpu else None
        nodes = _worker_nodes(node, world_size)
        if rank == 0:
            env = {f"env.{k}": v for k, v in environment(cfg, device, inputs=config.get("inputs_env")).items()}
            tags = {"node_ip": node["node/ip"], "node_id": node["node/id"], **env, **config["git"]}
            if len(nodes) > 1:
                tags["worker_nodes"] = " ".join(f"rank{r}={n['node/ip']}/{n['node/id'][:8]}" for r, n in enumerate(nodes))
            tracker.set_tags(tags)
        tracker.log_metrics({}, step=0)  # the board shows the node at once
        metrics = run_trial(cfg, config["output_dir"], tracker=tracker, device=device,
                            prepared_dir=config.get("prepared_dir"))
        # Not "done": Tune reads that key as "stop this trial" and would kill the trial mid-shutdown.
        tracker.report_final({**metrics, "progress/step": cfg.train.max_steps, "progress/total": cfg.train.max_steps})
        tracker.close()
        progress.close()
    except BaseException:
        try:  # what the failed trial logged is kept; its failure, not the tracker's, is raised
            tracker.close(timeout_s=30)
        except Exception as err:
            log.warning("metrics of the failed trial not all recorded: %s", err)
        raise


class RayProgress:
    """ray.train.report from a background thread. Ray Train V2 accepts a report from any thread of
    the worker (its train context is per process; ray/train/v2/_internal/execution/context.py), but
    each report waits for the controller's poll (every 2 s) and is a collective of all ranks. So
    rank 0's tracker queues its progress (newest wins) and calls `report` from its queue thread;
    with several ranks it first tells the other ranks' threads (a broadcast), which report with it,
    report for report (Tune reads rank 0's metrics; the others send their node)."""

    REPORT, END = "report", "end of reports"

    def __init__(self, node: dict, rank: int, world_size: int):
        self.node, self.rank, self.world_size = node, rank, world_size
        self.thread = None
        if rank > 0:
            self.thread = threading.Thread(target=self._follow, name="ray-progress", daemon=True)
            self.thread.start()

    def report(self, metrics: dict) -> None:
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        if self.world_size > 1:
            broadcast_from_rank_zero(self.REPORT)
        ray.train.report({**metrics, **self.node})

    def _follow(self) -> None:
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        while broadcast_from_rank_zero(None) != self.END:
            ray.train.report(dict(self.node))

    def close(self, timeout_s: float = 60.0) -> None:
        """Rank 0 (after its tracker's last report) releases the other ranks' threads; they end."""
        if self.rank == 0 and self.world_size > 1:
            from ray.train.collective import broadcast_from_rank_zero

            broadcast_from_rank_zero(self.END)
        elif self.thread is not None:
            self.thread.join(timeout_s)


def _node_ip(node_id: str) -> str:
    """The address a node registered with (as `ray status` shows it); a worker's own guess at its
    IP is the machine's outbound address, which differs when nodes use --node-ip-address."""
    import ray

    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def _worker_nodes(node: dict, world_size: int) -> list[dict]:
    """The node of every rank, in rank order (a collective when there are several ranks)."""
    if world_size == 1:
        return [node]
    import torch.distributed as dist

    nodes: list = [None] * world_size
    dist.all_gather_object(nodes, node)
    return nodes


def ray_storage(location: str) -> dict:
    """RunConfig arguments for a storage location: a path, or a URI opened here (so that URIs
    with query parameters and fsspec-only schemes work as they do for trial outputs)."""
    from trainers import storage

    if not storage.is_remote(location):
        return {"storage_path": location}
    fs, path = storage.filesystem(location)
    return {"storage_path": path, "storage_filesystem": fs}


def tune_trial(config: dict) -> None:
    """Body of one Tune trial: a Ray Train run of `train_worker` with the trial's resources."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = {**config["trial"], "started_at": time.time()}  # RUNNING: time/start_s counts from here
    train = spec["cfg"]["train"]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=train["num_workers"], use_gpu=train["use_gpu"],
                                     resources_per_worker=spec["resources"]),
        torch_config=TorchConfig(backend="nccl" if train["use_gpu"] else "gloo"),
        run_config=RunConfig(name=f"train-{spec['key']}", **ray_storage(spec["ray_storage"]),
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=spec["max_failures"])),
    )
    trainer.fit()


# --------------------------------------------------------------------------- driver


@dataclass
class Outcome:
    states: dict[str, str] = field(default_factory=dict)  # trial key -> FINISHED | FAILED | SKIPPED | KILLED
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, s in self.states.items() if s != "FINISHED"]

    def merge(self, other: "Outcome") -> None:
        self.states.update(other.states)
        self.reasons.update(other.reasons)


def _short_error(trial) -> str:
    """Last meaningful line of a Tune trial's error, e.g. 'DataError: data.jsonl:3: ...'."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line[:500]
    return lines[-1][:500] if lines else "trial failed (no error text)"


class SweepEvents:
    """What the driver does when a trial starts, reports, finishes or fails: MLflow status, board."""

    def __init__(self, board: ProgressBoard, tracker: SweepTracker, run_ids: dict[str, str], outcome: Outcome,
                 checkpoints: Callable[[str], str] | None = None):
        self.board, self.tracker, self.run_ids, self.outcome = board, tracker, run_ids, outcome
        self.checkpoints = checkpoints  # trial key -> its checkpoint directory

    def __call__(self, event: str, key: str, fields: dict) -> None:
        if event == "created":  # the searcher made its child run (on the cluster, under Ray Client)
            self.run_ids[key] = fields["run_id"]
            self.tracker.open_runs.add(fields["run_id"])
            self.board.add(key, fields["label"])
        elif event == "skipped":  # its run already ended KILLED with the reason
            self.tracker.open_runs.discard(self.run_ids.get(key))
            self.outcome.states[key], self.outcome.reasons[key] = "SKIPPED", fields["reason"]
            self.board.update(key, state="SKIPPED", reason=fields["reason"])
        elif event == "complete" and fields.get("stopped_at") is not None:
            self.early_stopped(key, fields["stopped_at"])
        elif event == "start":
            self.tracker.set_status(self.run_ids[key], "RUNNING")
            self.board.update(key, state="RUNNING")
        elif event == "result":
            self.board.update(key, **fields)
        elif event == "complete":
            self.outcome.states[key] = "FINISHED"
            self.tracker.set_status(self.run_ids[key], "FINISHED")
            self.board.update(key, state="FINISHED")
        elif event == "error":
            reason = fields["reason"]
            self.outcome.states[key] = "FAILED"
            self.outcome.reasons[key] = reason
            self.tracker.set_status(self.run_ids[key], "FAILED", reason)
            self.board.update(key, state="FAILED", reason=reason[:120])

    def early_stopped(self, key: str, step: int) -> None:
        """ASHA stopped the trial: a finished run of fewer steps, without checkpoints to resume."""
        from trainers.storage import remove

        self.outcome.states[key] = "FINISHED"
        run_id = self.run_ids[key]
        self.tracker.client.set_tag(run_id, "early_stopped", "true")
        self.tracker.client.set_tag(run_id, "stopped_at_step", str(step))
        self.tracker.set_status(run_id, "FINISHED")
        if self.checkpoints is not None:
            remove(self.checkpoints(key))
        self.board.update(key, state="FINISHED", reason=f"early stopped at step {step}")


def _node_label(result: dict) -> str | None:
    """'10.0.0.5/3f2a9c1e': the node's IP and the start of its id (IPs repeat on one machine)."""
    if not result.get("node/id"):
        return None
    return f"{result.get('node/ip', '?')}/{result['node/id'][:8]}"


def _make_callback(send: Callable[[str, str, dict], None]):
    """A Tune callback that turns trial events into `send(event, trial key, fields)` calls."""
    from ray.tune import Callback

    class SweepCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            send("start", trial.config["trial"]["key"], {})

        def on_trial_result(self, iteration, trials, trial, result, **info):
            send("result", trial.config["trial"]["key"], {
                "step": int(result.get("progress/step", 0)), "total": int(result.get("progress/total", 0)),
                "loss": result.get("train/loss"), "tokens_per_s": result.get("train/tokens_per_s"),
                "node": _node_label(result)})

        swept = 0.0

        def on_step_end(self, iteration, trials, **info):
            # The CPUs of a trial Tune stopped come back once its controller is dead (below).
            if time.monotonic() - self.swept >= ORPHAN_SWEEP_S:
                self.swept = time.monotonic()
                release_orphaned_placement_groups()

        def on_trial_complete(self, iteration, trials, trial, **info):
            # A trial ASHA stopped ends without error before its last step.
            last = trial.last_result or {}
            step, total = int(last.get("progress/step", 0)), int(last.get("progress/total", 0))
            stopped_early = bool(total and step < total)
            send("complete", trial.config["trial"]["key"], {"stopped_at": step if stopped_early else None})

        def on_trial_error(self, iteration, trials, trial, **info):
            send("error", trial.config["trial"]["key"], {"reason": _short_error(trial)})

    return SweepCallback()


def _release_placement_group(group_id: str | None) -> None:
    """Removes a placement group; one removed already (by Ray Train, or another sweep) is no error."""
    if not group_id:
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group_id)))
    except Exception as err:  # already removed by Ray Train: nothing held
        log.debug("placement group %s: %s", group_id, err)


ORPHAN_SWEEP_S = 1.0  # how often the driver looks for placement groups of dead controllers


def release_orphaned_placement_groups() -> list[str]:
    """Removes the placement groups whose creator, an actor (a Ray Train controller), is dead, and
    returns their ids: how the CPUs of a trial Tune stopped (ASHA, a time limit) come back. Ray
    Train V2 leaves a killed run's worker group to a cleaner actor that asks Ray's State API
    whether the controller died; that API needs the dashboard, which a local Ray runs without, so
    the reservation outlived the trial and the trials after it waited forever (seen in
    peft_tuned). Nor would the group a worker last ran in be enough: a stopped trial's worker can
    die before its controller, which then retries (train.max_failures) and reserves a new group
    just before it is killed too (seen in auto_peft). A group whose creator is dead has no one
    left to use it, whichever it is. Reads the GCS tables directly (the public
    placement_group_table leaves out the creator); a failure to read them skips this sweep."""
    import ray._private.state as ray_state
    from ray.core.generated import gcs_pb2

    try:
        accessor = ray_state.state._connect_and_get_accessor()
        groups = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]
        released = []
        for group in groups:
            creator = group.creator_actor_id.hex()
            if (group.state == gcs_pb2.PlacementGroupTableData.REMOVED or group.is_detached
                    or not creator.strip("f")):  # a driver's (Tune's trial groups): the nil actor id
                continue
            if (ray_state.state.actor_table(creator) or {}).get("State") == "DEAD":
                _release_placement_group(group.placement_group_id.hex())
                released.append(group.placement_group_id.hex())
    except Exception as err:  # Ray moved its internals: Ray Train's own cleaner is all there is
        log.debug("placement groups of dead controllers not checked: %s", err)
        return []
    if released:
        log.info("released %d placement group(s) of stopped trials' controllers: %s", len(released),
                 ", ".join(g[:8] for g in released))
    return released


class _Relay:
    """Ray Client (`ray://`) runs Tune, and so its callbacks, in an actor on the cluster: they put
    their events on a Ray queue that a driver thread drains into the local handler."""

    def __init__(self, handle: Callable[[str, str, dict], None]):
        from ray.util.queue import Queue

        self.handle = handle
        self.queue = Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._pump, name="sweep-events", daemon=True)

    def sender(self) -> Callable[[str, str, dict], None]:
        queue = self.queue  # only the queue's handle travels to the cluster

        def send(event: str, key: str, fields: dict) -> None:
            queue.put((event, key, fields))

        return send

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while not self.stop.is_set():
            try:
                event = self.queue.get(timeout=1)
            except Empty:
                continue
            self.handle(*event)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        while not self.queue.empty():  # what arrived after the last poll
            self.handle(*self.queue.get_nowait())


def cluster_runtime_env() -> dict:
    """What a job on an existing cluster brings along. Nodes have the dependencies installed (the
    image, or `pip install .`); this tree's two packages are shipped with the job (py_modules, put
    first on sys.path), so the workers run the driver's code whatever version a node has, and no
    node needs a checkout (conf/ and sweeps/ are read by the driver only). Credentials are not
    sent: each node takes them from its own environment."""
    import orchestrator
    import trainers

    env_vars = {"RAY_TRAIN_V2_ENABLED": "1"}
    if os.environ.get(FAULTS_ENV):  # tests and chaos runs inject faults on every node
        env_vars[FAULTS_ENV] = os.environ[FAULTS_ENV]
    return {"py_modules": [str(Path(orchestrator.__file__).parent), str(Path(trainers.__file__).parent)],
            "excludes": ["__pycache__", "*.pyc", "*.partial"],
            "env_vars": env_vars}


def check_address(address: str | None) -> None:
    """Refuse, before anything runs, an address this driver cannot attach to."""
    import importlib.util

    from trainers.config import ConfigError

    if address and address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise ConfigError([("cluster.address", f"{address}: Ray Client needs grpcio: pip install 'ray[client]'")])
    # Ray sends its token to an address given explicitly only when RAY_AUTH_MODE=token; without it
    # a cluster with token authentication is reached only to fail 20-30 s later with a connection
    # timeout that does not mention auth. A token in the environment says which was meant.
    token_var = next((v for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if os.environ.get(v)), None)
    if address and address != "auto" and token_var and "RAY_AUTH_MODE" not in os.environ:
        raise ConfigError([("cluster.address", f"{address}: {token_var} is set but RAY_AUTH_MODE is not, so Ray "
                                               "would not send the token: export RAY_AUTH_MODE=token (or "
                                               "RAY_AUTH_MODE=disabled for a cluster without authentication)")])


def attach(plan: Plan) -> None:
    """Connect to `cluster.address` (the driver's data pass runs there before the sweep); connect
    then finds Ray initialized."""
    import ray

    if not ray.is_initialized():
        _driver_env()
        ray.init(address=plan.base.cluster.address, runtime_env=cluster_runtime_env(), **_init_kwargs())


def _driver_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ctrl-C must reach the orchestrator (which marks runs KILLED), not Tune's graceful stop.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


LOCAL_POLL_S = 0.25  # the Ray Train controller's poll of its workers on a local Ray (_local_env)


def _local_env() -> None:
    """A local Ray's processes inherit this environment. Each Ray Train run starts, beside its
    controller and workers, a preemption watcher (for nodes a cloud drains; one machine has none
    to drain) and reports Prometheus metrics (nothing scrapes a local Ray): on a 2-CPU machine the
    watcher's process start and imports take CPU from the trial's own start. A worker's
    `ray.train.report` returns when the controller next polls it (every 2 s by default), so a
    trial's first and last reports each wait up to a poll: polled every LOCAL_POLL_S instead (a
    local call, ~1 ms each), a trial ends sooner and ASHA hears its rung metrics sooner."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(LOCAL_POLL_S))


def _init_kwargs() -> dict:
    return dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False, configure_logging=True)


def connect(plan: Plan, log_dir: Path) -> str:
    """Start a local Ray or attach to `cluster.address`; returns where Ray's own logs are."""
    import ray

    cluster = plan.base.cluster
    _driver_env()
    if cluster.address:
        attach(plan)
    else:
        _local_env()
        ray.init(num_cpus=cluster.num_cpus, **_init_kwargs())
    session = ray.get_runtime_context().gcs_address
    try:
        from ray._private.worker import _global_node

        return str(Path(_global_node.get_session_dir_path()) / "logs")
    except Exception:
        return f"(ray session at {session})"


def run_sweep(plan: Plan, done: set[str], tracker: SweepTracker, run_ids: dict[str, str], storage: str,
              board: ProgressBoard, log_file: Path, finished_samples: dict[str, int] | None = None) -> Outcome:
    """Run the plan's trials (those in `done` finished earlier and are kept) and its searched
    trials as one Tune run; returns each one's final state. `run_ids` maps trial keys to the
    child runs they have; the others are created as Tune takes them (and added to it).

    `storage` is an absolute path every node sees, or a URI (s3://...): see trainers/storage.py.
    """
    import contextlib

    import ray
    from ray import tune

    from orchestrator.budget import asha_settings, shared_inputs
    from orchestrator.scheduling import PerGroupASHA, SweepSearcher
    from trainers.storage import join

    outcome = Outcome()
    events = SweepEvents(board, tracker, run_ids, outcome,
                         checkpoints=lambda key: join(storage, plan.experiment, key, "checkpoints"))
    relay = _Relay(events) if ray.util.client.ray.is_connected() else None
    send = relay.sender() if relay else events
    searcher = SweepSearcher(plan, done, run_ids, tracker, send, storage, finished_samples)
    sweep = plan.base.sweep
    scheduler = PerGroupASHA(**asha_settings(plan)) if sweep.scheduler == "asha" else None

    def trial_fn(config: dict) -> None:
        # with_resources sets an attribute on the function it gets. A module-level function
        # travels by name and arrives without it where Tune runs elsewhere (Ray Client runs Tune in
        # an actor on the cluster): each trial would then take a whole CPU and starve its own
        # workers. A nested function travels by value, attribute included.
        tune_trial(config)

    tuner = tune.Tuner(
        # The trial function only waits on its TorchTrainer; the workers hold the real resources.
        # (A bundle needs some resource: one byte of memory reserves nothing a worker needs.)
        tune.with_resources(trial_fn, {"CPU": 0, "memory": 1}),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=max(1, searcher.total),
                                    max_concurrent_trials=plan.max_concurrent or None),
        run_config=tune.RunConfig(
            name=f"{plan.sweep}-{time.strftime('%Y%m%d-%H%M%S')}",
            **ray_storage(join(storage, "ray")),
            callbacks=[_make_callback(send)],
            verbose=0,
        ),
    )
    # Tune prints its own banners even at verbose=0; they go to the log, the board to the console.
    # A local Tune draws in this thread: each draw's step cost (budget_unit=tokens|flops) reads the
    # data the plan prepared, once per distinct input for the whole sweep, not twice per draw.
    with (open(log_file, "a") as log, contextlib.redirect_stdout(log), relay or contextlib.nullcontext(),
          shared_inputs()):
        tuner.fit()
    # What never ran, or never reported its end.
    for key in [t.key for t in plan.trials if t.key not in done] + [k for k in run_ids if k not in done]:
        if key not in outcome.states:
            outcome.states[key] = "FAILED"
            outcome.reasons[key] = "trial ended without reporting completion"
            if run_ids.get(key) in tracker.open_runs:
                tracker.set_status(run_ids[key], "FAILED", outcome.reasons[key])
    return outcome
