"""Atomic training checkpoints: a directory is either complete and verified, or ignored.

Layout under a trial's output directory:

    checkpoints/step-000050/
        trainable.safetensors   parameters with requires_grad (the adapter, or the whole model)
        state.pt                optimizer + scheduler state, RNG states, data position
        manifest.json           written last: step and the sha256 of every file above

A checkpoint is written into `.step-000050.partial/`, flushed to disk, and renamed into place;
the manifest is written last, so a directory without a manifest whose hashes match is never
restored from (a crash mid-write leaves only a `.partial` directory, which is cleared).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
KEEP_LAST = 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Restored:
    step: int
    path: Path


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((version, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and restores the training state of one trial under `root` (rank 0 writes)."""

    def __init__(self, root: Path, keep_last: int = KEEP_LAST):
        self.root = Path(root)
        self.keep_last = keep_last

    def save(self, step: int, model, optimizer, scheduler, extra: dict | None = None) -> Path:
        import torch
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        staging = self.root / f".{name}.partial"
        final = self.root / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(staging / "trainable.safetensors"))
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "extra": extra or {}}, staging / "state.pt")
        files = {}
        for path in sorted(staging.iterdir()):
            _fsync(path)
            files[path.name] = _sha256(path)
        manifest = {"step": step, "files": files, "created": time.time()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync(staging / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        self._prune()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> bool:
        """True when the manifest exists and every file it names has its recorded hash."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
            return all((path / name).is_file() and _sha256(path / name) == digest
                       for name, digest in manifest["files"].items())
        except (ValueError, KeyError, OSError):
            return False

    def latest(self) -> Path | None:
        """Newest verified checkpoint; half-written or corrupted ones are skipped."""
        if not self.root.is_dir():
            return None
        for leftover in self.root.glob(".*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        for path in sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True):
            if self.verify(path):
                return path
        return None

    def restore(self, model, optimizer, scheduler) -> Restored | None:
        import torch
        from safetensors.torch import load_file

        path = self.latest()
        if path is None:
            return None
        tensors = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise RuntimeError(f"checkpoint {path} does not match the model (unknown parameters {missing[:3]})")
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor.to(params[name].device))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return Restored(step=int(state["step"]), path=path)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
