""""Which method for my budget?" in the sweep report, from a real MLflow store written through the
project's own tracking code: the Pareto table of quality against training FLOPs, peak memory and
adapter bytes (which trials are on which frontier, worked out by hand below), the best trial under
each memory limit by its estimated memory (estimate + runtime overhead, inclusive), the
pareto_budget plot, runs from before `perf/train_flops` (that axis left out, no crash), and trials
the plan left out over sweep.memory_limit as rows of the report."""

from __future__ import annotations

import pytest

from orchestrator.plan import make_plan
from orchestrator.report import build_report
from orchestrator.tracking import SweepTracker, TrialTracker

GIB, MIB = 2**30, 2**20
CPU_OVERHEAD = GIB // 2  # trainers.memory.RUNTIME_OVERHEAD["cpu"]: the trials run on CPU

# rank -> (training FLOPs, measured peak GiB, adapter MiB, estimated total GiB, eval loss, accuracy)
TRIALS = {1: (1e15, 3, 1, 2.5, 1.00, 0.50),
          2: (2e15, 6, 10, 8.0, 0.80, 0.60),   # estimated exactly 8 GiB: fits 8 GiB
          4: (3e15, 10, 4, 16.1, 0.90, 0.65),  # over 16 GiB only by the runtime overhead
          8: (4e15, 20, 40, 30.5, 0.50, 0.80),
          16: (5e15, 25, 50, 40.5, 0.95, 0.52)}  # dominated on every pair
# On the frontiers (sorted by cost, a point is on it when it beats every cheaper one):
FRONTIERS = {
    "lora r=1": "loss/FLOPs, loss/memory, loss/adapter, accuracy/FLOPs, accuracy/memory, accuracy/adapter",
    "lora r=2": "loss/FLOPs, loss/memory, loss/adapter, accuracy/FLOPs, accuracy/memory",
    "lora r=4": "loss/adapter, accuracy/FLOPs, accuracy/memory, accuracy/adapter",
    "lora r=8": "loss/FLOPs, loss/memory, loss/adapter, accuracy/FLOPs, accuracy/memory, accuracy/adapter",
}
# memory limit -> the best trial by accuracy whose estimated total fits it
BEST = {"4.00 GiB": "lora r=1", "8.00 GiB": "lora r=2", "13.0 GiB (sweep.memory_limit)": "lora r=2",
        "16.0 GiB": "lora r=2", "24.0 GiB": "lora r=4", "80.0 GiB": "lora r=8"}


def metrics_of(trial, flops: bool = True) -> dict[str, float]:
    train_flops, peak, adapter, estimated, loss, accuracy = TRIALS[trial.cfg.method.r]
    metrics = {"eval/loss": loss, "eval/accuracy": accuracy, "mem/peak_bytes": peak * GIB,
               "model/adapter_bytes": adapter * MIB, "mem/estimated_peak_bytes": estimated * GIB - CPU_OVERHEAD,
               "model/trainable_params": 1000.0 * trial.cfg.method.r, "model/total_params": 1e6}
    return {**metrics, "perf/train_flops": train_flops} if flops else metrics


def report_of(store_uri, out, experiment: str, flops: bool = True, extra=()):
    plan = make_plan(["+sweep=lora_rank", "sweep.axes={method.r:[1,2,4,8,16]}", f"tracking.experiment={experiment}",
                      "sweep.memory_limit=13GiB", *extra])
    tracker = SweepTracker(store_uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, [], "")
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        TrialTracker(tracker.uri, run_id, rank=0).log_metrics(metrics_of(trial, flops))
        tracker.set_status(run_id, "FINISHED")
    tracker.set_status(parent, "FINISHED")
    return build_report(tracker.client, tracker.client.get_run(parent), out)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def budget_report(store_uri, tmp_path_factory):
    return report_of(store_uri, tmp_path_factory.mktemp("budget") / "out", "budget")


