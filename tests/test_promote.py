"""Promotion of a sweep's best trial into the MLflow Model Registry, on a real SQLite store.

Two real LoRA trials (the demo sweep, fewer steps) are trained through the trainers library and
logged through the project's own tracking code into a parent run and its child runs, as a sweep
logs them (no Ray: the e2e test runs `promote=true` on a real sweep). The winner is promoted, loaded
back through `mlflow.pyfunc`, and its greedy answers on the held-out set must give the exact-match
accuracy the trial logged. Selection rules and bad input use made-up metrics.
"""

from __future__ import annotations

import pytest

from orchestrator.plan import make_plan
from orchestrator.promote import main, pick_winner
from orchestrator.report import collect
from orchestrator.tracking import SweepTracker, TrialTracker

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP_ARGS = ["+sweep=lora_rank", "sweep.axes={method.r:[1,8]}", "train.max_steps=60", "train.log_every=20",
              "train.checkpoint_every=0", "data.max_train_rows=400", "data.max_eval_rows=60"]


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory):
    """(uri, parent run id): the demo sweep's structure with two real, finished trials."""
    from trainers.trial import run_trial

    root = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    plan = make_plan(SWEEP_ARGS)
    tracker = SweepTracker(uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, SWEEP_ARGS[1:], plan.key)
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        tracker.set_status(run_id, "RUNNING")
        run_trial(trial.cfg, root / trial.key, tracker=TrialTracker(tracker.uri, run_id, rank=0))
        tracker.set_status(run_id, "FINISHED")
    tracker.set_status(parent, "FINISHED")
    return tracker.uri, parent


def held_out_accuracy(model_uri: str, cfg) -> tuple[float, int]:
    """Exact match of the pyfunc model's answers to the eval rows, sent as the text the registered
    prompt template's slot takes; and how many rows."""
    import mlflow

    from trainers.data import format_prompt, load_rows
    from trainers.evaluate import normalise_answer
    from trainers.export import request_text

    model = mlflow.pyfunc.load_model(model_uri)
    template = model.metadata.metadata["prompt_template"]
    _, rows, _ = load_rows(cfg.data.eval_file, cfg.data.format, cfg.data.max_eval_rows)
    requests = [request_text(format_prompt(row["instruction"], row["input"]), template) for row in rows]
    answers = model.predict(requests)
    hits = sum(normalise_answer(a) == normalise_answer(row["output"]) for a, row in zip(answers, rows))
    return hits / len(rows), len(rows)


def best_child(client, parent_id: str):
    """The trial the rules pick, computed here from the runs: highest accuracy, then fewer parameters."""
    children = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return min(children, key=lambda r: (-r.data.metrics["eval/accuracy"], r.data.metrics["model/trainable_params"]))


def test_merged_winner_is_registered_and_reproduces_its_accuracy(trained_store, make_cfg, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, parent_id = trained_store
    assert main(["lora_rank", f"tracking.uri={uri}"]) == 0
    assert "lora_rank-best/1" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    winner = best_child(client, parent_id)
    version = client.get_model_version("lora_rank-best", "1")
    assert version.run_id == winner.info.run_id
    tags = version.tags
    assert tags["sweep"] == "lora_rank" and tags["trial_key"] == winner.data.tags["trial_key"]
    assert tags["metric"] == "eval/accuracy" and tags["merged"] == "true"
    assert float(tags["metric_value"]) == winner.data.metrics["eval/accuracy"]
    assert tags["base_model"] == winner.data.params["model.name_or_path"]
    assert client.get_run(parent_id).data.tags["promoted_model"] == "lora_rank-best version 1"

    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info("models:/lora_rank-best/latest")
    flavor = info.flavors["transformers"]
    assert flavor["task"] == "text-generation" and "peft_adaptor" not in flavor  # merged: plain weights

    cfg = make_cfg("data.max_eval_rows=60")
    accuracy, n = held_out_accuracy("models:/lora_rank-best/latest", cfg)
    # Merging changes the float sums of the LoRA layers (W + BA ahead of time instead of Wx + BAx),
    # which can flip a greedy token only where two logits tie to ~1e-6; allow one such answer.
    assert abs(accuracy - winner.data.metrics["eval/accuracy"]) <= 1 / n + 1e-9
    assert accuracy > 0  # the answers are the task's, not empty strings


def test_unmerged_registers_base_plus_adapter_with_the_same_answers(trained_store, make_cfg):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, parent_id = trained_store
    assert main(["lora_rank", f"tracking.uri={uri}", "name=lora-adapter", "merge=false"]) == 0
    client = MlflowClient(tracking_uri=uri)
    winner = best_child(client, parent_id)
    assert client.get_model_version("lora-adapter", "1").tags["merged"] == "false"
    mlflow.set_tracking_uri(uri)
    assert "peft_adaptor" in mlflow.models.get_model_info("models:/lora-adapter/1").flavors["transformers"]
    accuracy, _ = held_out_accuracy("models:/lora-adapter/1", make_cfg("data.max_eval_rows=60"))
    assert accuracy == winner.data.metrics["eval/accuracy"]  # the adapter computes as in the trial
