"""Benchmark scripts run end to end on a tiny model (CPU here), so that the one command a lead
reruns on a quiet box (or a task with a GPU) is known to work: gpu_throughput.py, trainer_vs_hf.py,
data_scale.py, logging_overhead.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def test_gpu_throughput_script_runs_tiny_and_counts_flops_per_method(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_throughput.py", "--tiny", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    by_method = {r["method"]: r for r in record["results"]}
    assert set(by_method) == {"full", "lora", "qlora"}
    n = record["params"]
    assert by_method["full"]["trainable_params"] == n
    assert 0 < by_method["lora"]["trainable_params"] == by_method["qlora"]["trainable_params"] < n
    # Same shapes, so the same matmuls: the 4-bit base is counted at its logical size.
    assert by_method["lora"]["flops_per_token"] == by_method["qlora"]["flops_per_token"]
    assert by_method["full"]["flops_per_token"] > by_method["lora"]["flops_per_token"] > 0
    for r in by_method.values():
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
        peak = record["peak_tflops"] * 1e12
        assert abs(r["mfu"] - r["tokens_per_s"] * r["flops_per_token"] / peak) < 1e-12
    assert "| method |" in proc.stdout  # the side-by-side table


@pytest.mark.parametrize("method", ["full", "lora"])
def test_flop_count_matches_torch_flop_counter(method):
    """The benchmark's FLOP/token (an analytic count) against torch.utils.flop_counter on one
    forward + backward of a tiny Llama: the matrix multiplies of its linear layers (attention's
    are left out by both). 8 layers: the count is high only for the first layer's projections."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_throughput import train_flops_per_token

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=256,
                                         tie_word_embeddings=False))
    if method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ids = torch.randint(0, 256, (2, 32))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(n for op, n in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    counted = matmuls / ids.numel()
    assert train_flops_per_token(model) == pytest.approx(counted, rel=0.02)


def test_trainer_vs_hf_tiny_runs_every_in_process_baseline_on_the_same_tokens(tmp_path):
    out = tmp_path / "results.json"
    variants = ("hf,hf+group,trl+pack,trl+padfree,ours,ours+group,ours+pack,ours+padfree,"
                "ours+padfree+gc")  # orch needs Ray: below
    proc = subprocess.run([sys.executable, "benchmarks/trainer_vs_hf.py", "--tiny", "--variants", variants,
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    runs = {v: r[0] for v, r in record["results"].items()}
    assert set(runs) == set(variants.split(","))
    # the padding-free baselines compute no pad position; padded batches do
    for v in ("trl+pack", "trl+padfree", "ours+padfree", "ours+padfree+gc"):
        assert runs[v]["useful"] == runs[v]["computed"] > 0
    assert runs["ours+padfree+gc"]["useful"] == runs["ours+padfree"]["useful"]  # the same rows, recomputed
    assert record["peaks"]["ours+padfree+gc"] < record["peaks"]["ours+padfree"]
    assert 0 < runs["hf"]["useful"] < runs["hf"]["computed"]
    # unpacked variants train on as many examples: their token counts are the same rows' lengths
    # (ours+padfree: a token budget of batch x mean length, i.e. as many tokens a step)
    per_step = {v: runs[v]["useful"] / record["steps"][v] for v in ("hf", "trl+padfree", "ours", "ours+padfree")}
    assert max(per_step.values()) < 1.5 * min(per_step.values())
    assert all(record["peaks"][v] > 0 for v in runs)
    assert "| trl+padfree |" in proc.stdout and "best of ours" in proc.stdout


@pytest.mark.ray
def test_trainer_vs_hf_tiny_orchestrated_trial_reports_its_own_training_time(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "benchmarks/trainer_vs_hf.py", "--tiny", "--variants", "ours,orch",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    orch = json.loads(out.read_text())["results"]["orch"][0]
    assert 0 < orch["train_s"] < orch["wall_s"] and orch["useful"] > 0
    assert "CPU=1" in orch["plan"]  # --tiny: one thread, so the trial alone on the node reserves 1 CPU
    assert "orchestrated trial vs train_loop" in proc.stdout


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_data_scale_tiny_measures_both_first_passes_a_pool_worker_a_trial_and_the_lazy_rows(tmp_path):
    from trainers.data import TOKENIZE_BATCH
    from trainers.prepared import POOL_AFTER_BATCHES, pass_workers

    out = tmp_path / "results.json"
    proc = run_script("benchmarks/data_scale.py", "--tiny", "--json", str(out))
    record = json.loads(out.read_text())
    (size,) = record["sizes"]
    rows, ours, hf, trial = size["rows"], size["ours"], size["datasets"], size["trial"]
    assert rows > POOL_AFTER_BATCHES * TOKENIZE_BATCH  # past what a pass encodes before its pool starts
    assert ours["rows"] == hf["rows"] == trial["rows"] == rows
    assert (ours["status"], trial["status"]) == ("built", "reused")  # the trial reads the first pass's data
    for ratio in (hf["seconds"] / ours["seconds"], ours["peak_rss"] / hf["peak_rss"]):
        assert math.isfinite(ratio) and ratio > 0
    if pass_workers() > 1:
        assert ours["worker_peak_rss"] > 0
    assert trial["data_s"] > 0 and trial["rss_ready"]["VmRSS"] > 0 and trial["rss_before"]["VmRSS"] > 0
    (held,) = record["index"].values()
    assert set(held) == {"examples", "packing", "padding_free"}
    assert all(r["rows"] == rows for r in held.values())
    assert held["examples"]["items"] == rows
    assert 0 < held["padding_free"]["items"] < held["packing"]["items"] < rows  # rows of several examples
    assert all(r["rss_ready"]["VmHWM"] >= r["rss_ready"]["VmRSS"] > 0 for r in held.values())
    assert "| rows | file MB | ours s | datasets.map s |" in proc.stdout and f"| {rows:,} | " in proc.stdout
    assert "| rows held (lazy) | rows as |" in proc.stdout and f"| {rows:,} | padding_free |" in proc.stdout


def test_logging_overhead_tiny_runs_a_trial_at_each_log_every_into_mlflow(tmp_path):
    """A value's trial fails the script unless MLflow holds one train/loss point per logged step."""
    out = tmp_path / "results.json"
    proc = run_script("benchmarks/logging_overhead.py", "--tiny", "--json", str(out))
    record = json.loads(out.read_text())
    assert (record["pairs"], record["base"]) == (1, 250) and record["steps"] < record["base"]
    assert set(record["trials"]) == set(record["ratios"]) == {"1", "250"}
    for value, trials in record["trials"].items():
        assert len(trials) == 1 and all(trials[0][k] > 0 for k in ("wall_s", "train_s", "thread_cpu_s", "cpu_s"))
        assert all(len(r) == 1 and math.isfinite(r[0]) and r[0] > 0 for r in record["ratios"][value].values())
    assert "| train.log_every | wall_s (median) |" in proc.stdout
    assert "\n| 1 | " in proc.stdout and "\n| 250 | " in proc.stdout

