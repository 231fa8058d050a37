"""Everything a recipe needs besides its config: where to write, whom to tell, which device."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trainers.checkpoint import CheckpointManager
from trainers.config import ExperimentConfig
from trainers.faults import FaultPlan
from trainers.runtime import DistInfo, PeakMemory
from trainers.tracking import Tracker


@dataclass
class TrialContext:
    cfg: ExperimentConfig
    output_dir: Path
    device: object
    dist: DistInfo = field(default_factory=DistInfo)
    tracker: Tracker = field(default_factory=Tracker)

    def __post_init__(self):
        self.memory = PeakMemory(self.device)
        self.checkpoints = CheckpointManager(self.output_dir / "checkpoints")
        self.faults = FaultPlan.from_env(self.output_dir, self.dist.rank)

    def wrap_ddp(self, model):
        if self.dist.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if getattr(self.device, "type", "cpu") == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

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

    @staticmethod
    def artifact_bytes(directory: Path) -> int:
        return sum(p.stat().st_size for p in directory.glob("*.safetensors"))
