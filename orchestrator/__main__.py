"""python -m orchestrator +sweep=NAME [KEY=VALUE ...]

Composes the sweep with Hydra, checks every trial and its data, then runs the trials on Ray
(a local Ray unless cluster.address is set), tracks them in MLflow and prints the comparison.
Exit code 0 only if every planned trial finished; 2 for bad input (nothing started); 1 for failed
trials. A trial a comparison skipped as inapplicable to the model (its reason in the plan, the table
and the parent run) was never planned to run: it does not count against exit 0.
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
  data.train_file=...    JSONL, JSON, CSV, Parquet, a saved dataset dir or hf:NAME[@REV][:SPLIT];
                         data.eval_file=... for eval loss and accuracy
  data.template=...      auto | model (the tokenizer's chat template) | plain
  storage.path=...       checkpoints and adapters: a directory every node sees, or s3://bucket/prefix
                         (default ./runs)
  sweep.seeds=[0,1,2]    one trial per seed for every grid point (default: [train.seed])
  sweep.on_inapplicable= skip (default: a comparison leaves out, with its reason, a method the
                         model cannot take) | error (refuse the sweep)
  sweep.memory_limit=24GiB  per device: leave out trials estimated over it (listed in the plan)
  promote=true           at the end, register the best trial (within sweep.memory_limit) in the MLflow Model Registry
                         (python -m orchestrator.promote SWEEP_NAME for other metrics and options)
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
    from orchestrator.runner import check_address
    from trainers.config import ConfigError
    from trainers.data import DataError

    # --- compose, validate, plan: nothing runs and nothing is tracked until all of it passes
    try:
        plan = make_plan(argv)
        check_address(plan.base.cluster.address)
        check_plan_inputs(plan)
    except (ConfigError, DataError) as err:
        _print_errors(err)
        return 2
    print(format_plan(plan), flush=True)
    if plan.base.dry_run:
        return 0
    return run(plan, argv)


def check_plan_inputs(plan) -> None:
    """Every trial's data prepared before anything runs (orchestrator/prepare.py)."""
    from orchestrator.prepare import check_plan_inputs as prepare_plan
    from orchestrator.runner import attach

    prepare_plan(plan, lambda: attach(plan))


def open_runs(plan, tracker, argv: list[str], storage: str) -> tuple[str, dict[str, str], set[str]]:
    """Parent run of this invocation, fresh or the unfinished previous one, with the child runs
    it already has (the runner creates the others as their trials start). A drawn trial (a
    searched grid point's) that did not finish is closed KILLED: the resumed sweep draws anew.

    Returns (parent run id, {trial key: child run id}, keys of trials already finished).
    """
    from trainers.storage import join, remove

    previous = tracker.find_unfinished_parent(plan.key) if plan.base.resume else None
    if previous is None:
        parent_id = tracker.start_parent(plan.sweep, argv, plan.key)
        tracker.record_skipped(parent_id, plan.skipped)
        for trial in plan.trials:  # a fresh run must not resume someone else's checkpoints
            remove(join(storage, plan.experiment, trial.key, "checkpoints"))
        return parent_id, {}, set()
    children = tracker.reopen(previous)
    tracker.record_skipped(previous.info.run_id, plan.skipped)
    planned = {t.key for t in plan.trials}
    run_ids, done = {}, set()
    for key, (run_id, status) in children.items():
        if status == "FINISHED":
            done.add(key)
            run_ids[key] = run_id
        elif key in planned:
            tracker.open_runs.add(run_id)
            tracker.set_status(run_id, "SCHEDULED")
            run_ids[key] = run_id
        elif status not in ("FAILED", "KILLED"):
            tracker.set_status(run_id, "KILLED", "a drawn trial the sweep did not finish; the resumed sweep draws anew")
    print(f"resuming sweep run {previous.info.run_id}: {len(done)} finished trial(s) kept, "
          f"{len(planned - done)} planned to run (resume=false starts over)")
    return previous.info.run_id, run_ids, done