def section(markdown: str, title: str) -> dict[str, list[str]]:
    """The rows of the markdown table under `### title`, by their first cell."""
    lines = markdown.split(f"### {title}", 1)[1].splitlines()
    header = [cell.strip() for cell in next(line for line in lines if line.startswith("|")).strip("|").split("|")]
    rows = {}
    for line in lines[lines.index(next(line for line in lines if line.startswith("|"))) + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_the_pareto_table_lists_each_frontier_trial_with_the_pairs_it_is_optimal_on(budget_report):
    _, out = budget_report
    md = (out / "comparison.md").read_text()
    assert "## Which method for my budget?" in md
    rows = section(md, "Pareto table: quality against cost")
    assert {label: row["Pareto-optimal on (quality/cost)"] for label, row in rows.items()} == FRONTIERS
    assert rows["lora r=1"]["training FLOPs"] == "1e+15" and rows["lora r=4"]["adapter bytes"] == "4.00 MiB"
    assert rows["lora r=8"]["peak memory"] == "20.0 GiB" and rows["lora r=2"]["eval loss"] == "0.8000"
    assert "(1 of 5)" in md  # lora r=16, dominated on every pair


def test_best_under_each_memory_limit_counts_the_estimate_plus_overhead_inclusively(budget_report):
    _, out = budget_report
    md = (out / "comparison.md").read_text()
    rows = section(md, "Best under each memory limit (estimated)")
    assert {limit: row["best trial"] for limit, row in rows.items()} == BEST
    assert rows["16.0 GiB"]["estimated memory"] == "8.00 GiB" and rows["16.0 GiB"]["fit / trials"] == "2 / 5"
    assert rows["80.0 GiB"]["fit / trials"] == "5 / 5" and rows["80.0 GiB"]["exact-match accuracy"] == "0.8000"
    assert "the estimator's prediction, not a measurement" in md and "Best by eval/accuracy (max)" in md


def test_the_budget_plot_and_the_page_show_the_same(budget_report):
    _, out = budget_report
    png = out / "pareto_budget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert "<h2>Which method for my budget?</h2>" in page and "Best under each memory limit (estimated)" in page
    assert "accuracy/FLOPs" in page and "pareto_budget" in page and "training FLOPs" in page


def test_runs_without_training_flops_leave_that_axis_out(store_uri, tmp_path):
    from orchestrator import plots

    cells, out = report_of(store_uri, tmp_path / "out", "no_flops", flops=False)
    md = (out / "comparison.md").read_text()
    rows = section(md, "Pareto table: quality against cost")
    assert "training FLOPs" not in next(iter(rows.values()))
    assert "Not logged by these runs, left out: training FLOPs." in md
    assert rows["lora r=4"]["Pareto-optimal on (quality/cost)"] == "loss/adapter, accuracy/memory, accuracy/adapter"
    figure = plots.budget_figure(cells, plots.Colors())
    assert figure.panels and not any("FLOPs" in panel.title for panel in figure.panels)
    best = section(md, "Best under each memory limit (estimated)")
    assert best["8.00 GiB"]["best trial"] == "lora r=2" and best["8.00 GiB"]["training FLOPs"] == "-"


def test_trials_over_the_memory_limit_are_rows_of_the_report_with_their_reason(store_uri, tmp_path):
    from orchestrator import report

    extra = ["++sweep.axes={train.batch_size:[1,64]}", "tracking.experiment=capped"]
    limit = sum(t.estimated_bytes for t in make_plan(extra).trials) // 2
    plan = make_plan([*extra, f"sweep.memory_limit={limit}"])
    tracker = SweepTracker(store_uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, [], "")
    tracker.record_skipped(parent, plan.skipped)
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        tracker.set_status(run_id, "FINISHED")
    tracker.set_status(parent, "FINISHED")
    (skipped,) = plan.skipped
    tag = tracker.client.get_run(parent).data.tags["skipped_trials"]
    assert tag.startswith("1 over sweep.memory_limit, see skipped_trials.json") and skipped.label in tag
    cells, out = report.build_report(tracker.client, tracker.client.get_run(parent), tmp_path / "out")
    row = next(r for c in cells for r in c.runs if r.label == skipped.label)
    assert row.status == "OVER_MEMORY_LIMIT" and row.reason == skipped.reason and "> limit" in row.reason
    assert "1 trial(s) (+1 skipped as over sweep.memory_limit)" in (out / "comparison.md").read_text()
