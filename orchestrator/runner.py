"""Schedule a planned sweep on Ray: each trial is a Ray Tune trial whose function runs a Ray Train
`TorchTrainer` (Train V2) with that trial's ScalingConfig; rank 0 logs into the trial's MLflow
child run, which the driver created and whose final status only the driver sets.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.plan import Plan
from orchestrator.progress import ProgressBoard
from orchestrator.tracking import SweepTracker
from trainers.faults import ENV as FAULTS_ENV

log = logging.getLogger("orchestrator")

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- inside Ray


def train_worker(config: dict) -> None:
    """Body of every Ray Train worker: run the trial with `trainers`, report progress to Ray."""
    import ray.train
    import ray.train.torch

    from orchestrator.tracking import TrialTracker
    from trainers.config import from_container
    from trainers.trial import run_trial

    cfg = from_container(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    tracker = TrialTracker(config["tracking_uri"], config["run_id"], rank, report=ray.train.report,
                           total_steps=cfg.train.max_steps)
    if rank == 0:
        tracker.client.set_tag(config["run_id"], "node_ip", ray.util.get_node_ip_address())
    device = ray.train.torch.get_device() if cfg.train.use_gpu else None
    metrics = run_trial(cfg, config["output_dir"], tracker=tracker, device=device)
    # Not "done": Tune reads that key as "stop this trial" and would kill the trial mid-shutdown.
    ray.train.report({**metrics, "progress/step": cfg.train.max_steps, "progress/total": cfg.train.max_steps})


def tune_trial(config: dict) -> None:
    """Body of one Tune trial: a Ray Train run of `train_worker` with the trial's resources."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec = config["trial"]
    train = spec["cfg"]["train"]
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=train["num_workers"], use_gpu=train["use_gpu"],
                                     resources_per_worker=spec["resources"]),
        torch_config=TorchConfig(backend="nccl" if train["use_gpu"] else "gloo"),
        run_config=RunConfig(name=f"train-{spec['key']}", storage_path=spec["ray_storage"],
                             callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=spec["max_failures"])),
    )
    trainer.fit()


# --------------------------------------------------------------------------- driver


@dataclass
class Outcome:
    states: dict[str, str] = field(default_factory=dict)  # trial key -> FINISHED | FAILED | KILLED
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


def _make_callback(board: ProgressBoard, tracker: SweepTracker, run_ids: dict[str, str], outcome: Outcome):
    from ray.tune import Callback

    class SweepCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            key = trial.config["trial"]["key"]
            tracker.set_status(run_ids[key], "RUNNING")
            board.update(key, state="RUNNING")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            key = trial.config["trial"]["key"]
            board.update(key, step=int(result.get("progress/step", 0)), total=int(result.get("progress/total", 0)),
                         loss=result.get("train/loss"), tokens_per_s=result.get("train/tokens_per_s"))

        def on_trial_complete(self, iteration, trials, trial, **info):
            key = trial.config["trial"]["key"]
            outcome.states[key] = "FINISHED"
            tracker.set_status(run_ids[key], "FINISHED")
            board.update(key, state="FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):
            key = trial.config["trial"]["key"]
            reason = _short_error(trial)
            outcome.states[key] = "FAILED"
            outcome.reasons[key] = reason
            tracker.set_status(run_ids[key], "FAILED", reason)
            board.update(key, state="FAILED", reason=reason[:120])

    return SweepCallback()


def connect(plan: Plan, log_dir: Path) -> str:
    """Start a local Ray or attach to `cluster.address`; returns where Ray's own logs are."""
    import ray

    cluster = plan.base.cluster
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ctrl-C must reach the orchestrator (which marks runs KILLED), not Tune's graceful stop.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False,
                  configure_logging=True)
    if cluster.address:
        # Workers need the dependencies, not this checkout: ship our two packages.
        env_vars = {"RAY_TRAIN_V2_ENABLED": "1"}
        if os.environ.get(FAULTS_ENV):  # tests and chaos runs inject faults on every node
            env_vars[FAULTS_ENV] = os.environ[FAULTS_ENV]
        kwargs["runtime_env"] = {"py_modules": [str(REPO_ROOT / "orchestrator"), str(REPO_ROOT / "trainers")],
                                 "env_vars": env_vars}
        ray.init(address=cluster.address, **kwargs)
    else:
        ray.init(num_cpus=cluster.num_cpus, **kwargs)
    session = ray.get_runtime_context().gcs_address
    try:
        from ray._private.worker import _global_node

        return str(Path(_global_node.get_session_dir_path()) / "logs")
    except Exception:
        return f"(ray session at {session})"


def run_sweep(plan: Plan, trials: list, tracker: SweepTracker, run_ids: dict[str, str], storage: Path,
              board: ProgressBoard, log_file: Path) -> Outcome:
    """Run `trials` (of `plan`) as Ray Tune trials; returns each one's final state."""
    import contextlib

    from ray import tune

    outcome = Outcome()
    specs = []
    for trial in trials:
        specs.append({
            "key": trial.key,
            "cfg": trial.config,
            "run_id": run_ids[trial.key],
            "tracking_uri": tracker.uri,
            "output_dir": str(storage / plan.experiment / trial.key),
            "ray_storage": str(storage / "ray"),
            "resources": trial.resources,
            "max_failures": plan.base.cluster.max_failures,
        })
    tuner = tune.Tuner(
        # The trial function only waits on its TorchTrainer; the workers hold the real resources.
        # (A bundle needs some resource: one byte of memory reserves nothing a worker needs.)
        tune.with_resources(tune_trial, {"CPU": 0, "memory": 1}),
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent or 0, num_samples=1),
        run_config=tune.RunConfig(
            name=f"{plan.sweep}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage / "ray"),
            callbacks=[_make_callback(board, tracker, run_ids, outcome)],
            verbose=0,
        ),
    )
    # Tune prints its own banners even at verbose=0; they go to the log, the board to the console.
    with open(log_file, "a") as log, contextlib.redirect_stdout(log):
        tuner.fit()
    for trial in trials:
        if trial.key not in outcome.states:
            outcome.states[trial.key] = "FAILED"
            outcome.reasons[trial.key] = "trial ended without reporting completion"
    return outcome
