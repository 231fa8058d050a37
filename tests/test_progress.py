"""The live progress board: redrawn in place on a terminal, even when rows wrap; plain lines
otherwise."""

from __future__ import annotations

import io
import re

from orchestrator.progress import ProgressBoard

CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Terminal(io.StringIO):
    """What a terminal of `width` columns shows for the bytes written to it: enough of VT100 for
    a redraw in place (cursor up, erase line, carriage return, auto-wrap at the right edge)."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        rows: list[list[str]] = [[]]
        row = col = 0
        text, pos = self.getvalue(), 0
        while pos < len(text):
            match = CSI.match(text, pos)
            if match:
                arg, op = match.groups()
                n = int(arg) if arg.isdigit() else 1
                if op in "AF":
                    row, col = max(row - n, 0), (0 if op == "F" else col)
                elif op == "K":
                    rows[row] = [] if arg == "2" else rows[row][:col]
                pos = match.end()
                continue
            char, pos = text[pos], pos + 1
            if char == "\r":
                col = 0
                continue
            if char == "\n" or col == self.width:
                row, col = row + 1, 0
                while len(rows) <= row:
                    rows.append([])
                if char == "\n":
                    continue
            line = rows[row]
            line.extend(" " * (col - len(line) + 1))
            line[col] = char
            col += 1
        return ["".join(r).rstrip() for r in rows if "".join(r).strip()]


def test_terminal_board_redraws_in_place_when_a_row_wraps(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    term = Terminal(60)
    board = ProgressBoard({"a": "lora r=8", "b": "full lr=3e-4"}, stream=term)
    board.update("a", state="RUNNING", step=3, total=50, loss=1.25, tokens_per_s=1234.0)
    board.update("b", state="FAILED", reason="ValueError: " + "a long reason that cannot fit on one row " * 2)
    board.update("a", step=40, loss=0.5)
    board.close()
    screen = term.screen()
    assert sum("lora r=8" in row for row in screen) == 1, screen  # no stale copy of an earlier frame
    assert sum("full lr=3e-4" in row for row in screen) == 1, screen
    assert any("40/50" in row and "0.5000" in row for row in screen), screen
    assert not any("3/50" in row for row in screen), screen
    assert "".join(screen).replace(" ", "").count("cannotfitononerow") == 2  # the reason wraps, whole
    assert len(screen) > 2  # it did wrap


def test_without_a_terminal_the_board_prints_plain_lines_on_state_changes():
    out = io.StringIO()
    board = ProgressBoard({"a": "lora r=8"}, stream=out, interval_s=3600)
    board.update("a", state="RUNNING", step=1, total=10)
    board.update("a", step=5, loss=2.0)  # same state, within the interval: nothing printed
    board.update("a", state="FINISHED", step=10)
    board.close()
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()
    assert [line.split()[2] for line in lines] == ["RUNNING", "FINISHED"]
    assert "10/10" in lines[1] and "2.0000" in lines[1]
