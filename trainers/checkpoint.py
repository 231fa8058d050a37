"""Atomic training checkpoints: a directory is either complete and verified, or ignored.

Layout under a trial's output directory:

    checkpoints/step-000050/
        trainable.safetensors   parameters with requires_grad (the adapter, or the whole model)
        state.pt                optimizer + scheduler state, RNG states, data position
        manifest.json           written last: step and the sha256 of every file above

A checkpoint is written into `.step-000050.partial/`, flushed to disk, and renamed into place;
the manifest is written last, so a directory without a manifest whose hashes match is never
restored from (a crash mid-write leaves only a `.partial` directory, which is cleared).

With a remote location (`storage.path=s3://...`, see trainers/storage.py) `root` is a local
staging directory: each checkpoint is also uploaded to `remote/step-000050/`, manifest last, so
an upload cut short is no checkpoint; restoring downloads the newest one whose manifest is there
and whose files match it.
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


def file_sha256(path: Path) -> str:
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

    def __init__(self, root: Path, keep_last: int = KEEP_LAST, remote: str | None = None,
                 fingerprint: str | None = None):
        self.root = Path(root)
        self.keep_last = keep_last
        self.remote = remote
        # What the checkpoint belongs to (config + base weights): another trial's, or one from
        # before the base model changed, is never restored.
        self.fingerprint = fingerprint

    def save(self, step: int, model, optimizer, scheduler, extra: dict | None = None,
             write: bool = True) -> Path | None:
        """Write a checkpoint (when `write`: rank 0). Every rank calls it: gathering the state of
        a sharded (FSDP) model is a collective."""
        import torch
        from safetensors.torch import save_file

        from trainers import parallel

        if not write and not parallel.is_sharded(model):
            return None
        trainable = parallel.trainable_state(model)
        optimizer_state = parallel.optimizer_state(model, optimizer)
        if not write:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:06d}"
        staging = self.root / f".{name}.partial"
        final = self.root / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_file(trainable, str(staging / "trainable.safetensors"))
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "extra": extra or {}}, staging / "state.pt")
        files = {}
        for path in sorted(staging.iterdir()):
            _fsync(path)
            files[path.name] = file_sha256(path)
        manifest = {"step": step, "files": files, "created": time.time(), "fingerprint": self.fingerprint}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync(staging / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        self._prune()
        if self.remote:
            self._upload(final)
        return final

    def _upload(self, final: Path) -> None:
        from trainers import storage

        target = storage.join(self.remote, final.name)
        storage.remove(target)  # what an interrupted upload of the same step left
        for path in sorted(final.iterdir(), key=lambda p: p.name == MANIFEST):
            storage.upload(path, storage.join(target, path.name))
        self._prune_remote()

    def _prune_remote(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and old partial uploads."""
        from trainers import storage

        names = [n for n in storage.list_dirs(self.remote) if n.startswith("step-")]
        complete = [n for n in names if storage.exists(storage.join(self.remote, n, MANIFEST))]
        keep = set(complete[-self.keep_last:])
        for name in names:
            if name not in keep and complete and name < complete[-1]:
                storage.remove(storage.join(self.remote, name))

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in complete[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def verify(self, path: Path) -> bool:
        """True when the manifest exists, belongs to this trial, and every file it names has its
        recorded hash."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
            if self.fingerprint is not None and manifest.get("fingerprint") != self.fingerprint:
                return False
            return all((path / name).is_file() and file_sha256(path / name) == digest
                       for name, digest in manifest["files"].items())
        except (ValueError, KeyError, OSError):
            return False

    def latest(self) -> Path | None:
        """Newest verified checkpoint; half-written or corrupted ones are skipped."""
        if self.remote:
            return self._fetch_latest()
        if not self.root.is_dir():
            return None
        for leftover in self.root.glob(".*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        for path in sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True):
            if self.verify(path):
                return path
        return None

    def _fetch_latest(self) -> Path | None:
        """Download the newest remote checkpoint that verifies into `root` (a cache, cleared first)."""
        from trainers import storage

        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        names = sorted((n for n in storage.list_dirs(self.remote) if n.startswith("step-")), reverse=True)
        for name in names:
            partial = self.root / f".{name}.partial"
            source = storage.join(self.remote, name)
            if not storage.download(storage.join(source, MANIFEST), partial / MANIFEST):
                continue  # an upload that did not finish
            storage.download(source, partial)
            if self.verify(partial):
                os.replace(partial, self.root / name)
                return self.root / name
            shutil.rmtree(partial, ignore_errors=True)
        return None

    def restore(self, model, optimizer, scheduler) -> Restored | None:
        """Every rank restores the same newest checkpoint (from its own copy when remote)."""
        import torch
        from safetensors.torch import load_file

        from trainers import parallel

        path = self.latest()
        if path is None:
            return None
        tensors = load_file(str(path / "trainable.safetensors"))
        names = set(parallel.trainable_names(model))
        unknown = [n for n in tensors if n not in names]
        if unknown:
            raise RuntimeError(f"checkpoint {path} does not match the model (unknown parameters {unknown[:3]})")
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        parallel.load_state(model, optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return Restored(step=int(state["step"]), path=path)
