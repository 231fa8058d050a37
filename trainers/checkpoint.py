"""Atomic training checkpoints: a directory is either complete and verified, or ignored.

Layout under a trial's output directory:

    checkpoints/step-000050/
        trainable.safetensors   parameters with requires_grad (the adapter, or the whole model)
        state.pt                optimizer + scheduler state, RNG states, data position
        manifest.json           written last: step and the sha256 of every file above

A sharded (FSDP) model is saved without gathering it: every rank writes its own shards of the
weights and optimizer state with torch.distributed.checkpoint (DCP) and hashes them, rank 0
collects the hashes:

    checkpoints/step-000050/
        sharded/.metadata, sharded/__<rank>_0.distcp   weights + optimizer state, per rank
        state.pt                scheduler state, RNG states, data position
        manifest.json           written last

DCP reshards on load, so such a checkpoint resumes on the same or another number of workers, or
on one (a whole model); a checkpoint of a whole model resumes into a sharded one too.

A checkpoint is written into `.step-000050.partial/`, flushed to disk, and renamed into place;
the manifest is written last, so a directory without a manifest whose hashes match is never
restored from (a crash mid-write leaves only a `.partial` directory, which is cleared). On
restore the ranks of a sharded trial split the hashing and agree on the result.

With a remote location (`storage.path=s3://...`, see trainers/storage.py) `root` is a local
staging directory (one per rank): each checkpoint is also uploaded to `remote/step-000050/`,
every rank its own files, then the manifest last, so an upload cut short is no checkpoint;
restoring downloads the newest one whose manifest is there and whose files match it.
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
SHARDED = "sharded"  # the DCP directory of a sharded model
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
        """Write a checkpoint (when `write`: rank 0). Every rank calls it: a sharded (FSDP) model
        is saved by all ranks together, each writing its own shards."""
        from safetensors.torch import save_file

        from trainers import parallel

        if parallel.is_sharded(model):
            return self._save_sharded(step, model, optimizer, scheduler, extra)
        if not write:
            return None
        staging, final = self._prepare(step)
        save_file(parallel.trainable_state(model), str(staging / "trainable.safetensors"))
        self._write_state(staging, step, scheduler, extra, optimizer=optimizer.state_dict())
        files = {path.name: self._flushed_sha256(path) for path in sorted(staging.iterdir())}
        self._commit(staging, final, step, files)
        if self.remote:
            self._upload(final)
        return final

    def _save_sharded(self, step: int, model, optimizer, scheduler, extra: dict | None) -> Path:
        """All ranks: each writes and hashes its shards, rank 0 adds the rest and the manifest. A
        local root is the trial's directory, shared by its ranks (rank 0 prepares and renames it);
        a remote trial's root is a staging directory per rank, whose files that rank uploads."""
        import torch.distributed as dist

        from trainers import parallel, storage

        rank, world = dist.get_rank(), dist.get_world_size()
        owner = rank == 0 or self.remote is not None
        staging, final = self._prepare(step) if owner else self._paths(step)
        if rank == 0 and self.remote:
            storage.remove(storage.join(self.remote, final.name))  # what an interrupted upload left
        dist.barrier()
        parallel.save_sharded(model, optimizer, staging / SHARDED)  # DCP fsyncs what it writes
        own = [f"{SHARDED}/{p.name}" for p in (staging / SHARDED).iterdir()
               if p.name.startswith(f"__{rank}_") or (rank == 0 and not p.name.startswith("__"))]
        digests = {name: file_sha256(staging / name) for name in own}
        everyone: list = [None] * world
        dist.all_gather_object(everyone, digests)
        if rank == 0:
            self._write_state(staging, step, scheduler, extra)
            own.append("state.pt")
            files = {name: digest for part in everyone for name, digest in part.items()}
            files["state.pt"] = self._flushed_sha256(staging / "state.pt")
            self._commit(staging, final, step, files)
        elif owner:  # a remote trial's other ranks: their own staged shards
            os.replace(staging, final)
            self._prune()
        if self.remote:
            self._upload_files(final, [final / name for name in own])
        dist.barrier()  # every rank's files are in place (and uploaded) before the manifest goes up
        if rank == 0 and self.remote:
            self._upload_files(final, [final / MANIFEST])
            self._prune_remote()
        return final

    def _paths(self, step: int) -> tuple[Path, Path]:
        name = f"step-{step:06d}"
        return self.root / f".{name}.partial", self.root / name

    def _prepare(self, step: int) -> tuple[Path, Path]:
        """(an empty staging directory, the final path) of the checkpoint of `step`."""
        staging, final = self._paths(step)
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging, final

    @staticmethod
    def _write_state(staging: Path, step: int, scheduler, extra: dict | None, **more) -> None:
        import torch

        torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "extra": extra or {},
                    **more}, staging / "state.pt")

    @staticmethod
    def _flushed_sha256(path: Path) -> str:
        _fsync(path)
        return file_sha256(path)

    def _commit(self, staging: Path, final: Path, step: int, files: dict[str, str]) -> None:
        """Manifest last, then the rename into place."""
        manifest = {"step": step, "files": files, "created": time.time(), "fingerprint": self.fingerprint}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _fsync(staging / MANIFEST)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        self._prune()

    def _upload(self, final: Path) -> None:
        from trainers import storage

        storage.remove(storage.join(self.remote, final.name))  # what an interrupted upload of the same step left
        self._upload_files(final, sorted(final.iterdir(), key=lambda p: p.name == MANIFEST))
        self._prune_remote()

    def _upload_files(self, final: Path, paths: list[Path]) -> None:
        from trainers import storage

        target = storage.join(self.remote, final.name)
        for path in paths:
            storage.upload(path, storage.join(target, *path.relative_to(final).parts))

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

    def verify(self, path: Path, share: tuple[int, int] = (0, 1)) -> bool:
        """True when the manifest exists, belongs to this trial, and every file it names has its
        recorded hash. share=(i, n): hash only every n-th file from the i-th (the other ranks
        hash the rest)."""
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
            if self.fingerprint is not None and manifest.get("fingerprint") != self.fingerprint:
                return False
            names = sorted(manifest["files"])
            if not all((path / name).is_file() for name in names):
                return False
            return all(file_sha256(path / name) == manifest["files"][name] for name in names[share[0]::share[1]])
        except (ValueError, KeyError, OSError):
            return False

    def latest(self) -> Path | None:
        """Newest verified checkpoint; half-written or corrupted ones are skipped. Called by every
        rank of a distributed trial (a collective there): over a shared directory the ranks split
        the hashing and take a checkpoint only when all of them found their share intact."""
        if self.remote:
            return self._fetch_latest()
        for leftover in self.root.glob(".*.partial"):
            shutil.rmtree(leftover, ignore_errors=True)
        rank, world = _rank_and_world()
        names = sorted((p.name for p in self.root.glob("step-*") if p.is_dir()), reverse=True)
        for name in _rank0s(names, world):  # a rank that lacks one fails its share, so all skip it
            if _all_agree(self.verify(self.root / name, share=(rank, world)), world):
                return self.root / name
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
        """Every rank restores the same newest checkpoint (from its own copy when remote), into
        the model however it is spread now."""
        import torch
        from safetensors.torch import load_file

        from trainers import parallel

        path = self.latest()
        if path is None:
            return None
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        if (path / SHARDED).is_dir():
            parallel.load_sharded(model, optimizer, path / SHARDED)
        else:
            tensors = load_file(str(path / "trainable.safetensors"))
            names = set(parallel.trainable_names(model))
            unknown = [n for n in tensors if n not in names]
            if unknown:
                raise RuntimeError(f"checkpoint {path} does not match the model (unknown parameters {unknown[:3]})")
            parallel.load_state(model, optimizer, tensors, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        return Restored(step=int(state["step"]), path=path)


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device():
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _rank0s(value, world: int):
    """Rank 0's `value` on every rank, so all ranks walk the same candidates in the same order."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    return box[0]


def _all_agree(ok: bool, world: int) -> bool:
    """True when `ok` holds on every rank (each rank passes its own)."""
    if world == 1:
        return ok
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
