"""Nothing lost, without Ray: atomic checkpoints, exact resume, fault hooks, secrets kept out."""

from __future__ import annotations

import json
import sys

import pytest

from trainers.checkpoint import CheckpointManager
from trainers.training import NonFiniteLossError, TrialTimeLimitError
from trainers.trial import run_trial

SMALL = ["train.max_steps=24", "train.log_every=4", "train.checkpoint_every=8", "method.dropout=0.1",
         "data.max_train_rows=256", "data.max_eval_rows=32"]


@pytest.fixture
def faults(monkeypatch):
    def set_faults(*specs):
        monkeypatch.setenv("FTLAB_FAULTS", json.dumps(list(specs)))

    return set_faults


def test_crash_then_rerun_resumes_to_the_same_result(make_cfg, tmp_path, faults, monkeypatch):
    cfg = make_cfg(*SMALL)
    reference = run_trial(cfg, tmp_path / "reference")
    faults({"kind": "raise", "step": 13})
    with pytest.raises(RuntimeError, match="injected fault at step 13"):
        run_trial(cfg, tmp_path / "crashy")
    assert sorted(p.name for p in (tmp_path / "crashy" / "checkpoints").iterdir()) == ["step-000008"]
    resumed = run_trial(cfg, tmp_path / "crashy")  # the fault fires once; the rerun resumes
    assert resumed["train/resumed_from_step"] == 8
    # Same data order, RNG (dropout) and optimizer state: the resumed run is the uninterrupted one.
    assert resumed["eval/loss"] == pytest.approx(reference["eval/loss"], abs=1e-6)
    assert resumed["train/final_loss"] == pytest.approx(reference["train/final_loss"], abs=1e-6)
    # the cumulative compute counts the steps before the checkpoint too (replayed from the stream)
    assert resumed["perf/train_flops"] == pytest.approx(reference["perf/train_flops"], rel=1e-12)
    assert resumed["perf/train_tokens"] == reference["perf/train_tokens"]


def test_half_written_or_corrupted_checkpoints_are_never_restored(make_cfg, tmp_path):
    cfg = make_cfg(*SMALL)
    run_trial(cfg, tmp_path / "t")
    manager = CheckpointManager(tmp_path / "t" / "checkpoints")
    newest = manager.latest()
    assert newest.name == "step-000016"
    # A crash during a save leaves a .partial directory; a bit flip breaks a hash.
    (manager.root / ".step-000024.partial").mkdir()
    (manager.root / ".step-000024.partial" / "trainable.safetensors").write_bytes(b"garbage")
    data = bytearray((newest / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "trainable.safetensors").write_bytes(bytes(data))
    assert not manager.verify(newest)
    assert manager.latest().name == "step-000008"
    assert not (manager.root / ".step-000024.partial").exists()
    # A directory without its manifest (written last) is not a checkpoint either.
    (manager.root / "step-000008" / "manifest.json").unlink()
    assert manager.latest() is None


def test_non_finite_loss_fails_without_promoting_a_checkpoint(make_cfg, tmp_path, faults):
    faults({"kind": "nan", "step": 11, "once": False})
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 11"):
        run_trial(make_cfg(*SMALL), tmp_path / "nan")
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()] == ["step-000008"]


def test_time_limit(make_cfg, tmp_path, faults):
    faults({"kind": "sleep", "step": 3, "seconds": 0.5})
    with pytest.raises(TrialTimeLimitError, match="train.time_limit_s=0.3"):
        run_trial(make_cfg(*SMALL, "train.time_limit_s=0.3"), tmp_path / "slow")


def test_secrets_never_become_params():
    from orchestrator.tracking import config_params

    params = config_params({"tracking": {"uri": "http://alice:s3cret@mlflow:5000"},
                            "model": {"hf_token": "hf_abc", "name_or_path": "x"},
                            "storage": {"aws_secret_access_key": "k", "path": "s3://b/p"}})
    assert "model.hf_token" not in params and "storage.aws_secret_access_key" not in params
    assert params["tracking.uri"] == "http://***@mlflow:5000"
    assert "s3cret" not in json.dumps(params)


def test_pickle_weights_are_refused_unless_allowed(tmp_path, make_cfg):
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.model import load_base_model, resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:base"))
    pickled = tmp_path / "pickled"
    model.config.save_pretrained(pickled)  # transformers 5 only writes safetensors: pickle by hand
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    cfg = make_cfg(f"model.name_or_path={tmp_path / 'pickled'}")
    with pytest.raises(OSError, match="allow_pickle"):
        load_base_model(cfg, torch.device("cpu"))
    allowed = make_cfg(f"model.name_or_path={tmp_path / 'pickled'}", "model.allow_pickle=true")
    assert load_base_model(allowed, torch.device("cpu")) is not None


def test_checkpoints_of_another_config_are_not_restored(make_cfg, tmp_path):
    run_trial(make_cfg(*SMALL), tmp_path / "shared")
    other = run_trial(make_cfg(*SMALL, "train.lr=1e-3"), tmp_path / "shared")
    assert other["train/resumed_from_step"] == 0
    again = run_trial(make_cfg(*SMALL, "train.lr=1e-3"), tmp_path / "shared")
    assert again["train/resumed_from_step"] == 16  # its own checkpoints are


# Two trials, one process, under an address-space limit of what it has mapped after loading the
# model plus LIMIT_MIB: a batch of 8 trains and evaluates in it; a batch of 2048 needs ~1 GiB for
# its logits alone, and one of its allocations really fails.
LIMITED_TRIALS = """
import resource, sys
import torch
from orchestrator.compose import compose
from trainers.model import load_base_model
from trainers.trial import run_trial

common = ["train.max_steps=2", "train.eval_batch_size=8", "data.max_eval_rows=8", "train.cpus_per_worker=1"]
load_base_model(compose(common), torch.device("cpu"))  # libraries and first allocations mapped before the limit
mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (mapped + %d * 2**20, resource.RLIM_INFINITY))
run_trial(compose(common + ["train.batch_size=8"]), sys.argv[1] + "/fits")
run_trial(compose(common + ["train.batch_size=2048"]), sys.argv[1] + "/too-big")
"""
LIMIT_MIB = 384


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_out_of_memory_fails_the_trial_with_its_reason(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", LIMITED_TRIALS % LIMIT_MIB, str(tmp_path)], cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo), "MALLOC_ARENA_MAX": "2"},
                          capture_output=True, text=True, timeout=300)
    assert (tmp_path / "fits" / "metrics.json").exists(), proc.stderr[-3000:]  # the limit alone fails nothing
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("trainers.trial.TrialOutOfMemoryError: out of memory on cpu"), proc.stderr[-3000:]
    assert "train.batch_size=2048" in last
    # The allocation that fails depends on the machine (its threads' malloc arenas and stacks share
    # the limit): torch's CPU allocator ("can't allocate memory") or a Rust loader's MemoryError
    # ("Cannot allocate memory (os error 12)"); either way the allocator's words are kept.
    assert "allocate memory" in last.lower(), last
    # Nothing half-written is taken for a result.
    assert not any((tmp_path / "too-big" / name).exists() for name in ("adapter", "metrics.json", "lineage.json"))
