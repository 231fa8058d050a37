"""The tuning part of a sweep report (searched grid points, orchestrator/search.py): per method,
its default-setting trial beside the best trial its search found, with that trial's drawn
hyperparameters, and a plot of the best eval loss against the number of tuning trials.

Read from the child runs' tags alone: `search_group` (the grid point), `sample` ("default" or the
drawn values), `early_stopped`, and for a method choice (orchestrator/method_search.py)
`search_choice`, the label of the trial's method: each method of a choice gets a row of its own
(its trials show where the budget went), and a line names the choice's best trial. A trial ASHA
stopped never ran its full budget: it counts as a trial spent, but not as a candidate for the
best (its eval loss is from an earlier step).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.cells import TrialRow
from orchestrator.plots import Colors, Figure, Panel, Point, Series

QUALITY = "eval/loss"  # what the searchers and ASHA minimise


@dataclass
class Tuning:
    label: str  # the grid point (method and its fixed settings), or a method of a choice
    trials: list[TrialRow] = field(default_factory=list)  # in the order they started
    choice: str = ""  # the method choice (its search_group) this method is one of

    @property
    def default(self) -> TrialRow | None:
        return next((t for t in self.trials if t.tags.get("sample") == "default"), None)

    @property
    def candidates(self) -> list[TrialRow]:
        """Finished trials that ran their whole budget and measured the quality."""
        return [t for t in self.trials if t.status == "FINISHED" and t.tags.get("early_stopped") != "true"
                and t.metric(QUALITY) is not None]

    @property
    def best(self) -> TrialRow | None:
        return min(self.candidates, key=lambda t: t.metric(QUALITY), default=None)

    @property
    def early_stopped(self) -> int:
        return sum(t.tags.get("early_stopped") == "true" for t in self.trials)

    def best_so_far(self) -> list[tuple[int, float]]:
        """(trials spent, best eval loss among them) after each trial that could improve it."""
        points, best = [], None
        candidates = {t.run_id for t in self.candidates}
        for n, trial in enumerate(self.trials, start=1):
            if trial.run_id in candidates and (best is None or trial.metric(QUALITY) < best):
                best = trial.metric(QUALITY)
            if best is not None:
                points.append((n, best))
        return points


def tunings(rows: list[TrialRow]) -> list[Tuning]:
    """One Tuning per searched grid point, in the order their first trial started."""
    found: dict[tuple, Tuning] = {}
    for row in sorted(rows, key=lambda r: r.start_time):
        key, method = row.tags.get("search_group_key"), row.tags.get("search_choice")
        if key:
            group = row.tags.get("search_group", key)
            tuning = Tuning(method, choice=group) if method else Tuning(group)
            found.setdefault((key, method), tuning).trials.append(row)
    return list(found.values())


def choice_lines(found: list[Tuning]) -> list[str]:
    """Per method choice: its best trial over all its methods, and the trials each method got."""
    lines = []
    for choice in dict.fromkeys(t.choice for t in found if t.choice):
        methods = [t for t in found if t.choice == choice]
        best = min((t for t in methods if t.best is not None), key=lambda t: t.best.metric(QUALITY), default=None)
        spent = ", ".join(f"{t.label} {len(t.trials)}" for t in methods)
        what = (f"best {best.label} ({best.best.tags.get('sample')}), eval loss {best.best.metric(QUALITY):.4f}"
                if best else "no finished trial")
        lines.append(f"method choice {choice}: {what}; trials per method: {spent}")
    return lines


def _value(row: TrialRow | None, name: str, fmt: str) -> str:
    value = row.metric(name) if row is not None else None
    return fmt.format(value) if value is not None else "-"


HEADERS = ("method", "trials", "early stopped", "default eval loss", "default accuracy", "best eval loss",
           "best accuracy", "best hyperparameters")


def table_rows(found: list[Tuning]) -> list[list[str]]:
    rows = []
    for t in found:
        best = t.best
        rows.append([t.label, str(len(t.trials)), str(t.early_stopped),
                     _value(t.default, QUALITY, "{:.4f}"), _value(t.default, "eval/accuracy", "{:.3f}"),
                     _value(best, QUALITY, "{:.4f}"), _value(best, "eval/accuracy", "{:.3f}"),
                     best.tags.get("sample", "?") if best is not None else "no finished trial"])
    return rows


def markdown(found: list[Tuning]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(found)]
    return "\n".join(lines + [f"\n{line}" for line in choice_lines(found)])


def console(found: list[Tuning]) -> str:
    rows = [list(HEADERS)] + table_rows(found)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + choice_lines(found))


def figure(found: list[Tuning], colors: Colors) -> Figure | str:
    """Best eval loss against tuning trials spent, one line per method; or why it is not drawn."""
    series = [Series(t.label, colors(t.label), [Point(x=n, y=loss, label=t.label, info=[f"after {n} trial(s)"])
                                                for n, loss in t.best_so_far()], kind="lines")
              for t in found]
    series = [s for s in series if s.points]
    if not series:
        return "no searched trial finished with an eval loss"
    most = max(len(t.trials) for t in found)
    panel = Panel(title="best eval loss vs tuning trials", x_label="trials spent (default-setting trial first)",
                  y_label="best eval loss so far", series=series, x_ticks=list(range(1, most + 1)))
    return Figure(name="tuning", title="Quality against tuning trials", panels=[panel])
