"""Fault injection for tests and chaos runs: off unless FTLAB_FAULTS is set.

FTLAB_FAULTS is a JSON list of faults, e.g.
    [{"kind": "kill", "step": 12, "trial": "3f2a"}, {"kind": "nan", "step": 5, "trial": "*"}]
kind: kill (SIGKILL this worker), raise (RuntimeError), nan (the step's loss becomes NaN),
      sleep (seconds=N, to trip time limits; with until=PATH it ends as soon as that file exists,
      e.g. another trial's fired-fault marker: a wait for another trial to get somewhere).
      Out-of-memory is not simulated: tests make a real allocation fail (tests/test_faults.py).
trial: prefix of the trial key (the output directory's name), or "*" for every trial.
once (default true): fires only on the first attempt of the trial, so a restarted worker
      resumes instead of dying again; a marker file in the trial's output directory records it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "FTLAB_FAULTS"


@dataclass
class Fault:
    kind: str
    step: int
    trial: str = "*"
    once: bool = True
    seconds: float = 0.0
    until: str = ""


class FaultPlan:
    def __init__(self, faults: list[Fault], output_dir: Path, rank: int = 0):
        self.faults = faults
        self.output_dir = Path(output_dir)
        self.rank = rank

    @classmethod
    def from_env(cls, output_dir: Path, rank: int = 0) -> "FaultPlan":
        raw = os.environ.get(ENV)
        if not raw:
            return cls([], output_dir, rank)
        key = Path(output_dir).name
        faults = [Fault(**spec) for spec in json.loads(raw)]
        return cls([f for f in faults if f.trial == "*" or key.startswith(f.trial)], output_dir, rank)

    def _marker(self, fault: Fault) -> Path:
        return self.output_dir / f".fault-{fault.kind}-{fault.step}.fired"

    def before_step(self, step: int) -> None:
        """Faults that act before the step's forward pass."""
        for fault in self._due(step, ("kill", "raise", "sleep")):
            if fault.kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault.kind == "raise":
                raise RuntimeError(f"injected fault at step {step}")
            if fault.kind == "sleep":
                _sleep(fault.seconds, fault.until)

    def poison_loss(self, step: int, loss):
        """The `nan` fault: the loss of this step becomes NaN."""
        if self._due(step, ("nan",)):
            return loss * float("nan")
        return loss

    def _due(self, step: int, kinds: tuple[str, ...]) -> list[Fault]:
        due = []
        for fault in self.faults:
            if fault.kind not in kinds or fault.step != step or self.rank != 0:
                continue
            marker = self._marker(fault)
            if fault.once:
                if marker.exists():
                    continue
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(time.time()))
            due.append(fault)
        return due


def _sleep(seconds: float, until: str) -> None:
    """`seconds`, or less if the file `until` appears meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not (until and Path(until).exists()):
        time.sleep(min(left, 0.2))
