"""What fits a memory limit: sizes as users type them, and the largest micro-batch per method.

    python -m trainers.memory fit llama-3-8b --memory 24GiB --seq-len 2048 --global-batch 64

A trial fits a limit when its estimate's total does: the peak of live tensors plus the runtime
overhead (CUDA context, or the Python/torch process), the same number `dry_run=true` prints and
`sweep.memory_limit` is compared with (orchestrator/memcap.py). Per method x precision, `fit`
searches the largest micro-batch (`train.batch_size`) whose estimate fits, doubling then bisecting,
and the gradient accumulation that reaches --global-batch (ceil: the global batch may come out a
little larger).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from trainers.memory.counts import GIB

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
# Without --global-batch the search stops here: a micro-batch this large is no longer the question.
MAX_BATCH = 2**16


def parse_size(value: object) -> int:
    """Bytes of `24GiB`, `512MiB`, `8GB` (decimal units), `1.5GiB` or a plain byte count; ValueError
    saying what is accepted otherwise (a bare `24G` is refused: GiB or GB?)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        number, unit = float(value), "b"
    else:
        match = SIZE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 24GiB, 512MiB, 8GB or a byte count")
        number, unit = float(match.group(1)), (match.group(2) or "b").lower()
        if unit not in UNITS:
            raise ValueError(f"{value!r}: unknown unit {match.group(2)!r}; units: B, KiB, MiB, GiB, TiB "
                             "(binary) or KB, MB, GB, TB (decimal)")
    size = int(number * UNITS[unit])
    if size < 1 or not math.isfinite(number):
        raise ValueError(f"{value!r}: a size must be positive")
    return size


def format_size(n: float) -> str:
    """'23.5 GiB': how limits and estimates are shown beside each other."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}" if n < 10 * size else f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


def largest_fitting(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [1, high] with fits(n), for a `fits` that holds up to some n and then
    never again; 0 when fits(1) does not hold. Doubles, then bisects between the last n that fit
    and the first that did not: O(log high) calls."""
    if high < 1 or not fits(1):
        return 0
    low = 1
    while low < high:
        step = min(2 * low, high)
        if not fits(step):
            high = step - 1
            break
        low = step
    while low < high:  # fits(low), and nothing past high fits
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


@dataclass
class Fit:
    """A method x precision's answer: micro-batch, accumulation, and the estimate that fits (or
    micro_batch 0 and the estimate at batch 1, which does not)."""

    micro_batch: int
    grad_accum: int
    total_bytes: int

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0


def fit_batch(cfg: "ExperimentConfig", limit: int, global_batch: Optional[int] = None,
              shape=None, device: Optional[str] = None) -> Fit:
    """The largest train.batch_size of `cfg` whose estimated total (peak + runtime overhead) is at
    most `limit` bytes, and the accumulation reaching `global_batch` rows per worker.

    Accumulating keeps a micro-batch's gradients through the next backward (the estimator counts
    them when grad_accum > 1), so the whole global batch in one micro-batch is tried first; below
    it every micro-batch accumulates and the estimate grows with the batch alone."""
    from trainers.memory.estimate import estimate

    def total(batch: int) -> int:
        cfg.train.batch_size = batch
        cfg.train.grad_accum = math.ceil(global_batch / batch) if global_batch else 1
        return estimate(cfg, shape, device=device).total_bytes

    if global_batch and total(global_batch) <= limit:
        return Fit(global_batch, 1, total(global_batch))
    high = global_batch - 1 if global_batch else MAX_BATCH
    batch = largest_fitting(lambda b: total(b) <= limit, high)
    if batch == 0:
        return Fit(0, 0, total(1))
    return Fit(batch, math.ceil(global_batch / batch) if global_batch else 1, total(batch))
