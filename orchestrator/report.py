"""The comparison of a sweep's trials, rebuilt from MLflow alone (so it works for any sweep, run
anywhere):

    python -m orchestrator.report EXPERIMENT_OR_PARENT_RUN_ID [--tracking-uri URI] [--out DIR]

Reads the parent run and its children through the contract names and groups the children into
cells: trials that differ only by `train.seed` are one cell, shown as mean ± sample standard
deviation over its n finished seeds. Writes, and logs under the parent run's `report/`:

    comparison.md / comparison.csv   one row per cell (the CSV has a `... std` column per value)
    trials.csv                       one row per trial: seed, status, reason, replay command
    *.png, report.html               the trade-off plots (orchestrator/plots.py); report.html is one
                                     self-contained interactive page (no network needed)

Failed, killed and skipped trials are rows too, with their reason; never silently missing. So are
the trials the sweep left out before Ray as inapplicable to the model (state INAPPLICABLE) or over
sweep.memory_limit (state OVER_MEMORY_LIMIT), read from the parent run's skipped_trials.json.
"Which method for my budget?" (orchestrator/answer.py): a Pareto table of quality against training
FLOPs, peak memory and adapter bytes, and the best trial under each memory limit.
The console table printed at the end of a sweep is the same rows and values, fewer columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.cells import Cell, Stat, TrialRow, group_cells
from trainers.memory.sizes import format_size

log = logging.getLogger("orchestrator")


def stage_metric_prefixes() -> tuple[str, ...]:
    """Final metrics beyond the base columns become columns of their own, when some trial has them:
    eval/* and every stage recipe's own namespaces (RecipeSpec.metric_prefixes)."""
    from trainers.recipes import RECIPES

    return ("eval/",) + tuple(prefix for recipe in RECIPES.values() for prefix in recipe.metric_prefixes)


def default_stage() -> str:
    """The stage conf/config.yaml picks: a table of its trials alone needs no stage column."""
    from trainers.config import default_choice

    return default_choice("stage")


# --------------------------------------------------------------------------- formatting


def _plain(spec: str) -> Callable[[float], str]:
    return lambda value: spec.format(value)


@dataclass
class Column:
    header: str
    # A numeric column aggregates a per-trial value over the cell's finished trials; a text column
    # reads the cell.
    per_trial: Callable[[TrialRow], float | None] | None = None
    per_cell: Callable[[Cell], object] | None = None
    fmt: Callable[[float], str] | str = "{}"
    spread: bool = True  # show ± std (False for what a seed cannot change: sizes, counts)
    console: bool = True
    always: bool = False  # shown even when no row has a value
    metric: str | None = None  # the MLflow metric behind it, if one

    def value(self, cell: Cell):
        if self.per_cell is not None:
            return self.per_cell(cell)
        return cell.stat(self.per_trial)

    def text(self, cell: Cell) -> str:
        value = self.value(cell)
        if value is None or value == "":
            return "-"
        if not isinstance(value, Stat):
            return str(value)
        std = value.std if self.spread else None
        if self.fmt == "bytes":
            return format_size(value.mean, std)
        fmt = _plain(self.fmt) if isinstance(self.fmt, str) else self.fmt
        return fmt(value.mean) if std is None else f"{fmt(value.mean)} ± {fmt(std)}"


def _metric(header: str, name: str, fmt, spread: bool = True, console: bool = True) -> Column:
    return Column(header, per_trial=lambda r: r.metric(name), fmt=fmt, spread=spread, console=console, metric=name)


def _seeds(cell: Cell) -> str:
    finished = len(cell.finished)
    return str(finished) if finished == len(cell.runs) else f"{finished}/{len(cell.runs)}"


BASE_COLUMNS = [
    Column("trial", per_cell=lambda c: c.label, always=True),
    Column("method", per_cell=lambda c: c.method, always=True),
    Column("stage", per_cell=lambda c: c.stage),
    Column("r", per_cell=lambda c: c.param("method.r")),
    Column("precision", per_cell=lambda c: c.param("precision.name")),
    Column("n", per_cell=_seeds),
    _metric("trainable", "model/trainable_params", "{:,.0f}", spread=False),
    Column("trainable %", per_trial=lambda r: r.trainable_pct, fmt="{:.3f}", spread=False),
    _metric("adapter", "model/adapter_bytes", "bytes", spread=False, console=False),
    _metric("est. peak mem", "mem/estimated_peak_bytes", "bytes", spread=False, console=False),
    _metric("peak mem", "mem/peak_bytes", "bytes"),
    _metric("tokens/s", "perf/tokens_per_s", "{:,.0f}"),
    _metric("train s", "time/train_s", "{:.1f}"),
    _metric("eval loss", "eval/loss", "{:.4f}"),
    _metric("perplexity", "eval/perplexity", "{:.2f}", console=False),
    _metric("accuracy", "eval/accuracy", "{:.3f}"),
    Column("node", per_cell=lambda c: " ".join(sorted({r.node for r in c.runs if r.node}))),
]
KNOWN_METRICS = {c.metric for c in BASE_COLUMNS if c.metric} | {"eval/perplexity"}


def ran_on_cluster(cells: list[Cell]) -> bool:
    """Whether the trials ran on an attached cluster or on several nodes (where they ran matters)."""
    runs = [r for c in cells for r in c.runs]
    attached = any(r.params.get("cluster.address") not in (None, "", "null", "None") for r in runs)
    return attached or len({r.node for r in runs if r.node}) > 1


def columns_for(cells: list[Cell]) -> list[Column]:
    """The base columns some cell has a value for, the stage metrics present, and the state."""
    # A starting value (`eval/reward_mean_init`) sits just before its final one; the console keeps
    # the final eval/* values, the stage's last per-step values (rl/kl, ...) go to the files.
    prefixes = stage_metric_prefixes()
    extras = sorted({name for c in cells for r in c.finished for name in r.metrics
                     if name.startswith(prefixes) and name not in KNOWN_METRICS},
                    key=lambda name: (name.removesuffix("_init"), not name.endswith("_init")))
    columns = [_metric(name.split("/", 1)[1] if name.startswith("eval/") else name, name, "{:.4g}",
                       console=name.startswith("eval/")) for name in extras]
    columns = BASE_COLUMNS + columns + [Column("state", per_cell=lambda c: c.state, always=True)]
    shown, default = [], default_stage()
    for column in columns:
        if column.header == "stage" and all(c.stage == default for c in cells):
            continue
        if column.header == "n" and all(len(c.runs) == 1 for c in cells):
            continue
        if column.header == "node" and not ran_on_cluster(cells):
            continue
        if column.always or any(column.text(c) != "-" for c in cells):
            shown.append(column)
    return shown


# --------------------------------------------------------------------------- MLflow


def find_parent(client, ref: str):
    """A parent run by id, or the newest parent run (tag `sweep`) of an experiment by name or id."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    experiment = client.get_experiment_by_name(ref)
    if experiment is None:
        try:
            experiment = client.get_experiment(ref)
        except MlflowException:
            experiment = None
    if experiment is None:
        raise SystemExit(f"error: {ref!r} is neither a run id nor an experiment name or id in this store")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep != ''",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"error: experiment {ref!r} has no sweep parent run")
    return runs[0]


def _status(run) -> str:
    """The run's status; SKIPPED for a trial that never ran because an upstream one failed (its
    run ends KILLED with a `skip_reason` tag: MLflow has no SKIPPED status)."""
    if run.info.status == "KILLED" and run.data.tags.get("skip_reason"):
        return "SKIPPED"
    return run.info.status


def collect(client, parent) -> list[TrialRow]:
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["attributes.start_time ASC"], max_results=5000,
    )
    rows = []
    for run in children:
        tags = run.data.tags
        rows.append(TrialRow(
            run_id=run.info.run_id, label=tags.get("mlflow.runName", run.info.run_id[:8]),
            method=tags.get("method", "?"), stage=tags.get("stage", "?"), status=_status(run),
            params=run.data.params, metrics=run.data.metrics, tags=tags, start_time=run.info.start_time or 0,
        ))
    return rows


INAPPLICABLE = "INAPPLICABLE"
AFTER_EVERY_RUN = 2**62  # start time that sorts a trial that never ran after those that did


def skipped_rows(client, parent) -> list[TrialRow]:
    """Rows of the trials the plan left out (tracking.SweepTracker.record_skipped), in the state it
    gave them (tracking.SKIP_STATES; a record from before states were recorded was inapplicable)."""
    from orchestrator.tracking import SKIPPED_FILE, SKIPPED_TAG

    if not parent.data.tags.get(SKIPPED_TAG):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        records = json.loads(Path(client.download_artifacts(parent.info.run_id, SKIPPED_FILE, tmp)).read_text())
    return [TrialRow(run_id="", label=r["label"], method=r["method"], stage=r["stage"], status=r.get("state", INAPPLICABLE),
                     params=r["params"], metrics={}, tags={"skip_reason": r["reason"], "overrides": r["overrides"]},
                     start_time=AFTER_EVERY_RUN) for r in records]


def loss_histories(client, rows: list[TrialRow]) -> dict[str, list[tuple[int, float]]]:
    """run id -> [(step, train/loss)] for every trial that logged some."""
    histories = {}
    for row in rows:
        if "train/loss" in row.metrics:
            # A diverged trial logs nan/inf: its curve stops where the numbers stop.
            points = sorted((m.step, m.value) for m in client.get_metric_history(row.run_id, "train/loss")
                            if math.isfinite(m.value))
            histories[row.run_id] = points
    return histories


# --------------------------------------------------------------------------- tables


def not_finished(cells: list[Cell]) -> list[str]:
    return [f"{r.label}" + (f" ({r.run_id[:8]})" if r.run_id else "") + f": {r.status}"
            + (f" - {r.reason}" if r.reason else " - no reason recorded")
            for c in cells for r in c.runs if r.status != "FINISHED"]


def markdown_table(cells: list[Cell]) -> str:
    columns = columns_for(cells)
    header = "| " + " | ".join(c.header for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(c.text(cell).replace("|", "\\|") for c in columns) + " |" for cell in cells]
    lines = [header, rule, *body]
    if any(len(c.runs) > 1 for c in cells):
        lines += ["", ("Cells group trials that differ only by `train.seed`: mean ± sample standard deviation "
                       "over the n finished seeds (sizes and counts: the mean).")]
    failures = not_finished(cells)
    if failures:
        lines += ["", "Not finished:", *[f"- {f}" for f in failures]]
    return "\n".join(lines) + "\n"


def csv_table(cells: list[Cell]) -> str:
    """One row per cell with raw numbers: a value column (the mean) and its `std` column."""
    columns = columns_for(cells)
    header = []
    for c in columns:
        header.append(c.header)
        if c.per_trial is not None:
            header.append(f"{c.header} std")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header + ["seeds", "run_ids", "reasons"])
    for cell in cells:
        values = []
        for c in columns:
            value = c.value(cell)
            if c.per_trial is None:
                values.append("" if value is None else value)
            else:
                values += ["", ""] if value is None else [value.mean, "" if value.std is None else value.std]
        reasons = "; ".join(f"{r.label}: {r.status} - {r.reason}" for r in cell.runs if r.status != "FINISHED")
        writer.writerow(values + [" ".join(r.seed for r in cell.runs), " ".join(r.run_id for r in cell.runs),
                                  reasons])
    return out.getvalue()


def trials_csv(cells: list[Cell]) -> str:
    """Every trial, unaggregated: what a notebook wants."""
    metric_names = sorted({name for c in cells for r in c.runs for name in r.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["cell", "trial", "run_id", "seed", "status", "reason", *metric_names, "replay"])
    for cell in cells:
        for r in cell.runs:
            writer.writerow([cell.label, r.label, r.run_id, r.seed, r.status, r.reason,
                             *[r.metrics.get(name, "") for name in metric_names], r.tags.get("replay", "")])
    return out.getvalue()


def console_table(cells: list[Cell]) -> str:
    """The markdown table's rows and values, in fewer columns, aligned for a terminal."""
    columns = [c for c in columns_for(cells) if c.console]
    cells_text = [[c.header for c in columns]] + [[c.text(cell) for c in columns] for cell in cells]
    widths = [max(len(row[i]) for row in cells_text) for i in range(len(columns))]
    numeric = [c.per_trial is not None or c.header in ("r", "n") for c in columns]
    lines = ["  ".join(text.rjust(w) if num else text.ljust(w) for text, w, num in zip(row, widths, numeric)).rstrip()
             for row in cells_text]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(len(c.runs) > 1 for c in cells):
        lines.append("(mean ± std over n seeds)")
    lines += not_finished(cells)
    return "\n".join(lines)


def environment_summary(cells: list[Cell]) -> list[str]:
    """`env.*` tags of the trials; a key whose value differs between trials lists each value."""
    values: dict[str, Counter] = {}
    for cell in cells:
        for r in cell.runs:
            for key, value in r.tags.items():
                if key.startswith("env."):
                    values.setdefault(key[len("env."):], Counter())[value] += 1
    lines = []
    for key in sorted(values):
        counts = values[key]
        if len(counts) == 1:
            lines.append(f"- {key}: {next(iter(counts))}")
        else:
            lines.append(f"- {key}: " + ", ".join(f"{v} ({n} trials)" for v, n in counts.most_common()))
    return lines


# --------------------------------------------------------------------------- the report


def build_report(client, parent, out_dir: Path | None = None) -> tuple[list[Cell], Path]:
    """Write the report files, log them under the parent run's `report/`; returns cells and dir."""
    from orchestrator import answer, plots, report_html, tuning
    from orchestrator.tracking import SKIP_STATES

    rows = collect(client, parent) + skipped_rows(client, parent)
    cells = group_cells(rows)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="report-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep = parent.data.tags.get("sweep", "sweep")

    figures, skipped = plots.figures(cells, loss_histories(client, rows))
    tuned = tuning.tunings(rows)
    if tuned:
        figure = tuning.figure(tuned, plots.Colors())
        figures.append(figure) if isinstance(figure, plots.Figure) else skipped.append(("tuning", figure))
    drawn = []
    for figure in figures:
        try:
            plots.render_png(figure, out_dir / f"{figure.name}.png")
            drawn.append(figure)
        except Exception as err:  # a plot must not cost the table of a finished sweep
            log.exception("plot %s failed", figure.name)
            skipped.append((figure.name, f"drawing failed: {err}"))

    environment = environment_summary(cells)
    left_out = Counter(r.status for r in rows if r.status in SKIP_STATES)
    counts = f"{len(rows) - sum(left_out.values())} trial(s)" + "".join(
        f" (+{left_out[state]} skipped as {what})" for state, what in SKIP_STATES.items() if left_out[state])
    markdown = [f"# {sweep}", "", f"Parent run `{parent.info.run_id}`, {counts} in {len(cells)} cell(s).",
                "", markdown_table(cells)]
    answers = answer.tables(cells)
    if answers:
        markdown += ["## Which method for my budget?", ""] + [line for t in answers for line in t.markdown()]
    if parent.data.tags.get("promoted_model"):  # set by orchestrator.promote
        markdown += [f"Promoted to the MLflow Model Registry: {parent.data.tags['promoted_model']}", ""]
    if tuned:
        markdown += ["## Tuning", "", "Per searched method: its default-setting trial beside the best trial its search "
                     "found (trials ASHA stopped early spend budget but are not candidates).", "",
                     tuning.markdown(tuned), ""]
    if drawn:
        markdown += ["## Plots", ""] + [f"![{f.title}]({f.name}.png)" for f in drawn] + [""]
    if skipped:
        markdown += ["Plots not drawn:", *[f"- {name}: {why}" for name, why in skipped], ""]
    if environment:
        markdown += ["## Environment", "", *environment, ""]
    (out_dir / "comparison.md").write_text("\n".join(markdown))
    (out_dir / "comparison.csv").write_text(csv_table(cells))
    (out_dir / "trials.csv").write_text(trials_csv(cells))
    columns = columns_for(cells)
    (out_dir / "report.html").write_text(report_html.render(
        title=f"{sweep}: comparison", subtitle=f"parent run {parent.info.run_id}",
        headers=[c.header for c in columns], rows=[[c.text(cell) for c in columns] for cell in cells],
        figures=drawn, skipped=skipped, not_finished=not_finished(cells), environment=environment,
        tables=answers,
    ))
    client.log_artifacts(parent.info.run_id, str(out_dir), "report")
    return cells, out_dir


def main(argv: list[str] | None = None) -> int:
    from orchestrator.tracking import absolute_uri, client as make_client

    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="experiment name or id, or a parent run id")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default=None, help="also keep the report files here")
    args = parser.parse_args(argv)
    client = make_client(absolute_uri(args.tracking_uri))
    parent = find_parent(client, args.ref)
    cells, out_dir = build_report(client, parent, Path(args.out) if args.out else None)
    print(console_table(cells))
    print(f"\nreport: {out_dir / 'report.html'} (also under run {parent.info.run_id} artifacts report/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
