"""When the phases of this process's trial happened: `time/start_s` (RUNNING -> end of the first
optimizer step) and `time/finish_s` (end of the last step -> final metrics), and their split.

A process runs one trial at a time (a Ray Train worker, `python -m trainers`, a test's
run_trial), so the marks are process-wide: the code that ends a phase marks it where it is,
without a clock passed through every recipe. Marks are wall-clock (time.time()), so that the
driver's RUNNING can be the first one.
"""

from __future__ import annotations

import threading
import time

# In order; a mark not made (no Ray: no worker start) merges its phase into the next one's.
START = ("running", "worker_started", "imported", "trial_started", "data_ready", "model_loaded", "first_step")
FINISH = ("last_step", "evaluated", "saved", "finished")

_marks: dict[str, float] = {}
_events: dict[str, threading.Event] = {}


def mark(name: str, at: float | None = None) -> None:
    """`name` happened now (or at `at`); the first mark of a name counts (a recipe that loads a
    second model after training does not move `model_loaded`)."""
    if name not in _marks:
        _marks[name] = time.time() if at is None else at
        if name in _events:
            _events[name].set()


def reached(name: str) -> threading.Event:
    """Set once `name` is marked (at once if it was): what another thread of the trial waits on."""
    event = _events.setdefault(name, threading.Event())
    if name in _marks:
        event.set()
    return event


def clear() -> None:
    _marks.clear()
    _events.clear()


def metrics() -> dict[str, float]:
    """time/start_s, time/finish_s and each phase's seconds (`time/start.imported_s`: from the
    previous mark to `imported`), for the marks made; marks `finished` now."""
    mark("finished")
    out = {}
    for total, chain in (("time/start_s", START), ("time/finish_s", FINISH)):
        made = [name for name in chain if name in _marks]
        if len(made) < 2 or made[-1] != chain[-1]:
            continue
        out[total] = _marks[made[-1]] - _marks[made[0]]
        prefix = total[:-2]
        for before, name in zip(made, made[1:]):
            out[f"{prefix}.{name}_s"] = _marks[name] - _marks[before]
    return out
