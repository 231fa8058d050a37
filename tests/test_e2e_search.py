"""Search and scheduling on a real local Ray: a searched sweep whose ASHA stops a poor draw (its
run ends FINISHED, tagged `early_stopped=true` with the step, its checkpoints gone) and a report
with the tuning table; and a pipeline whose fast branch goes on while its slow branch still runs
(no waves)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
GOOD_LR, POOR_LR = 3.0e-3, 1.0e-7  # 10 steps at 1e-7 leave the base's loss where it was


def _run(args, cwd, faults=None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if faults:
        env["FTLAB_FAULTS"] = json.dumps(faults)
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _children(work, experiment):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, [r for r in runs if "sweep" in r.data.tags], [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def _seed_drawing_good_then_poor() -> int:
    """A search seed whose first two random draws of lr are the good one, then the poor one: run
    one at a time, the poor draw then meets ASHA's first rung behind a better trial."""
    from orchestrator.search import Dimension

    lr = Dimension("train.lr", "choice", (GOOD_LR, POOR_LR))
    for seed in range(100):
        rng = random.Random(seed)
        if [lr.draw(rng), lr.draw(rng)] == [GOOD_LR, POOR_LR]:
            return seed
    raise AssertionError("no seed in range(100) draws good then poor")


def _flops_budget(args, tmp_path, trials: int, steps: float) -> float:
    """A FLOPs budget that buys `trials` trials of `steps` steps each (measured on the sweep's
    prepared data, as the plan measures it)."""
    from orchestrator.budget import step_cost
    from orchestrator.plan import make_plan

    steps_unit = [a for a in args if not a.startswith("sweep.budget_unit")]
    plan = make_plan([*steps_unit, f"storage.path={tmp_path / 'runs'}", "dry_run=true"])
    return trials * steps * step_cost(plan.trials[0].cfg, "budget").cost.flops


