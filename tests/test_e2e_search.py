"""Search and scheduling on a real local Ray: a method-choice search under a FLOPs budget (each
method's own steps, the same FLOPs a trial) whose ASHA stops a poor draw of one method behind a
better draw of another (its run ends FINISHED, tagged `early_stopped=true` with the step, its
checkpoints gone) and a report with the tuning table; and a pipeline whose fast branch goes on
while its slow branch still runs (no waves)."""

from __future__ import annotations

import json
import math
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


def _seed_drawing_lora_good_then_ia3_poor() -> int:
    """A search seed whose first two random draws are LoRA at the good lr, then IA3 at the poor
    one: run one at a time, the poor IA3 draw then meets ASHA's first rung behind a better LoRA
    trial of the same bracket."""
    from types import SimpleNamespace

    from orchestrator.method_search import Branch, draw_random
    from orchestrator.search import Dimension

    lr = {"train.lr": Dimension("train.lr", "choice", (GOOD_LR, POOR_LR))}
    group = SimpleNamespace(branches={name: Branch(name, {}, lr) for name in ("lora", "ia3")})
    for seed in range(100):
        rng = random.Random(seed)
        if [draw_random(group, rng), draw_random(group, rng)] == [{"method": "lora", "train.lr": GOOD_LR},
                                                                  {"method": "ia3", "train.lr": POOR_LR}]:
            return seed
    raise AssertionError("no seed in range(100) draws lora good then ia3 poor")


def _flops_budget(args, tmp_path, trials: int, steps: float) -> tuple[float, dict[str, float]]:
    """A FLOPs budget that buys `trials` trials of `steps` steps of the first method each, and the
    FLOPs a step of each method (measured on the sweep's prepared data, as the plan measures it)."""
    from orchestrator.budget import step_cost
    from orchestrator.plan import make_plan

    steps_unit = [a for a in args if not a.startswith("sweep.budget_unit")]
    plan = make_plan([*steps_unit, f"storage.path={tmp_path / 'runs'}", "dry_run=true"])
    per_step = {t.cfg.method.name: step_cost(t.cfg, "budget").cost.flops for t in plan.trials}
    return trials * steps * per_step[plan.trials[0].cfg.method.name], per_step


