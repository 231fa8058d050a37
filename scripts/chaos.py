"""Chaos sweep: inject real faults into a LoRA sweep on a local Ray and count what survived.

    python scripts/chaos.py [--workdir DIR] [--steps 40]

Faults: a training worker SIGKILLed mid-trial, a worker raising, a NaN loss (expected to fail
its trial and only it), and the driver itself SIGKILLed mid-sweep, then the same command rerun.
Prints one table: fault, trial, expected outcome, actual outcome; then trials survived and runs
lost (a trial with no closed MLflow run, a run left RUNNING, or a finished run without its
adapter). Runs lost must be 0; the exit code says so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    from mlflow.tracking import MlflowClient

    from orchestrator.plan import make_plan

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    sweep = ["+sweep=lora_rank", "sweep.axes={method.r:[1,2,4,8]}", f"train.max_steps={args.steps}",
             "train.log_every=4", "train.checkpoint_every=8", "data.max_train_rows=256", "data.max_eval_rows=32"]
    keys = {t.cfg.method.r: t.key for t in make_plan(sweep).trials}
    faults = [
        {"kind": "kill", "step": 13, "trial": keys[1]},
        {"kind": "raise", "step": 10, "trial": keys[2]},
        {"kind": "nan", "step": 6, "trial": keys[4], "once": False},
        {"kind": "sleep", "step": 20, "seconds": 120, "trial": keys[8]},  # window for the driver kill
    ]
    expected = {1: ("worker SIGKILL at step 13", "FINISHED"), 2: ("worker raises at step 10", "FINISHED"),
                4: ("NaN loss at step 6", "FAILED"), 8: ("driver SIGKILL mid-trial, rerun", "FINISHED")}
    env = {**os.environ, "PYTHONPATH": str(REPO), "FTLAB_FAULTS": json.dumps(faults)}
    cmd = [sys.executable, "-m", "orchestrator", *sweep]
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")

    def child(r):
        experiment = client.get_experiment_by_name("lora_rank")
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], filter_string=f"params.`method.r` = '{r}'")
        return runs[0] if runs else None

    print(f"chaos sweep in {work}", flush=True)
    driver = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline:
        try:
            run = child(8)
            if run is not None and any(m.step >= 16 for m in client.get_metric_history(run.info.run_id, "train/loss")):
                break
        except Exception:  # the driver may still be creating the store
            pass
        time.sleep(2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    print("driver SIGKILLed; rerunning the same command", flush=True)
    rerun = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)

    rows, survived, lost = [], 0, 0
    for r, (fault, want) in expected.items():
        run = child(r)
        status = run.info.status if run else "MISSING"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} if run else set()
        if run is None or status in ("RUNNING", "SCHEDULED") or (status == "FINISHED" and "adapter" not in artifacts):
            lost += 1
        if status == want:
            survived += 1
        rows.append((fault, f"lora r={r}", want, status))
    width = max(len(row[0]) for row in rows)
    print(f"\n{'fault':<{width}}  {'trial':<9}  {'expected':<8}  actual")
    for fault, trial, want, status in rows:
        print(f"{fault:<{width}}  {trial:<9}  {want:<8}  {status}")
    print(f"\nfaults injected: {len(faults) + 1}  trials as expected: {survived}/{len(rows)}  runs lost: {lost}")
    print(f"rerun exit code: {rerun.returncode} (1 expected: the NaN trial fails by design)")
    return 0 if lost == 0 and survived == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
