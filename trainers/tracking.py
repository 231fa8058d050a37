"""What a recipe reports to: metrics per step, final metrics, artifact directories.

trainers never imports MLflow or Ray; the orchestrator passes a Tracker that forwards to MLflow
(rank 0 only) and to Ray. Every other rank, and tests, get the null tracker below.
"""

from __future__ import annotations

import sys
import time


class Tracker:
    """Null tracker: same methods as the real ones, does nothing."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifacts(self, local_dir: str, artifact_path: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class ConsoleTracker(Tracker):
    """Prints per-step metrics: the tracker of a plain-process run (`python -m trainers`)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.started = time.monotonic()

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        prefix = f"step {step:>5}" if step is not None else "final     "
        print(f"[{time.monotonic() - self.started:7.1f}s] {prefix}  {shown}", file=self.stream, flush=True)

    def set_tags(self, tags: dict[str, str]) -> None:
        shown = "  ".join(f"{k}={v}" for k, v in tags.items())
        print(f"[{time.monotonic() - self.started:7.1f}s] tags        {shown}", file=self.stream, flush=True)