def test_asha_stops_a_poor_draw_and_the_report_compares_with_the_default(tmp_path):
    """With sweep.budget_unit=flops: a budget of 3 trials x 20.5 steps gives each trial 20 steps,
    and ASHA's first rung is 9 steps' FLOPs (sweep.grace_steps), which the evaluation at step 10
    has passed."""
    seed = _seed_drawing_good_then_poor()
    args = ["+sweep=lora_rank", "sweep.name=tuned", "sweep.axes={method.r:[4]}",
            "train.log_every=5", "train.eval_every=5", "train.checkpoint_every=5", "data.max_train_rows=200",
            "data.max_eval_rows=24", "cluster.num_cpus=2", "cluster.max_concurrent_trials=1",
            f"++sweep.search={{train.lr:{{choice:[{GOOD_LR},{POOR_LR}]}}}}", "sweep.num_samples=3",
            "sweep.search_alg=random", f"sweep.search_seed={seed}", "sweep.scheduler=asha", "sweep.grace_steps=9",
            "sweep.reduction_factor=2", "sweep.budget_unit=flops"]
    args.append(f"sweep.budget={_flops_budget(args, tmp_path, 3, 20.5):.6e}")
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 trials x 20 steps = 60 steps" in proc.stdout  # the budget, in the plan
    client, parents, children = _children(tmp_path, "tuned")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    by_sample = {c.data.tags["sample"]: c for c in children}
    assert set(by_sample) == {"default", f"lr={GOOD_LR:.3g}", f"lr={POOR_LR:.3g}"}
    poor, good, default = by_sample[f"lr={POOR_LR:.3g}"], by_sample[f"lr={GOOD_LR:.3g}"], by_sample["default"]
    assert poor.data.tags.get("early_stopped") == "true" and poor.data.tags["stopped_at_step"] == "10"
    assert "early_stopped" not in good.data.tags and "early_stopped" not in default.data.tags
    assert float(poor.data.params["train.lr"]) == POOR_LR
    assert all(c.data.params["train.max_steps"] == "20" for c in children)
    flops = client.get_metric_history(default.info.run_id, "perf/train_flops")
    assert sorted({m.step for m in flops}) == [0, 5, 10, 15, 20]  # each log step and evaluation; 0: final
    assert default.data.metrics["perf/train_flops"] == max(m.value for m in flops)
    # Evaluated during training (what ASHA decided on at step 10); stopping takes effect a few
    # steps later (reports do not block training), but before the last step.
    assert [m.step for m in client.get_metric_history(poor.info.run_id, "eval/loss")][:2] == [5, 10]
    assert max(m.step for m in client.get_metric_history(poor.info.run_id, "train/loss")) < 20
    assert "adapter" not in {a.path for a in client.list_artifacts(poor.info.run_id)}
    poor_dir = tmp_path / "runs" / "tuned" / poor.data.tags["trial_key"]
    assert not (poor_dir / "checkpoints").exists()
    for finished in (good, default):
        artifacts = {a.path for a in client.list_artifacts(finished.info.run_id)}
        assert "adapter" in artifacts
    report = client.download_artifacts(parents[0].info.run_id, "report/comparison.md", str(tmp_path))
    text = Path(report).read_text()
    tuning = text[text.index("## Tuning"):]
    row = next(line for line in tuning.splitlines() if line.startswith("| lora r=4"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["3", "1"]  # trials, early stopped
    assert cells[3] == f"{default.data.metrics['eval/loss']:.4f}"
    best = min((good, default), key=lambda r: r.data.metrics["eval/loss"])
    assert cells[5] == f"{best.data.metrics['eval/loss']:.4f}"
    assert "tuning.png" in text
    assert "tuning (best of each method's search" in proc.stdout


def test_a_fast_branch_does_not_wait_for_a_slow_one(tmp_path):
    from orchestrator.plan import make_plan

    stages = ("++sweep.stages={slow:{overrides:{stage:sft,train.lr:0.001}},fast:{overrides:{stage:sft}},"
              "slow_next:{after:[slow],overrides:{stage:sft}},fast_next:{after:[fast],overrides:{stage:sft}}}")
    args = ["sweep.name=branches", stages, "train.max_steps=4", "train.log_every=2", "data.max_train_rows=64",
            "data.max_eval_rows=8", "cluster.num_cpus=2", "cluster.max_concurrent_trials=2"]
    slow = next(t.key for t in make_plan([f"storage.path={tmp_path}/runs", *args]).trials if t.label == "slow")
    # The slow branch's first stage sleeps long enough for the fast branch's next stage to start.
    proc = _run(args, tmp_path, faults=[{"kind": "sleep", "step": 2, "trial": slow, "seconds": 90}])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _, _, children = _children(tmp_path, "branches")
    runs = {c.data.tags["mlflow.runName"]: c for c in children}
    assert set(runs) == {"slow", "fast", "slow_next", "fast_next"}
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # Child runs are created when Tune takes the trial: fast_next started before slow ended.
    assert runs["fast_next"].info.start_time < runs["slow"].info.end_time
    assert runs["slow_next"].info.start_time >= runs["slow"].info.end_time


def test_a_stopped_trials_placement_group_is_released(tmp_path):
    """A trial ASHA stops keeps its worker placement group unless the driver removes it (Ray Train
    V2's cleaner needs the State API, which this project's local Ray runs without): the CPUs it
    reserved must come back, or the next trials wait forever."""
    code = """
import ray
from ray.util.placement_group import placement_group, placement_group_table
from orchestrator.runner import _release_placement_group
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
group = placement_group([{"CPU": 2}])
ray.get(group.ready(), timeout=60)
assert ray.available_resources().get("CPU", 0) == 0
_release_placement_group(group.id.hex())
assert placement_group_table(group)["state"] == "REMOVED"
_release_placement_group(group.id.hex())  # already gone: nothing to do, no error
_release_placement_group(None)
print("released")
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and "released" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
