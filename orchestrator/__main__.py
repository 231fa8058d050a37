"""python -m orchestrator +sweep=NAME [KEY=VALUE ...]

Composes the sweep with Hydra, checks every trial and its data, then runs the trials on Ray
(a local Ray unless cluster.address is set), tracks them in MLflow and prints the comparison.
Exit code 0 only if every trial finished; 2 for bad input (nothing started); 1 for failed trials.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

USAGE = """usage: python -m orchestrator [+sweep=NAME] [KEY=VALUE ...]

  +sweep=NAME            one of: {sweeps}
  dry_run=true           print the plan and start nothing
  cluster.address=...    auto | HOST:PORT | ray://HOST:10001 (default: start a local Ray)
  tracking.uri=...       MLflow store (default sqlite:///mlflow.db)
  model.name_or_path=... hub id or local directory (default: the embedded tiny model)
  data.train_file=...    JSONL; data.eval_file=... for eval loss and accuracy
  storage.path=...       checkpoints and adapters (default ./runs)
  GROUP=OPTION           config groups: {groups}
"""


def _print_errors(err) -> None:
    problems = getattr(err, "problems", None)
    if problems:
        for key, message in problems:
            print(f"error: {key}: {message}", file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)


def _setup_logging(log_file: Path) -> None:
    import mlflow  # noqa: F401  (configures its loggers on import; ours must come after)

    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("ray", "orchestrator", "mlflow", "alembic"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        from orchestrator.compose import CONF_DIR, available_sweeps

        groups = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "sweep")
        print(USAGE.format(sweeps=", ".join(available_sweeps()), groups=", ".join(groups)))
        return 0

    from orchestrator.plan import format_plan, make_plan
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.trial import check_inputs

    # --- compose, validate, plan: nothing runs and nothing is tracked until all of it passes
    try:
        plan = make_plan(argv)
        checked = set()
        for trial in plan.trials:
            data_key = (trial.cfg.model.name_or_path, repr(trial.cfg.data))
            if data_key not in checked:
                check_inputs(trial.cfg)
                checked.add(data_key)
    except (ConfigError, DataError) as err:
        _print_errors(err)
        return 2
    print(format_plan(plan), flush=True)
    if plan.base.dry_run:
        return 0
    return run(plan, argv)


def run(plan, argv: list[str]) -> int:
    import ray

    from orchestrator.progress import ProgressBoard
    from orchestrator.report import build_report, console_table
    from orchestrator.runner import connect, run_sweep
    from orchestrator.tracking import SweepTracker

    storage = Path(plan.base.storage.path).expanduser().resolve()
    log_file = storage / "logs" / f"{plan.sweep}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _setup_logging(log_file)
    tracker = SweepTracker(plan.base.tracking.uri, plan.experiment)
    parent_id = tracker.start_parent(plan.sweep, argv, "")
    run_ids = {t.key: tracker.create_child(t, t.config) for t in plan.trials}

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    board = ProgressBoard({t.key: t.label for t in plan.trials})
    try:
        ray_logs = connect(plan, log_file.parent)
        print(f"MLflow: {tracker.uri} (experiment '{plan.experiment}', parent run {parent_id})")
        print(f"logs: {log_file} ; Ray: {ray_logs}", flush=True)
        outcome = run_sweep(plan, tracker, run_ids, storage, board, log_file)
    except KeyboardInterrupt:
        tracker.close_all("KILLED", "sweep interrupted")
        print("\ninterrupted: open MLflow runs marked KILLED", file=sys.stderr)
        return 130
    except BaseException as err:
        tracker.close_all("FAILED", f"orchestrator error: {err}")
        raise
    finally:
        if ray.is_initialized():
            ray.shutdown()

    failed = outcome.failed
    tracker.set_status(parent_id, "FAILED" if failed else "FINISHED")
    parent = tracker.client.get_run(parent_id)
    rows, _ = build_report(tracker.client, parent)
    print()
    print(console_table(rows))
    print(f"\nmlflow ui --backend-store-uri {tracker.uri}")
    if failed:
        labels = {t.key: t.label for t in plan.trials}
        print(f"\n{len(failed)} trial(s) failed: " + "; ".join(f"{labels[k]} ({outcome.reasons.get(k, '')})"
                                                           for k in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
