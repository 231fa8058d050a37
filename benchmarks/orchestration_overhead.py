"""What the orchestrator costs: a sweep through `python -m orchestrator` on a local Ray beside the
same trials run one by one in plain processes (`python -m trainers --config TRIAL.yaml`).

    python benchmarks/orchestration_overhead.py [--trials 4] [--steps 20] [--repeats 2]

The sweep is lora_rank with `--trials` ranks (1, 2, 4, ...), `--steps` optimizer steps each and
a small eval (data.max_eval_rows=32), one trial at a time (cluster.max_concurrent_trials=1, so
both sides do the same work in sequence); every invocation gets a fresh MLflow store and storage
directory. The plain side runs the very configs the orchestrator's plan resolves
(orchestrator.plan.make_plan), each in its own `python -m trainers` process.

Both sides run with 1 trial and with --trials trials, interleaved, --repeats times (medians), so
that their wall times split into a fixed part and a part per trial (a line through the two
points): T(n) = fixed + n x per_trial. The orchestrator's fixed cost is Ray start, MLflow runs,
the report; its per-trial cost beyond the plain process is what Ray Tune/Train add to each trial.
A last line shows the default concurrency (as many trials at once as the local CPUs hold).

Every orchestrated trial's fixed cost is then split (medians over its trials), from the metrics
each trial logs: `time/start_s`, RUNNING -> end of the first optimizer step, as Ray Train worker
start (`time/start.worker_started_s`), imports (`.imported_s`), environment tags and tracker
(`.trial_started_s`), data ready (`.data_ready_s`), model load (`.model_loaded_s`), method, optimizer
and the first step (`.first_step_s`); and `time/finish_s`, end of the last step -> final metrics, as
evaluation, saving (adapter + MLflow artifacts) and the rest.

    python benchmarks/orchestration_overhead.py --log-every 1,250 [--steps 250] [--repeats 2]

compares instead one trial of `--steps` steps at each train.log_every, interleaved: its wall time
(MLflow child run start -> end) and time/train_s, as ratios to the last log_every given.
`--model-shape smollm2-135m` trains a random-init model of that shape (benchmarks/trainer_vs_hf.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="embedded:base")
    parser.add_argument("--train-file", default="embedded:instruct_train.jsonl")
    parser.add_argument("--eval-file", default="embedded:instruct_eval.jsonl")
    parser.add_argument("--skip-concurrent", action="store_true", help="leave out the default-concurrency sweep")
    parser.add_argument("--log-every", default=None, help="comma-separated train.log_every values to compare")
    parser.add_argument("--model-shape", default=None, help="e.g. smollm2-135m (benchmarks/trainer_vs_hf.py SHAPES)")
    parser.add_argument("--skip-plain", action="store_true", help="orchestrated sweeps only (for the start split)")
    args = parser.parse_args(argv)
    if args.model_shape:
        from benchmarks.trainer_vs_hf import build_shape_model

        args.model = str(build_shape_model(args.model_shape))
    return args


def sweep_overrides(args, n_trials: int, work: Path, concurrent: bool = False,
                    log_every: int | None = None) -> list[str]:
    ranks = ",".join(str(2 ** i) for i in range(n_trials))
    log_every = log_every or max(1, args.steps // 4)
    overrides = ["+sweep=lora_rank", f"sweep.axes={{method.r:[{ranks}]}}", f"train.max_steps={args.steps}",
                 f"train.log_every={log_every}", "train.checkpoint_every=0", "data.max_eval_rows=32",
                 f"model.name_or_path={args.model}", f"data.train_file={args.train_file}",
                 f"data.eval_file={args.eval_file}", f"storage.path={work / 'runs'}",
                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "resume=false", "cluster.num_cpus=2"]
    if not concurrent:
        overrides.append("cluster.max_concurrent_trials=1")
    return overrides


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    return env


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return elapsed


TRIALS: list[dict] = []  # every orchestrated trial's time/* metrics and run wall time


def orchestrated(args, n_trials: int, concurrent: bool = False, log_every: int | None = None) -> float:
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as tmp:
        work = Path(tmp)
        elapsed = timed([sys.executable, "-m", "orchestrator",
                         *sweep_overrides(args, n_trials, work, concurrent, log_every)], cwd=work)
        TRIALS.extend(dict(t, log_every=log_every) for t in trial_times(work / "mlflow.db"))
        return elapsed


def trial_times(db: Path) -> list[dict]:
    """Each child run's time/* metrics and its wall time (run start -> end, seconds)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    rows = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id], "tags.trial_key != ''"):
            times = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}
            rows.append({**times, "run_s": (run.info.end_time - run.info.start_time) / 1000})
    return rows


def split_table(rows: list[dict]) -> None:
    """Medians of the start and finish phases over the orchestrated trials."""
    keys = sorted({k for row in rows for k in row if k.startswith(("time/start", "time/finish"))},
                  key=lambda k: (not k.startswith("time/start"), "." in k, k))
    print(f"\nFixed cost of a trial, median of {len(rows)} orchestrated trials (s):\n")
    print("| phase | median s | min s | max s |")
    print("| --- | ---: | ---: | ---: |")
    for key in keys:
        values = [row[key] for row in rows if key in row]
        print(f"| {key} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")


