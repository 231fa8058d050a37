"""The GPU benchmark script runs end to end on a tiny model (CPU here): when a task gets a GPU,
`python benchmarks/gpu_throughput.py --json out.json` is one command that is known to work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert by_method["full"]["flops_per_token"] == 6 * n
    assert by_method["lora"]["flops_per_token"] == by_method["qlora"]["flops_per_token"] == 4 * n
    for r in by_method.values():
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
        peak = record["peak_tflops"] * 1e12
        assert abs(r["mfu"] - r["tokens_per_s"] * r["flops_per_token"] / peak) < 1e-12
    assert "| method |" in proc.stdout  # the side-by-side table
