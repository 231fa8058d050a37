"""What per-step logging costs a trial, without Ray: the default LoRA trial on the embedded default
run in this process by `trainers.trial.run_trial` with the real `TrialTracker` writing to an
MLflow SQLite store (what a Ray worker's rank 0 runs, minus Ray), at two train.log_every values:
a new run per trial in one store per script run.

    python benchmarks/logging_overhead.py [--log-every 1,250] [--steps 250] [--pairs 3] [--progress] [KEY=VALUE ...]
    python benchmarks/logging_overhead.py --tiny [--synthetic]   # the fewest steps: checks the script

One warm-up trial, then `--pairs` pairs, each pair running both values in alternating order (the
box may be shared: only ratios within a pair mean anything). Per trial: wall time of run_trial,
`time/train_s`, the CPU time of the training thread (time.thread_time: what the loop itself
spends, logging included) and of the whole process (the tracker's writer threads too).
`--synthetic` times instead the tracker alone beside a ~3 ms training step (24 small linear layers,
one thread: ten times shorter than the embedded trial's, so the logging's share shows), blocks of
300 steps logged every step or every 250th, alternating in one process: a ratio per block pair.

`--tiny`: no warm-up, 2 steps and one pair (log_every=1 logs both steps, the large value only
the last); with `--synthetic`, one block pair. `--json FILE` writes every trial (or block) and the ratios.

`--progress` also gives the tracker a Ray-progress sink that does what `ray.train.report`'s
caller does here (a dict copy per report) but sends nothing: the progress queue's own cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def trial_config(steps: int, log_every: int, out: Path, uri: str, extra: list[str] = ()):
    from omegaconf import OmegaConf

    from orchestrator.plan import make_plan
    from trainers.validate import from_container

    plan = make_plan([f"train.max_steps={steps}", f"train.log_every={log_every}", "train.checkpoint_every=0",
                      "data.max_eval_rows=32", f"storage.path={out / 'runs'}", "cluster.num_cpus=2",
                      f"tracking.uri={uri}", *extra])
    return from_container(OmegaConf.create(plan.trials[0].config))


def one_trial(steps: int, log_every: int, progress: bool, uri: str, extra: list[str] = ()) -> dict[str, float]:
    """A trial as a new MLflow run of the store at `uri` (made once per script run: creating an
    SQLite store takes seconds, outside the timed part but not outside a test's)."""
    from orchestrator.tracking import TrialTracker, client
    from trainers.trial import run_trial

    with tempfile.TemporaryDirectory(prefix="log-bench-") as tmp:
        out = Path(tmp)
        cfg = trial_config(steps, log_every, out, uri, extra)
        mlflow = client(uri)
        experiment = mlflow.get_experiment_by_name("bench")
        experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment("bench")
        run_id = mlflow.create_run(experiment_id).info.run_id
        reports: list[dict] = []
        report = (lambda metrics: reports.append(dict(metrics))) if progress else None
        tracker = TrialTracker(uri, run_id, 0, report=report, total_steps=steps)
        wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
        with tracker:
            metrics = run_trial(cfg, out / "trial", tracker=tracker)
        row = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "thread_cpu_s": time.thread_time() - thread, "train_s": metrics["time/train_s"]}
        points = len(mlflow.get_metric_history(run_id, "train/loss"))
        expected = -(-steps // log_every)
        if points != expected:
            raise RuntimeError(f"log_every={log_every}: {points} train/loss points in MLflow, expected {expected}")
        return row


def synthetic(blocks: int = 12, block_steps: int = 300) -> dict:
    """log_every=1 vs 250 beside a small synthetic step: wall and training-thread CPU ratios."""
    import torch

    from orchestrator.tracking import TrialTracker, client

    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(24)])
    optimizer, batch = torch.optim.AdamW(model.parameters()), torch.randn(16, 64)
    times: dict[int, list[tuple[float, float]]] = {1: [], 250: []}
    with tempfile.TemporaryDirectory(prefix="log-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow = client(uri)
        tracker = TrialTracker(uri, mlflow.create_run(mlflow.create_experiment("bench")).info.run_id, 0)
        step = 0
        for block in range(blocks):
            log_every = 1 if block % 2 == 0 else 250
            wall, thread = time.perf_counter(), time.thread_time()
            for _ in range(block_steps):
                loss = model(batch).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                if step % log_every == 0:
                    tracker.log_metrics({"train/loss": loss.item(), "train/lr": 1e-3, "train/tokens_per_s": 1.0}, step)
            times[log_every].append((time.perf_counter() - wall, time.thread_time() - thread))
        tracker.close()
    step_ms = statistics.median(w for w, _ in times[250]) / block_steps * 1000
    walls = [a[0] / b[0] for a, b in zip(times[1], times[250])]
    cpus = [a[1] / b[1] for a, b in zip(times[1], times[250])]
    print(f"step {step_ms:.2f} ms; log_every=1 vs 250 per block pair: wall {', '.join(f'{r:.3f}' for r in walls)} "
          f"(median {statistics.median(walls):.3f}x); training-thread CPU {', '.join(f'{r:.3f}' for r in cpus)} "
          f"(median {statistics.median(cpus):.3f}x)")
    return {"step_ms": step_ms, "block_steps": block_steps, "wall_ratios": walls, "thread_cpu_ratios": cpus}


KEYS = ("wall_s", "train_s", "thread_cpu_s", "cpu_s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-every", default="1,250")
    parser.add_argument("--tiny", action="store_true", help="the fewest steps that run both values: checks the script")
    parser.add_argument("--steps", type=int, default=None, help="default 250; tiny 2")
    parser.add_argument("--pairs", type=int, default=None, help="default 3; tiny 1")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--synthetic", action="store_true", help="the tracker beside a synthetic ~3 ms step")
    parser.add_argument("--json", default=None, help="also write every trial and the ratios to this JSON file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. train.cpus_per_worker=1")
    args = parser.parse_args(argv)
    for key, full, tiny in (("steps", 250, 2), ("pairs", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    return args


def table(rows: dict[int, list[dict]], ratios: dict[int, dict[str, list[float]]]) -> str:
    lines = ["| train.log_every | " + " | ".join(f"{k} (median) | per-pair ratio" for k in KEYS) + " |",
             "| ---: |" + " ---: | --- |" * len(KEYS)]
    for v, trials in rows.items():
        cells = [f"{statistics.median(r[k] for r in trials):.2f} | {', '.join(f'{x:.3f}' for x in ratios[v][k])}"
                 for k in KEYS]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measured_pairs(args, values: list[int]) -> dict[int, list[dict]]:
    """One warm-up trial (not --tiny: it only checks the script), then args.pairs pairs of trials,
    one per value, in alternating order."""
    with tempfile.TemporaryDirectory(prefix="log-bench-store-") as store:
        uri = f"sqlite:///{store}/mlflow.db"
        if not args.tiny:  # imports, caches, first-run costs
            one_trial(min(args.steps, 20), values[-1], args.progress, uri, args.overrides)
        rows: dict[int, list[dict]] = {v: [] for v in values}
        for pair in range(args.pairs):
            for log_every in values if pair % 2 == 0 else values[::-1]:
                rows[log_every].append(one_trial(args.steps, log_every, args.progress, uri, args.overrides))
                r = rows[log_every][-1]
                print(f"  pair {pair + 1}: log_every={log_every:<4} wall {r['wall_s']:6.2f} s  train_s "
                      f"{r['train_s']:6.2f}  thread cpu {r['thread_cpu_s']:6.2f}  process cpu {r['cpu_s']:6.2f}",
                      flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.synthetic:
        record = synthetic(blocks=2 if args.tiny else 12)
    else:
        values = [int(v) for v in args.log_every.split(",")]
        rows, base = measured_pairs(args, values), values[-1]
        ratios = {v: {k: [a[k] / b[k] for a, b in zip(rows[v], rows[base])] for k in KEYS} for v in values}
        print("\n" + table(rows, ratios))
        record = {"steps": args.steps, "pairs": args.pairs, "base": base, "trials": rows, "ratios": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
