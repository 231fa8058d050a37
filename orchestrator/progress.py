"""Live console progress: one line per trial (state, step/total, loss, tokens/s, node).

On a terminal the block is redrawn in place; otherwise (CI, a log file) a line is printed when
a trial changes state and, while trials run, a progress line at most every `interval_s`.
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
            elapsed = f"{(self.ended or time.monotonic()) - self.started:6.0f}s"
        text = f"  {self.label:<{width}}  {self.state:<9} {steps:>9}  loss {loss:>7}  tok/s {tps:>7}  {elapsed}"
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
        self.drawn = 0

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
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F")
        rows = [line.render(self.width) for line in self.lines.values()]
        for row in rows:
            self.stream.write("\x1b[2K" + row + "\n")
        self.stream.flush()
        self.drawn = len(rows)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.lines.values():
            out[line.state] = out.get(line.state, 0) + 1
        return out
