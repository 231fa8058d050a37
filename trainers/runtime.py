"""Process-level helpers of a trial: seeding, threads, distributed rank, device, peak memory."""

from __future__ import annotations

import functools
import os
import random
import threading
import weakref
from dataclasses import dataclass


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(cpus: int | None) -> None:
    """torch's intra-op threads = the CPUs reserved for this worker (None: leave torch's default,
    one per core). A Ray worker starts with OMP_NUM_THREADS at its reservation; setting torch's
    count too holds whatever the environment says."""
    import torch

    if cpus is not None and torch.get_num_threads() != cpus:
        torch.set_num_threads(cpus)


def pick_device(use_gpu: bool, local_rank: int = 0):
    import torch

    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu=true but no CUDA device is visible to this process")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


class LiveTensorBytes:
    """Bytes held by live CPU tensor storages, and their peak, from `enter()` to `exit()`.

    A torch dispatch mode sees every aten op (forward, backward, optimizer and bitsandbytes ops
    alike). Each storage an op reads or writes is counted once (views share it) from the moment it
    is first seen until it is freed (a weakref callback on the storage). Storages alive before
    `enter()` are ignored. Reading inputs too catches tensors made outside the dispatcher, such as
    weights memory-mapped from safetensors, at their first use. Not seen: memory a kernel
    allocates and frees internally (matmul/attention scratch), and other threads (dispatch modes
    are thread-local).
    """

    SKIP, READ, RESIZE = 0, 1, 2  # what an op can do to the sizes of live storages

    def __init__(self):
        self.live: dict[int, list] = {}  # storage key -> [bytes, weakref to the storage]
        self.live_bytes = 0
        self.peak = 0
        self._ignored: set[int] = set()
        self._op_kinds: dict[int, tuple] = {}
        self._mode = None

    def enter(self) -> None:
        import gc

        import torch

        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # not isinstance: it wakes lazy module proxies
                self._ignore(obj)
        self.watch()

    def watch(self) -> None:
        """(Again) see the ops of this thread. Storages made while not watching count from their
        first use, as weights loaded outside the dispatcher do."""
        if self._mode is None:
            self._mode = _storage_tracking_mode()(self)
            self._mode.__enter__()

    def exit(self) -> None:
        """Stop seeing new storages; frees of counted ones still register."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if self._mode is None:
            return
        if _get_current_dispatch_mode() is self._mode:
            self._mode.__exit__(None, None, None)
        else:  # another mode was pushed on top: leave the stack alone, stop counting
            self._mode.tracker = None
        self._mode = None

    def op_kind(self, func) -> int:
        """View ops only alias what their input holds; resize_, set_ and out= variants may change
        the size of a storage already counted (in-place arithmetic never does)."""
        kind = self._op_kinds.get(id(func))  # by id: an OpOverload's own __hash__ is slow Python
        if kind is None:
            name = func.overloadpacket.__name__
            kind = (self.SKIP if func.is_view else
                    self.RESIZE if name.startswith(("resize", "set_")) or "out" in func._overloadname else
                    self.READ)
            self._op_kinds[id(func)] = (func, kind)  # holding func keeps its id unique
            return kind
        return kind[1]

    @staticmethod
    def _storage(tensor):
        if not tensor.is_cpu:
            return None
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, or a subclass without storage
            return None

    def _ignore(self, tensor) -> None:
        storage = self._storage(tensor)
        if storage is None or storage._cdata in self._ignored:
            return
        self._ignored.add(storage._cdata)
        weakref.finalize(storage, self._ignored.discard, storage._cdata)

    def note(self, tensor, resized: bool = False) -> None:
        """Count `tensor`'s storage if it is new (or, if it may have been resized, its new size)."""
        storage = self._storage(tensor)
        if storage is None:
            return
        key = storage._cdata
        entry = self.live.get(key)
        if entry is not None and not resized:
            return
        nbytes = storage.nbytes()
        if entry is None:
            if key in self._ignored or nbytes == 0:
                return
            # a weakref with a callback costs far less than weakref.finalize; the entry keeps it
            entry = self.live[key] = [0, weakref.ref(storage, functools.partial(self._free, key))]
        old = entry[0]
        if old == nbytes:
            return
        entry[0] = nbytes
        self.live_bytes += nbytes - old
        if self.live_bytes > self.peak:
            self.peak = self.live_bytes

    def _free(self, key: int, _ref=None) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.live_bytes -= entry[0]


def steps_to_watch(shapes: list[tuple[int, int] | None]) -> set[int]:
    """Indexes of the training steps whose peak memory must be watched for the run's peak, given
    each step's (rows, padded width), None where unknown: the first step (it creates the
    optimizer state; watching it counts that state from the start), every step of unknown shape,
    and of the later steps the first one of each shape that no other later step's shape covers
    (as many rows or more and as wide or wider): a covered step holds the same optimizer state
    and smaller activations, so it cannot exceed the step that covers it."""
    watch = {0} if shapes else set()
    first: dict[tuple[int, int], int] = {}
    for index, shape in enumerate(shapes[1:], 1):
        if shape is None:
            watch.add(index)
        else:
            first.setdefault(tuple(shape), index)
    widest = -1
    for rows, width in sorted(first, reverse=True):  # most rows first; among equal rows, widest first
        if width > widest:  # not covered by a shape with more rows (or the same rows, wider)
            watch.add(first[(rows, width)])
            widest = width
    return watch


