"""Live console progress: one line per trial (state, step/total, loss, tokens/s, node).

On a terminal the block is a rich Live display, redrawn in place (rich counts the rows a wrapped
line takes, and prints from elsewhere go above it; a block taller than the terminal is cut at
its bottom); otherwise (CI, a log file) a line is printed
when a trial changes state and, while trials run, a progress line at most every `interval_s`.
Call `close()` when the sweep ends, so the terminal gets its cursor back.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass
class TrialLine:
    label: str
    state: str = "PENDING"
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    started: float | None = None
    ended: float | None = None
    reason: str = ""
    node: str = ""  # ip/node-id prefix of the Ray node its rank 0 runs on

    def render(self, width: int) -> str:
        steps = f"{self.step}/{self.total}" if self.total else "-"
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        tps = f"{self.tokens_per_s:,.0f}" if self.tokens_per_s is not None else "-"
        elapsed = ""
        if self.started is not None:
            elapsed = f"{(self.ended or time.monotonic()) - self.started:.0f}s"
        text = f"  {self.label:<{width}}  {self.state:<9} {steps:>9}  loss {loss:>7}  tok/s {tps:>7}  {elapsed:>6}"
        if self.node:
            text += f"  on {self.node}"
        return text + (f"  {self.reason}" if self.reason else "")


class ProgressBoard:
    def __init__(self, labels: dict[str, str], stream=None, interval_s: float = 20.0):
        self.stream = stream or sys.stdout
        self.lines = {key: TrialLine(label) for key, label in labels.items()}
        self.width = max((len(label) for label in labels.values()), default=5)
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s
        self.last_periodic = time.monotonic()
        self.live = None  # rich's Live display, from the first redraw on a terminal

    def add(self, key: str, label: str) -> None:
        """A trial the sweep drew while running (a searched grid point's)."""
        if key not in self.lines:
            self.lines[key] = TrialLine(label)
            self.width = max(self.width, len(label))

    def update(self, key: str, **fields) -> None:
        line = self.lines[key]
        old_state = line.state
        for name, value in fields.items():
            if value is not None:  # a result without a loss keeps the last one shown
                setattr(line, name, value)
        if line.state == "RUNNING" and line.started is None:
            line.started = time.monotonic()
        if line.state in ("FINISHED", "FAILED", "SKIPPED", "KILLED") and line.ended is None:
            line.ended = time.monotonic()
        if self.tty:
            self._redraw()
        elif line.state != old_state:
            print(line.render(self.width), file=self.stream, flush=True)
        elif time.monotonic() - self.last_periodic >= self.interval_s:
            self.last_periodic = time.monotonic()
            for other in self.lines.values():
                if other.state == "RUNNING":
                    print(other.render(self.width), file=self.stream, flush=True)

    def _redraw(self) -> None:
        if self.live is None:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=self.stream), auto_refresh=False)
            self.live.start()
        self.live.update(self._frame(), refresh=True)

    def _frame(self):
        from rich.console import Group
        from rich.text import Text

        # The plain line of each trial; a line wider than the terminal folds onto the next rows.
        return Group(*(Text(line.render(self.width), overflow="fold") for line in self.lines.values()))

    def close(self) -> None:
        """Leave the last block on screen and give the terminal back (no-op off a terminal)."""
        if self.live is not None:
            self.live.stop()
            self.live = None
