"""Everything a recipe needs besides its config: where to write, whom to tell, which device."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainers import timeline
from trainers.checkpoint import CheckpointManager
from trainers.config import ExperimentConfig
from trainers.faults import FaultPlan
from trainers.identity import digest, identity
from trainers.runtime import DistInfo, PeakMemory
from trainers.storage import TrialStorage
from trainers.tracking import Tracker


@dataclass
class TrialContext:
    cfg: ExperimentConfig
    output_dir: Path
    device: object
    dist: DistInfo = field(default_factory=DistInfo)
    tracker: Tracker = field(default_factory=Tracker)
    # Where the outputs persist; output_dir is its local side (a staging dir when it is remote).
    storage: TrialStorage | None = None
    # Where prepared (tokenized) data lives; None: <storage.path>/prepared (trainers.prepared).
    prepared_dir: str | None = None

    def __post_init__(self):
        self.started = time.perf_counter()  # the worker's start of data loading (time/data_s)
        if self.storage is None:
            self.storage = TrialStorage(self.output_dir, self.dist.rank)
        self.memory = PeakMemory(self.device)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints",
                                             remote=self.storage.remote_join("checkpoints"),
                                             fingerprint=trial_fingerprint(self.cfg))
        self.faults = FaultPlan.from_env(self.output_dir, self.dist.rank)

    def stage_data(self, tokenizer):
        """The stage's prepared data (trainers.prepared.StageData): opened where the driver's
        validation built it, else built here; tagged `data/prepared` (built | reused)."""
        from trainers.prepared import stage_data

        data = stage_data(self.cfg, tokenizer, self.prepared_dir, started=self.started)
        self.tracker.set_tags({"data/prepared": data.status})
        return data

    def wrap_parallel(self, model):
        """The model as the training loop drives it: DDP over the ranks, or FSDP with train.fsdp."""
        from trainers import parallel

        return parallel.wrap(model, self.dist, self.device, fsdp=self.cfg.train.fsdp)

    def gather_model(self, model, build):
        """The trained model for rank 0's evaluation and saving. Under FSDP every rank must call
        this (it gathers the shards) and rank 0 gets a plain copy made by `build()`."""
        from trainers import parallel

        return parallel.gather_model(model, build, self.dist)

    def barrier(self) -> None:
        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def save_artifact(self, spec, model, tokenizer) -> Path:
        """Save the method's artifact under output_dir/{adapter,model}: written aside, renamed into place."""
        final = self.output_dir / spec.saves
        staging = self.output_dir / f".{spec.saves}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        spec.save(model, staging)
        if spec.saves == "model":
            tokenizer.save_pretrained(str(staging))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        self.tracker.log_artifacts(str(final), spec.saves)
        return final

    def save_outputs(self, spec, model, tokenizer) -> dict[str, float]:
        """Rank 0's closing step of a recipe: measured peak memory, then the saved artifact."""
        metrics = {"mem/peak_bytes": self.memory.peak_bytes()}
        metrics["model/adapter_bytes"] = self.artifact_bytes(self.save_artifact(spec, model, tokenizer))
        return metrics

    def finish(self, spec, model, tokenizer, metrics: dict[str, float], evaluate=None) -> dict[str, float]:
        """A recipe's closing step: rank 0 evaluates the trained model (`evaluate(model)` -> metrics)
        and saves its outputs; the other ranks wait at the barrier. Returns `metrics`, updated."""
        if self.dist.is_main:
            if evaluate is not None:
                metrics.update(evaluate(model))
            timeline.mark("evaluated")
            metrics.update(self.save_outputs(spec, model, tokenizer))
            timeline.mark("saved")
        self.barrier()
        return metrics

    def estimated_peak_bytes(self, seq_len: int | None = None, eval_seq_len: int | None = None) -> int | None:
        """The memory estimator's prediction for this trial, logged beside the measured peak; None
        for a method or model shape the estimator does not model."""
        from trainers.memory import estimate

        try:
            return estimate(self.cfg, device=getattr(self.device, "type", None), seq_len=seq_len,
                            eval_seq_len=eval_seq_len).peak_bytes
        except (ValueError, OSError):
            return None

    def step_cost(self, model):
        """What one micro-batch of this trial costs (trainers.flops.StepCounter), from the loaded
        model's own config; None for a model the FLOPs model does not know (no perf/train_flops)."""
        from trainers.flops import StepCounter
        from trainers.parallel import unwrap

        try:
            return StepCounter(self.cfg, unwrap(model).config)
        except (ValueError, AttributeError):
            return None

    @staticmethod
    def artifact_bytes(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def trial_fingerprint(cfg: ExperimentConfig) -> str:
    """Hash of what a trial's training state depends on: its config (trainers/identity.py), its
    data files' contents and the identity of its base weights (config.json and weight file sizes
    of a local model)."""
    import dataclasses
    import hashlib

    from trainers.model import resolve_model_path

    config = identity(dataclasses.asdict(cfg))
    model_dir = Path(resolve_model_path(cfg.model.name_or_path))
    weights = []
    if model_dir.is_dir():
        config_file = model_dir / "config.json"
        weights.append(hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else "")
        weights += sorted(f"{p.name}:{p.stat().st_size}" for p in model_dir.glob("*.safetensors"))
        build = model_dir / "BUILD.json"  # the embedded base records its own build
        if build.is_file():
            weights.append(hashlib.sha256(build.read_bytes()).hexdigest())
    from trainers.data import data_fingerprint

    return digest([config, weights, data_fingerprint(cfg.data)], 16)
