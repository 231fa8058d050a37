"""The comparison of a sweep's trials, rebuilt from MLflow alone (so it works for any sweep, run
anywhere):

    python -m orchestrator.report EXPERIMENT_OR_PARENT_RUN_ID [--tracking-uri URI] [--out DIR]

Reads the parent run and its children through the contract names, writes `comparison.md` and
`comparison.csv`, logs them under the parent run's `report/`, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

COLUMNS = [
    # (header, getter over a TrialRow, format)
    ("trial", lambda r: r.label, "{}"),
    ("method", lambda r: r.method, "{}"),
    ("r", lambda r: r.params.get("method.r", "-"), "{}"),
    ("precision", lambda r: r.params.get("precision.name", "-"), "{}"),
    ("trainable", lambda r: r.metric("model/trainable_params"), "{:,.0f}"),
    ("trainable %", lambda r: r.trainable_pct, "{:.3f}"),
    ("eval loss", lambda r: r.metric("eval/loss"), "{:.4f}"),
    ("eval acc", lambda r: r.metric("eval/accuracy"), "{:.3f}"),
    ("peak mem MiB", lambda r: _mib(r.metric("mem/peak_bytes")), "{:.1f}"),
    ("tokens/s", lambda r: r.metric("perf/tokens_per_s"), "{:,.0f}"),
    ("time s", lambda r: r.metric("time/train_s"), "{:.1f}"),
    ("state", lambda r: r.status, "{}"),
]


def _mib(value):
    return None if value is None else value / 2**20


@dataclass
class TrialRow:
    run_id: str
    label: str
    method: str
    status: str
    params: dict
    metrics: dict
    reason: str = ""

    def metric(self, name: str):
        return self.metrics.get(name)

    @property
    def trainable_pct(self):
        trainable, total = self.metric("model/trainable_params"), self.metric("model/total_params")
        return 100.0 * trainable / total if trainable is not None and total else None


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


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
            method=tags.get("method", "?"), status=run.info.status, params=run.data.params,
            metrics=run.data.metrics, reason=tags.get("failure_reason", ""),
        ))
    return rows


def markdown_table(rows: list[TrialRow]) -> str:
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(get(r), fmt) for _, get, fmt in COLUMNS) + " |" for r in rows]
    failures = [f"- {r.label}: {r.status} - {r.reason}" for r in rows if r.status != "FINISHED"]
    return "\n".join([header, rule, *body] + (["", "Not finished:", *failures] if failures else [])) + "\n"


def csv_table(rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([name for name, _, _ in COLUMNS] + ["run_id", "reason"])
    for r in rows:
        writer.writerow([get(r) if get(r) is not None else "" for _, get, _ in COLUMNS] + [r.run_id, r.reason])
    return out.getvalue()


def console_table(rows: list[TrialRow]) -> str:
    cells = [[name for name, _, _ in COLUMNS]] + [[_cell(get(r), fmt) for _, get, fmt in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        if r.status != "FINISHED":
            lines.append(f"{r.label}: {r.status} - {r.reason}")
    return "\n".join(lines)


def build_report(client, parent, out_dir: Path | None = None) -> tuple[list[TrialRow], Path]:
    """Write the report files, log them under the parent run's `report/`; returns rows and dir."""
    rows = collect(client, parent)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="report-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(f"# {parent.data.tags.get('sweep', 'sweep')}\n\n" + markdown_table(rows))
    (out_dir / "comparison.csv").write_text(csv_table(rows))
    client.log_artifacts(parent.info.run_id, str(out_dir), "report")
    return rows, out_dir


def main(argv: list[str] | None = None) -> int:
    from orchestrator.tracking import absolute_uri, client as make_client

    parser = argparse.ArgumentParser(prog="python -m orchestrator.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref", help="experiment name or id, or a parent run id")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--out", default=None, help="also keep the report files here")
    args = parser.parse_args(argv)
    client = make_client(absolute_uri(args.tracking_uri))
    parent = find_parent(client, args.ref)
    rows, out_dir = build_report(client, parent, Path(args.out) if args.out else None)
    print(console_table(rows))
    print(f"\nreport: {out_dir} (also under run {parent.info.run_id} artifacts report/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
