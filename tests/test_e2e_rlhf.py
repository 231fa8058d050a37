"""End to end on a real local Ray: `+sweep=rlhf` at a small size runs SFT, the reward model, two RL
runs and DPO as dependent Ray Tune trials, and ORPO from the base beside them; MLflow shows the
pipeline: each stage started after the stages it consumes ended, `input_run_id` names them, and
each stage logged its metrics. A second run fails the reward stage for real (its time limit): RL is
skipped, DPO and ORPO still finish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
SMALL = ["++sweep.stages.sft.overrides.train.max_steps=30",
         "++sweep.stages.reward.overrides.train.max_steps=20",
         "++sweep.stages.rl.overrides.train.max_steps=4", "++sweep.stages.rl.overrides.train.batch_size=4",
         "++sweep.stages.rl.overrides.stage.num_generations=4",
         "++sweep.stages.dpo.overrides.train.max_steps=10", "++sweep.stages.orpo.overrides.train.max_steps=10",
         "data.max_train_rows=200", "data.max_eval_rows=40", "cluster.num_cpus=2"]


def run_pipeline(work: Path, *extra: str):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "+sweep=rlhf", *SMALL, *extra], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep") == "rlhf")
    children = {r.data.tags["mlflow.runName"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return proc, client, parent, children


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    proc, client, parent, children = run_pipeline(tmp_path_factory.mktemp("rlhf"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, client, parent, children


def test_the_table_shows_every_stage_finished(pipeline):
    proc, _, parent, children = pipeline
    assert parent.info.status == "FINISHED"
    assert set(children) == {"sft", "reward", "rl r=4", "rl r=16", "dpo", "orpo"}
    assert all(c.info.status == "FINISHED" for c in children.values())
    table = proc.stdout[proc.stdout.index("pairwise_accuracy"):]
    for label in children:
        assert label in table


def test_stages_ran_in_dependency_order_and_name_their_inputs(pipeline):
    _, _, _, children = pipeline
    ids = {label: run.info.run_id for label, run in children.items()}
    inputs = {"sft": [], "reward": ["sft"], "rl r=4": ["sft", "reward"], "rl r=16": ["sft", "reward"], "dpo": ["sft"],
              "orpo": []}
    for label, upstream in inputs.items():
        run = children[label]
        assert run.data.tags["stage"] == label.split()[0]
        assert run.data.tags.get("input_run_id", "") == ",".join(ids[u] for u in upstream)
        for name in upstream:  # started only once what it consumes had ended
            assert children[name].info.end_time <= run.info.start_time, (name, label)
    assert children["rl r=4"].data.params["stage.init_from"] == children["reward"].data.params["stage.init_from"]
    assert children["rl r=4"].data.params["method.r"] == "4" and children["rl r=16"].data.params["method.r"] == "16"


def test_each_stage_logged_its_metrics(pipeline):
    _, client, _, children = pipeline
    assert {"eval/accuracy", "eval/loss"} <= set(children["sft"].data.metrics)
    assert {"eval/pairwise_accuracy", "eval/reward_margin", "model/adapter_bytes"} <= set(children["reward"].data.metrics)
    for label in ("rl r=4", "rl r=16"):
        run = children[label]
        assert {"eval/reward_mean", "eval/reward_mean_init", "eval/accuracy", "eval/accuracy_init"} <= set(
            run.data.metrics)
        for name in ("rl/reward_mean", "rl/kl", "rl/response_length"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [1, 2, 3, 4], name
    dpo = children["dpo"]
    assert {"eval/reward_margin", "eval/pairwise_accuracy", "eval/accuracy", "eval/accuracy_init"} <= set(
        dpo.data.metrics)
    assert len(client.get_metric_history(dpo.info.run_id, "dpo/reward_margin")) >= 1
    orpo = children["orpo"]
    assert orpo.data.params["stage.init_from"] == children["sft"].data.params["stage.init_from"]  # the base
    assert {"eval/reward_margin", "eval/pairwise_accuracy", "eval/accuracy", "eval/accuracy_init"} <= set(
        orpo.data.metrics)
    assert len(client.get_metric_history(orpo.info.run_id, "orpo/log_odds_ratio")) >= 1


def test_a_failed_stage_skips_its_dependents_and_the_other_branch_finishes(tmp_path):
    limit = "++sweep.stages.reward.overrides.train.time_limit_s=0.001"  # fails at its first step
    proc, _, parent, children = run_pipeline(tmp_path, "++sweep.stages.dpo.overrides.train.max_steps=4",
                                             "++sweep.stages.orpo.overrides.train.max_steps=4", limit)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert parent.info.status == "FAILED"
    states = {label: run.info.status for label, run in children.items()}
    # MLflow has no SKIPPED status: a skipped stage's run ends KILLED with its reason in a tag
    assert states == {"sft": "FINISHED", "reward": "FAILED", "dpo": "FINISHED", "rl r=4": "KILLED",
                      "rl r=16": "KILLED", "orpo": "FINISHED"}
    assert "train.time_limit_s=0.001" in children["reward"].data.tags["failure_reason"]
    for label in ("rl r=4", "rl r=16"):
        assert children[label].data.tags["skip_reason"] == "upstream reward failed"
        assert "eval/accuracy" not in children[label].data.metrics  # never started
    assert "eval/accuracy" in children["dpo"].data.metrics
    table = proc.stdout[proc.stdout.rindex("\ntrial "):].splitlines()
    state = {label: next(line.split()[-1] for line in table if line.startswith(label + " ")) for label in children}
    assert state == {"sft": "FINISHED", "reward": "FAILED", "dpo": "FINISHED", "rl r=4": "SKIPPED",
                     "rl r=16": "SKIPPED", "orpo": "FINISHED"}
    assert "rl r=4 (" in proc.stdout and "SKIPPED - upstream reward failed" in proc.stdout
    assert "1 trial(s) failed: reward" in proc.stderr and "2 trial(s) skipped: rl r=4" in proc.stderr