def _storage_tracking_mode():
    """The dispatch mode class behind LiveTensorBytes (built on first use: importing torch is slow)."""
    global _STORAGE_TRACKING_MODE
    if _STORAGE_TRACKING_MODE is not None:
        return _STORAGE_TRACKING_MODE
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    Tensor = torch.Tensor

    class StorageTrackingMode(TorchDispatchMode):
        def __init__(self, tracker: LiveTensorBytes):
            super().__init__()
            self.tracker = tracker

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # torch would wrap __torch_dispatch__ in a Dynamo-disabling frame: ~2 us on every op,
            # a third of this mode's cost; nothing is torch.compile'd under it
            return False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tracker = self.tracker
            if tracker is None:
                return out
            kind = tracker.op_kind(func)
            if kind == LiveTensorBytes.SKIP:
                return out
            resized = kind == LiveTensorBytes.RESIZE
            live, note = tracker.live, tracker.note
            groups = (args, out if isinstance(out, (tuple, list)) else (out,))
            if kwargs:
                groups += (tuple(kwargs.values()),)
            for group in groups:
                for item in group:
                    if isinstance(item, Tensor):
                        items = (item,)
                    elif isinstance(item, (tuple, list)):
                        items = [sub for sub in item if isinstance(sub, Tensor)]
                    else:
                        continue
                    for tensor in items:
                        try:  # the common case, inlined: a CPU storage counted already
                            if not resized and tensor.is_cpu and tensor.untyped_storage()._cdata in live:
                                continue
                        except (RuntimeError, NotImplementedError):
                            continue
                        note(tensor, resized)
            return out

    _STORAGE_TRACKING_MODE = StorageTrackingMode
    return StorageTrackingMode


_STORAGE_TRACKING_MODE = None
_WATCHING = threading.local()  # the LiveTensorBytes a PeakMemory left on this thread, if any


class PeakMemory:
    """Peak bytes of tensors allocated by the work between start() and peak_bytes().

    The number means the same on both devices: the high-water mark of bytes held by live tensor
    storages created after start() - parameters at their stored width (a 4-bit weight counts half
    a byte), gradients, optimizer states, activations saved for backward, and each op's transient
    tensors (logits, the loss's softmax, dequantized weights...). It excludes allocator caching
    and fragmentation, kernel scratch space and the Python/torch runtime itself;
    `trainers.memory.estimate(cfg).peak_bytes` predicts it.

    CUDA: torch.cuda.max_memory_allocated (allocator statistics, free).
    CPU: LiveTensorBytes, a dispatch mode that watches the aten ops of the calling thread until
    peak_bytes() or stop(), except in the training steps that cannot set a new peak (plan()):
    about 5 us per op watched, which would be +35-40% CPU time on the ~1M-parameter default model
    if every step were watched (benchmarks/README.md).
    """

    def __init__(self, device):
        self.device = device
        self._tracker: LiveTensorBytes | None = None
        self._stopped = False
        self._steps = 0
        self._skipping = False
        self._plan: set[int] | None = None  # indexes (0 = the first step run) of the steps to watch
        self.steps_watched = 0

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        left_on = getattr(_WATCHING, "tracker", None)
        if left_on is not None:  # a previous trial on this thread ended without peak_bytes()
            left_on.exit()
        self._tracker = _WATCHING.tracker = LiveTensorBytes()
        self._tracker.enter()

    @property
    def watches_steps(self) -> bool:
        """True while begin_step decides which steps to watch (CPU tracking started, not stopped)."""
        return self._tracker is not None and not self._stopped

    def plan(self, shapes: list[tuple[int, int] | None]) -> None:
        """Every step's (rows, padded width) of its largest micro-batch (None: not token rows), in the
        order the loop will run them, known before it starts (the data order is a function of the
        seed): begin_step then watches only the steps in `steps_to_watch(shapes)`, the fewest that
        still contain the peak."""
        self._plan = steps_to_watch(shapes)

    def begin_step(self) -> None:
        """The training loop's call before each optimizer step. On CPU only the steps plan() named
        are watched (a run of one batch size watches 2), without a plan every step. Each watched
        step costs ~5-40 us per aten op (a fifth of a step on a 135M model, 2 threads)."""
        if self._tracker is None or self._stopped:
            return
        self._steps += 1
        if self._plan is not None and self._steps - 1 not in self._plan:
            self._tracker.exit()
            self._skipping = True
            return
        self.steps_watched += 1

    def end_step(self) -> None:
        """After the step begin_step announced: watching resumes (evaluation is always watched)."""
        if self._skipping and not self._stopped:
            self._tracker.watch()
        self._skipping = False

    def stop(self) -> None:
        """Stop watching (CPU); the peak so far is kept. Safe to call more than once."""
        self._stopped = True
        if self._tracker is not None:
            self._tracker.exit()
            if getattr(_WATCHING, "tracker", None) is self._tracker:
                _WATCHING.tracker = None

    def peak_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._tracker is None:
            return 0
        self.stop()
        return int(self._tracker.peak)