def test_asha_stops_a_poor_draw_across_a_method_choice_and_the_report_compares_with_the_defaults(tmp_path):
    """One ASHA bracket spans the methods of a choice: the poor IA3 draw is stopped because a LoRA
    draw did better at the rung. With sweep.budget_unit=flops a budget of 4 trials x 20.5 LoRA
    steps gives LoRA's trials 20 steps and IA3's (a cheaper step) more, the same FLOPs each; ASHA's
    first rung is 9 IA3 steps' FLOPs (sweep.grace_steps of the cheapest method), which the
    evaluation at step 10 of either method has passed."""
    seed = _seed_drawing_lora_good_then_ia3_poor()
    args = ["sweep.name=tuned", "train.max_steps=20", "train.log_every=5", "train.eval_every=5",
            "train.checkpoint_every=5", "data.max_train_rows=200", "data.max_eval_rows=24", "cluster.num_cpus=2",
            "cluster.max_concurrent_trials=1",
            f"++sweep.search={{method:{{choice:[lora,ia3]}},train.lr:{{choice:[{GOOD_LR},{POOR_LR}]}}}}",
            "++sweep.method_spaces={lora:{fixed:{method.r:4}}}", "sweep.num_samples=4",
            "sweep.search_alg=random", f"sweep.search_seed={seed}", "sweep.scheduler=asha", "sweep.grace_steps=9",
            "sweep.reduction_factor=2", "sweep.budget_unit=flops"]
    budget, per_step = _flops_budget(args, tmp_path, 4, 20.5)
    steps = {method: math.floor(budget / 4 / flops) for method, flops in per_step.items()}
    assert steps["lora"] == 20 and steps["ia3"] > 20  # an IA3 step costs less than a LoRA step
    proc = _run([*args, f"sweep.budget={budget:.6e}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"steps at the defaults: lora 20, ia3 {steps['ia3']}" in proc.stdout  # the budget, in the plan
    client, parents, children = _children(tmp_path, "tuned")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(c.info.status == "FINISHED" for c in children)
    by_sample = {(c.data.tags["method"], c.data.tags["sample"]): c for c in children}
    assert set(by_sample) == {("lora", "default"), ("ia3", "default"), ("lora", f"method=lora lr={GOOD_LR:.3g}"),
                              ("ia3", f"method=ia3 lr={POOR_LR:.3g}")}
    assert {c.data.tags["search_choice"] for c in children} == {"lora", "ia3"}
    poor, good = by_sample["ia3", f"method=ia3 lr={POOR_LR:.3g}"], by_sample["lora", f"method=lora lr={GOOD_LR:.3g}"]
    default = by_sample["lora", "default"]
    assert poor.data.tags.get("early_stopped") == "true" and poor.data.tags["stopped_at_step"] == "10"
    assert all("early_stopped" not in c.data.tags for c in children if c is not poor)
    assert float(poor.data.params["train.lr"]) == POOR_LR and poor.data.params["method.name"] == "ia3"
    assert good.data.params["method.r"] == "4"  # lora's fixed override
    assert all(c.data.params["train.max_steps"] == str(steps[c.data.params["method.name"]]) for c in children)
    flops = client.get_metric_history(default.info.run_id, "perf/train_flops")
    assert sorted({m.step for m in flops}) == [0, 5, 10, 15, 20]  # each log step and evaluation; 0: final
    # Every trial that ran its whole budget spent its own steps' FLOPs (a quarter of the budget,
    # less than one of its steps).
    for finished in (c for c in children if c is not poor):
        method = finished.data.params["method.name"]
        assert finished.data.metrics["perf/train_flops"] == pytest.approx(steps[method] * per_step[method], rel=0.03)
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
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in tuning.splitlines() if line.startswith(("| lora", "| ia3"))}
    assert rows["lora"][1:3] == ["2", "0"] and rows["ia3"][1:3] == ["2", "1"]  # trials, early stopped
    assert rows["lora"][3] == f"{default.data.metrics['eval/loss']:.4f}"
    best = min((good, default), key=lambda r: r.data.metrics["eval/loss"])
    assert rows["lora"][5] == f"{best.data.metrics['eval/loss']:.4f}"
    assert "method choice {lora,ia3}: best lora" in tuning
    assert "tuning.png" in text
    assert "tuning (best of each method's search" in proc.stdout


def test_a_fast_branch_does_not_wait_for_a_slow_one(tmp_path):
    from orchestrator.plan import make_plan

    stages = ("++sweep.stages={slow:{overrides:{stage:sft,train.lr:0.001}},fast:{overrides:{stage:sft}},"
              "slow_next:{after:[slow],overrides:{stage:sft}},fast_next:{after:[fast],overrides:{stage:sft}}}")
    args = ["sweep.name=branches", stages, "train.max_steps=4", "train.log_every=2", "data.max_train_rows=64",
            "data.max_eval_rows=8", "cluster.num_cpus=2", "cluster.max_concurrent_trials=2"]
    keys = {t.label: t.key for t in make_plan([f"storage.path={tmp_path}/runs", *args]).trials}
    # The slow branch's first stage sleeps until the fast branch's next stage trains its first step
    # (a zero-second sleep there leaves the fault's marker), at most 90 s: in waves, fast_next would
    # wait for slow, which would sleep the 90 s out and end first.
    trained = tmp_path / "runs" / "branches" / keys["fast_next"] / ".fault-sleep-1.fired"
    proc = _run(args, tmp_path, faults=[
        {"kind": "sleep", "step": 2, "trial": keys["slow"], "seconds": 90, "until": str(trained)},
        {"kind": "sleep", "step": 1, "trial": keys["fast_next"]}])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert trained.is_file()
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
    reserved must come back, or the next trials wait forever. So must those of a group its
    controller reserved just before it was killed (no worker reported it): the driver removes the
    groups of dead creators, and only those."""
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

# A group reserved by an actor (a Train controller) outlives it; the driver's sweep removes it then.
import time
from orchestrator.runner import release_orphaned_placement_groups

@ray.remote(num_cpus=0)
class Controller:
    def reserve(self):
        group = placement_group([{"CPU": 1}])
        ray.get(group.ready(), timeout=60)
        return group.id.hex()

killed, alive = Controller.remote(), Controller.remote()
killed_group, alive_group = ray.get([killed.reserve.remote(), alive.reserve.remote()])
drivers = placement_group([{"memory": 1}])
ray.get(drivers.ready(), timeout=60)
ray.kill(killed)
deadline = time.monotonic() + 60
while ray._private.state.state.actor_table(killed._actor_id.hex()).get("State") != "DEAD":
    assert time.monotonic() < deadline
    time.sleep(0.2)
state = lambda hex_id: [g["state"] for i, g in placement_group_table().items() if i == hex_id][0]
assert state(killed_group) == "CREATED"  # nothing else frees it
assert release_orphaned_placement_groups() == [killed_group]
assert state(killed_group) == "REMOVED"
assert state(alive_group) == "CREATED" and placement_group_table(drivers)["state"] == "CREATED"
deadline = time.monotonic() + 30  # its CPU is free again (the resource view follows)
while ray.available_resources().get("CPU", 0) != 1:
    assert time.monotonic() < deadline, ray.available_resources()
    time.sleep(0.2)
print("released")
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0 and "released" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
