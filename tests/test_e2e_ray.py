"""End to end on a real local Ray: the CLI runs a small LoRA sweep as Ray Tune + Ray Train trials
and everything the MLflow contract promises is there, down to an adapter that reloads with
`PeftModel.from_pretrained` and reproduces the logged eval loss; with `promote=true` the best trial
ends up in the Model Registry (tests/test_promote.py checks what the registered model answers).
A variant whose LoRA targets the model has no layer of is skipped before Ray with its reason, and
the sweep still exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
STEP_METRICS = ("train/loss", "train/lr", "train/tokens_per_s")
FINAL_METRICS = ("eval/loss", "eval/perplexity", "eval/accuracy", "model/trainable_params", "model/total_params",
                 "model/adapter_bytes", "mem/peak_bytes", "perf/tokens_per_s", "time/train_s")


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "-m", "orchestrator", "+sweep=lora_rank", "sweep.axes={method.r:[2,8]}",
           "sweep.variants=[{},{method.target_modules:[c_attn]}]",  # GPT-2's name: not in the embedded Llama
           "train.max_steps=30", "train.log_every=10", "data.max_train_rows=400", "data.max_eval_rows=40",
           "cluster.num_cpus=2", "promote=true"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    return work, proc


def test_sweep_exits_zero_with_progress_and_table(sweep_run):
    work, proc = sweep_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "sweep lora_rank: 2 trial(s)" in out
    assert out.count("FINISHED") >= 4  # two progress lines + two table rows
    table = out[out.index("eval loss"):]
    assert "lora r=2" in table and "lora r=8" in table
    assert "Configuration for experiment" not in out, "Ray's own console output must go to the log file"


def test_a_variant_the_model_cannot_take_is_skipped_with_its_reason(sweep_run):
    from mlflow.tracking import MlflowClient

    work, proc = sweep_run
    out = proc.stdout
    assert "sweep lora_rank: 2 trial(s) (+2 skipped as inapplicable)" in out
    table = out[out.index("eval loss"):]
    for r in (2, 8):
        assert f"lora target_modules=['c_attn'] r={r}: INAPPLICABLE - method.target_modules: lora on" in table
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_rank")
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'lora_rank'")[0]
    assert parent.data.tags["skipped_trials"].startswith("2 inapplicable to the model")


def test_mlflow_contract(sweep_run):
    from mlflow.tracking import MlflowClient

    work, _ = sweep_run
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lora_rank")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "lora_rank"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/comparison.md", "report/comparison.csv"} <= report

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.params["method.r"]) for c in children) == [2, 8]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["stage"] == "sft" and child.data.tags["method"] == "lora"
        assert len(child.data.tags["trial_key"]) == 12
        assert child.data.params["method.name"] == "lora" and "train.lr" in child.data.params
        # The embedded tokenizer has no chat template: auto resolved to plain, logged so, with its hash.
        assert child.data.params["data.template"] == "plain"
        assert len(child.data.tags["env.data.template_sha256"]) == 64
        for name in STEP_METRICS:
            history = client.get_metric_history(child.info.run_id, name)
            assert [m.step for m in history] == [10, 20, 30], name
        for name in FINAL_METRICS:
            assert name in child.data.metrics, name
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"adapter", "config.yaml"} <= artifacts
        files = {a.path for a in client.list_artifacts(child.info.run_id, "adapter")}
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    trainable = {int(c.data.params["method.r"]): c.data.metrics["model/trainable_params"] for c in children}
    assert trainable[8] == 4 * trainable[2]  # LoRA parameters grow linearly with rank
    # No run of this sweep is left open.
    assert all(r.info.status in ("FINISHED",) for r in runs)


def test_logged_adapter_reloads_and_reproduces_eval_loss(sweep_run, tmp_path):
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient
    from peft import PeftModel

    from orchestrator.compose import compose
    from trainers.data import load_rows, tokenize_split
    from trainers.evaluate import eval_loss
    from trainers.model import load_base_model, load_tokenizer

    work, _ = sweep_run
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lora_rank")
    child = client.search_runs([experiment.experiment_id], filter_string="params.`method.r` = '8'")[0]
    mlflow.set_tracking_uri(uri)
    adapter_dir = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="adapter",
                                                      dst_path=str(tmp_path))
    cfg = compose(["data.max_eval_rows=40"])
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg, torch.device("cpu"))
    model = PeftModel.from_pretrained(base, adapter_dir)
    fmt, rows, sources = load_rows(cfg.data.eval_file, cfg.data.format, cfg.data.max_eval_rows)
    split = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, cfg.data.overlength)
    loss = eval_loss(model, split.examples, 64, tokenizer.pad_token_id, torch.device("cpu"))
    assert loss == pytest.approx(child.data.metrics["eval/loss"], rel=1e-4, abs=1e-5)


def test_promote_true_registers_the_best_trial_and_the_report_names_it(sweep_run):
    from mlflow.tracking import MlflowClient

    work, proc = sweep_run
    assert "as models:/lora_rank-best/1 (merged)" in proc.stdout, proc.stdout[-2000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    version = client.get_model_version("lora_rank-best", "1")
    experiment = client.get_experiment_by_name("lora_rank")
    children = client.search_runs([experiment.experiment_id], filter_string="tags.trial_key != ''")
    best = max(c.data.metrics["eval/accuracy"] for c in children)
    assert client.get_run(version.run_id).data.metrics["eval/accuracy"] == best
    parent = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'lora_rank'")[0]
    report = client.download_artifacts(parent.info.run_id, "report/comparison.md", str(work))
    assert "Promoted to the MLflow Model Registry: lora_rank-best version 1" in open(report).read()
