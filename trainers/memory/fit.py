"""What fits a memory limit: the largest micro-batch per method.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig

# Without --global-batch the search stops here: a micro-batch this large is no longer the question.
MAX_BATCH = 2**16


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
