"""Faults injected for real on a local Ray: a SIGKILLed training worker resumes from its last
checkpoint, a NaN loss fails only its own trial, SIGTERM marks runs KILLED, and a SIGKILLed driver
is resumed by rerunning the same command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
COMMON = ["+sweep=lora_rank", "sweep.axes={method.r:[2,4]}", "train.log_every=4", "train.checkpoint_every=8",
          "method.dropout=0.1", "data.max_train_rows=256", "data.max_eval_rows=32", "cluster.num_cpus=2"]


def _keys(args):
    from orchestrator.plan import make_plan

    return {t.cfg.method.r: t.key for t in make_plan(args).trials}


def _cmd(args):
    return [sys.executable, "-m", "orchestrator", *args]


def _env(faults):
    return {**os.environ, "PYTHONPATH": str(REPO), "FTLAB_FAULTS": json.dumps(faults)}


def _runs(work):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_rank")
    if experiment is None:
        return client, [], []
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "sweep" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def _steps(client, run_id):
    return [m.step for m in client.get_metric_history(run_id, "train/loss")]


def test_worker_kill_resumes_and_nan_fails_only_its_trial(tmp_path):
    from trainers.trial import run_trial

    args = COMMON + ["train.max_steps=24"]
    keys = _keys(args)
    faults = [{"kind": "kill", "step": 13, "trial": keys[2]},
              {"kind": "nan", "step": 6, "trial": keys[4], "once": False}]
    proc = subprocess.run(_cmd(args), cwd=tmp_path, env=_env(faults), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 trial(s) failed: lora r=4" in proc.stderr and "non-finite loss at step 6" in proc.stderr

    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    by_r = {int(c.data.params["method.r"]): c for c in children}
    assert sorted(by_r) == [2, 4]
    killed = by_r[2]
    assert killed.info.status == "FINISHED"
    assert killed.data.metrics["train/resumed_from_step"] == 8  # restarted worker resumed, not restarted
    assert _steps(client, killed.info.run_id) == [4, 8, 12, 16, 20, 24]  # no duplicate steps
    from orchestrator.plan import make_plan

    same_trial = next(t.cfg for t in make_plan(args).trials if t.cfg.method.r == 2)  # alpha = 2r, as swept
    reference = run_trial(same_trial, tmp_path / "reference")
    assert killed.data.metrics["eval/loss"] == pytest.approx(reference["eval/loss"], abs=1e-5)
    poisoned = by_r[4]
    assert poisoned.info.status == "FAILED"
    assert "non-finite loss at step 6" in poisoned.data.tags["failure_reason"]
    assert "adapter" not in {a.path for a in client.list_artifacts(poisoned.info.run_id)}


def _wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the driver may still be creating the store (sqlite is locked meanwhile)
            pass
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_then_sigkill_then_rerun_finishes_every_trial_once(tmp_path):
    args = COMMON + ["train.max_steps=40", "cluster.max_concurrent_trials=1"]
    keys = _keys(args)
    # Trial r=4 pauses once at step 20, after its step-16 checkpoint: a window to kill the driver in.
    faults = [{"kind": "sleep", "step": 20, "seconds": 120, "trial": keys[4]}]

    def start():
        return subprocess.Popen(_cmd(args), cwd=tmp_path, env=_env(faults), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def child_of(r):
        _, _, children = _runs(tmp_path)
        return next((c for c in children if c.data.params.get("method.r") == str(r)), None)

    # Progress is read from the trials' output directories, not the sqlite store: a second
    # process opening the store while the driver creates it would race its schema migration.
    def checkpointed(r, step):
        return (tmp_path / "runs" / "lora_rank" / keys[r] / "checkpoints" / f"step-{step:06d}").is_dir()

    def finished(r):
        return (tmp_path / "runs" / "lora_rank" / keys[r] / "metrics.json").is_file()

    # 1. SIGTERM while the first trial trains: the driver exits 130 and closes every run as KILLED.
    driver = start()
    _wait_for(lambda: checkpointed(2, 8), 300, "the first trial's step-8 checkpoint")
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out[-2000:]
    _, parents, children = _runs(tmp_path)
    assert {r.info.status for r in parents + children} == {"KILLED"}

    # 2. Rerun, then SIGKILL the driver (and its local Ray) while the second trial is mid-run.
    driver = start()
    _wait_for(lambda: finished(2) and checkpointed(4, 16), 400,
              "trial r=2 to finish and trial r=4 to write its step-16 checkpoint")
    time.sleep(2)  # let the driver record r=2 as FINISHED
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    time.sleep(3)

    # 3. The same command again: r=2 is kept, r=4 resumes from its checkpoint, the sweep finishes.
    proc = subprocess.run(_cmd(args), cwd=tmp_path, env=_env(faults), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 finished trial(s) kept" in proc.stdout
    table = proc.stdout[proc.stdout.index("eval loss"):]
    assert table.count("lora r=2") == 1 and table.count("lora r=4") == 1
    client, parents, children = _runs(tmp_path)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    resumed = child_of(4)
    assert resumed.data.metrics["train/resumed_from_step"] == 16
    assert _steps(client, resumed.info.run_id) == list(range(4, 41, 4))
