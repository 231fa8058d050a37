"""The GPU benchmark script runs end to end on a tiny model (CPU here): when a task gets a GPU,
`python benchmarks/gpu_throughput.py --json out.json` is one command that is known to work."""

from __future__ import annotations

import json
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
