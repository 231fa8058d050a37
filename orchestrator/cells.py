"""The rows of a sweep report: one TrialRow per child run, grouped into Cells (trials that differ
only by their seed), with mean and spread per value. Shared by the report (orchestrator/report.py)
and its plots (orchestrator/plots.py), which otherwise would import each other.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from trainers.identity import identity

SEED_IN_LABEL = re.compile(r"(^|\s)seed=\S+")


@dataclass
class TrialRow:
    """One child run (one trial)."""

    run_id: str
    label: str
    method: str
    stage: str
    status: str
    params: dict
    metrics: dict
    tags: dict = field(default_factory=dict)
    start_time: int = 0

    def metric(self, name: str):
        value = self.metrics.get(name)
        return value if value is not None and math.isfinite(value) else None

    @property
    def seed(self) -> str:
        return self.params.get("train.seed", "")

    @property
    def reason(self) -> str:
        return self.tags.get("failure_reason") or self.tags.get("skip_reason") or ""

    @property
    def node(self) -> str:
        """'ip/node-id prefix' of the Ray node rank 0 ran on (IPs repeat when nodes share a machine)."""
        node_id = self.tags.get("node_id")
        return f"{self.tags.get('node_ip', '?')}/{node_id[:8]}" if node_id else ""

    @property
    def trainable_pct(self):
        trainable, total = self.metric("model/trainable_params"), self.metric("model/total_params")
        return 100.0 * trainable / total if trainable is not None and total else None

    @property
    def cell_key(self) -> tuple:
        """Equal for trials of one experiment that differ only by seed (trainers/identity.py)."""
        return (self.stage, tuple(sorted(identity(self.params, seed=False).items())))


@dataclass
class Stat:
    mean: float
    std: float | None  # sample standard deviation; None for a single value
    n: int


@dataclass
class Cell:
    """Trials that differ only by their seed."""

    label: str
    runs: list[TrialRow]

    @property
    def finished(self) -> list[TrialRow]:
        return [r for r in self.runs if r.status == "FINISHED"]

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def stage(self) -> str:
        return self.runs[0].stage

    def param(self, key: str):
        return self.runs[0].params.get(key)

    def stat(self, value: Callable[[TrialRow], float | None]) -> Stat | None:
        """Mean and spread of a per-trial value over the finished trials that have it."""
        values = [v for v in (value(r) for r in self.finished) if v is not None]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return Stat(statistics.fmean(values), std, len(values))

    def metric(self, name: str) -> Stat | None:
        return self.stat(lambda r: r.metric(name))

    @property
    def state(self) -> str:
        counts = Counter(r.status for r in self.runs)
        if set(counts) == {"FINISHED"}:
            return "FINISHED"
        if len(self.runs) == 1:
            return self.runs[0].status
        order = sorted(counts.items(), key=lambda item: (item[0] != "FINISHED", item[0]))
        return ", ".join(f"{n}/{len(self.runs)} {status}" for status, n in order)


def ran_budget(cells: list[Cell]) -> list[Cell]:
    """Cells with a finished trial that ran its whole budget: a trial ASHA stopped early is no
    candidate for "best" (orchestrator/answer.py, promote)."""
    return [c for c in cells if any(r.tags.get("early_stopped") != "true" for r in c.finished)]


def cell_label(label: str) -> str:
    return SEED_IN_LABEL.sub("", label).strip()


def group_cells(rows: list[TrialRow]) -> list[Cell]:
    """Cells in the order their first trial started."""
    cells: dict[tuple, Cell] = {}
    for row in sorted(rows, key=lambda r: r.start_time):
        key = row.cell_key
        if key not in cells:
            cells[key] = Cell(cell_label(row.label) or row.method, [])
        cells[key].runs.append(row)
    return list(cells.values())