def compare_log_every(args) -> int:
    """One trial at each log_every, interleaved: wall time and time/train_s relative to the last."""
    values = [int(v) for v in args.log_every.split(",")]
    print(f"1 LoRA trial of {args.steps} steps at train.log_every={values}; {args.repeats} interleaved repeats; "
          f"{os.cpu_count()} CPUs; model {args.model}", flush=True)
    for repeat in range(args.repeats):
        for log_every in (values if repeat % 2 == 0 else values[::-1]):
            elapsed = orchestrated(args, 1, log_every=log_every)
            print(f"  repeat {repeat + 1}: log_every={log_every:<4} sweep {elapsed:6.1f} s  trial "
                  f"{TRIALS[-1]['run_s']:6.1f} s  time/train_s {TRIALS[-1].get('time/train_s', float('nan')):6.1f}",
                  flush=True)
    base = values[-1]
    med = {v: {k: statistics.median(t[k] for t in TRIALS if t["log_every"] == v)
               for k in ("run_s", "time/train_s", "time/start_s", "time/finish_s")} for v in values}
    print("\n| train.log_every | trial wall s | vs base | time/train_s | vs base | time/start_s | time/finish_s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in values:
        m = med[v]
        print(f"| {v} | {m['run_s']:.1f} | {m['run_s'] / med[base]['run_s']:.3f}x | {m['time/train_s']:.1f} | "
              f"{m['time/train_s'] / med[base]['time/train_s']:.3f}x | {m['time/start_s']:.1f} | "
              f"{m['time/finish_s']:.1f} |")
    split_table(TRIALS)
    return 0


def plain(args, n_trials: int) -> float:
    """The plan's trial configs, each run by `python -m trainers` in its own process, in sequence."""
    from omegaconf import OmegaConf

    from orchestrator.plan import make_plan

    with tempfile.TemporaryDirectory(prefix="plain-bench-") as tmp:
        work = Path(tmp)
        plan = make_plan(sweep_overrides(args, n_trials, work))
        total = 0.0
        for trial in plan.trials:
            config = work / f"{trial.key}.yaml"
            OmegaConf.save(OmegaConf.create(trial.config), config)
            total += timed([sys.executable, "-m", "trainers", "--config", str(config),
                            "--output-dir", str(work / trial.key)], cwd=work)
        return total


def line(t1: float, tn: float, n: int) -> tuple[float, float]:
    """(fixed, per trial) of the line through (1, t1) and (n, tn)."""
    per_trial = (tn - t1) / (n - 1)
    return t1 - per_trial, per_trial


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.log_every:
        return compare_log_every(args)
    if args.trials < 2:
        print("--trials must be >= 2 (the per-trial cost is a slope)", file=sys.stderr)
        return 2
    print(f"{args.trials} LoRA trials of {args.steps} steps (+ eval on 32 rows), sequential; {args.repeats} "
          f"interleaved repeats; {os.cpu_count()} CPUs", flush=True)
    times: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for n in (1, args.trials):
            for side, run in (("orchestrator", orchestrated), ("plain", plain))[:1 if args.skip_plain else 2]:
                elapsed = run(args, n)
                times.setdefault((side, n), []).append(elapsed)
                print(f"  repeat {repeat + 1}: {side:<12} {n} trial(s)  {elapsed:6.1f} s", flush=True)
    concurrent = None if args.skip_concurrent else orchestrated(args, args.trials, concurrent=True)

    split_table(TRIALS)
    if args.skip_plain:
        return 0
    med = {key: statistics.median(values) for key, values in times.items()}
    n = args.trials
    fits = {side: line(med[(side, 1)], med[(side, n)], n) for side in ("orchestrator", "plain")}
    print()
    print(f"| side | 1 trial (s) | {n} trials (s) | fixed (s) | per trial (s) | {n} trials vs plain |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for side in ("plain", "orchestrator"):
        fixed, per_trial = fits[side]
        print(f"| {side} | {med[(side, 1)]:.1f} | {med[(side, n)]:.1f} | {fixed:.1f} | {per_trial:.1f} | "
              f"{med[(side, n)] / med[('plain', n)]:.2f}x |")
    if concurrent is not None:
        print(f"| orchestrator, default concurrency | | {concurrent:.1f} | | | {concurrent / med[('plain', n)]:.2f}x |")
    extra_fixed = fits["orchestrator"][0] - fits["plain"][0]
    extra_per_trial = fits["orchestrator"][1] - fits["plain"][1]
    print(f"\norchestrator overhead: {extra_fixed:.1f} s once per sweep + {extra_per_trial:.1f} s per trial "
          f"(= {(med[('orchestrator', n)] - med[('plain', n)]) / n:.1f} s per trial over a {n}-trial sweep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