def run(plan, argv: list[str]) -> int:
    import ray

    from orchestrator.plan import check_fit
    from orchestrator.progress import ProgressBoard
    from orchestrator.report import build_report, console_table
    from orchestrator.tuning import console as tuning_table, tunings
    from trainers.config import ConfigError
    from orchestrator.runner import Outcome, connect, run_sweep
    from orchestrator.tracking import SweepTracker

    from trainers.storage import is_remote, normalize

    storage = normalize(plan.base.storage.path)  # an absolute path, or a URI left as it is (s3://...)
    logs = Path("runs").resolve() if is_remote(storage) else Path(storage)  # the driver's log stays local
    log_file = logs / "logs" / f"{plan.sweep}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _setup_logging(log_file)
    tracker = SweepTracker(plan.base.tracking.uri, plan.experiment)
    parent_id, run_ids, done = open_runs(plan, tracker, argv, storage)

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    board = ProgressBoard({t.key: t.label for t in plan.trials})
    for key in done & set(board.lines):
        board.update(key, state="FINISHED", reason="(kept from the earlier run)")
    todo = [t for t in plan.trials if t.key not in done]
    try:
        print(f"MLflow: {tracker.uri} (experiment '{plan.experiment}', parent run {parent_id})")
        outcome = Outcome(states={k: "FINISHED" for k in done})
        if todo or plan.groups:  # a searched grid point may have draws left
            ray_logs = connect(plan, log_file.parent)
            signal.signal(signal.SIGTERM, terminate)  # ray.init installs its own (which aborts)
            print(f"logs: {log_file} ; Ray: {ray_logs}", flush=True)
            check_fit(todo, max(n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]),
                      "Ray node (its `memory` resource)")
            finished_samples = tracker.finished_samples(parent_id) if plan.groups and done else {}
            outcome.merge(run_sweep(plan, done, tracker, run_ids, storage, board, log_file, finished_samples))
    except ConfigError as err:  # a trial that fits no node of the cluster
        tracker.close_all("FAILED", str(err))
        _print_errors(err)
        return 2
    except KeyboardInterrupt:
        tracker.close_all("KILLED", "sweep interrupted")
        print("\ninterrupted: open MLflow runs marked KILLED; rerun the same command to resume", file=sys.stderr)
        return 130
    except BaseException as err:
        tracker.close_all("FAILED", f"orchestrator error: {err}")
        raise
    finally:
        board.close()
        if ray.is_initialized():
            ray.shutdown()

    failed = outcome.failed
    tracker.set_status(parent_id, "FAILED" if failed else "FINISHED")
    promoted, promote_error = promote_best(plan, tracker.uri, parent_id, failed)
    parent = tracker.client.get_run(parent_id)
    rows, _ = build_report(tracker.client, parent)
    print()
    print(console_table(rows))
    tuned = tunings([run for cell in rows for run in cell.runs])
    if tuned:
        print("\ntuning (best of each method's search beside its default settings):\n" + tuning_table(tuned))
    print(f"\nmlflow ui --backend-store-uri {tracker.uri}")
    if promoted:
        print(promoted)
    if promote_error:
        print(f"error: promote: {promote_error}", file=sys.stderr)
    if failed:
        labels = {key: line.label for key, line in board.lines.items()}  # drawn trials included
        for state in ("FAILED", "KILLED", "SKIPPED"):
            keys = [k for k in failed if outcome.states[k] == state]
            if keys:
                print(f"\n{len(keys)} trial(s) {state.lower()}: " + "; ".join(
                    f"{labels[k]} ({outcome.reasons.get(k, '')})" for k in keys), file=sys.stderr)
        return 1
    return 2 if promote_error else 0


def promote_best(plan, uri: str, parent_id: str, failed) -> tuple[str, str]:
    """With promote=true and every trial finished: register the best one (orchestrator.promote).
    Returns (what was promoted, why nothing was), one of them empty."""
    from orchestrator.promote import PromoteError, describe, promote

    if not plan.base.promote:
        return "", ""
    if failed:
        return "", "not every trial finished; choose with python -m orchestrator.promote " + plan.sweep
    try:
        return describe(promote(uri, plan.sweep, parent_id=parent_id)), ""
    except PromoteError as err:
        return "", str(err)


if __name__ == "__main__":
    sys.exit(main())
