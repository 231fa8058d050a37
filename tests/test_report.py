"""The sweep report from a real MLflow store: cells that group seeds (mean ± std, n), failed and
skipped trials with their reasons, the CSV, the plots that apply (and only those), the interactive
page in a real headless browser; and a trial rerun with the same seed reproducing its eval loss.

The store is written through the project's own tracking code (SweepTracker/TrialTracker on a
planned sweep), so the report reads exactly the names a real sweep logs; only the numbers are made
up, chosen so the expected aggregates are known.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from orchestrator.plan import make_plan
from orchestrator.report import build_report, console_table, markdown_table
from orchestrator.tracking import SweepTracker, TrialTracker, git_state

REPO = Path(__file__).resolve().parent.parent

MIB = 2**20
SEEDS = (0, 1, 2)
TOTAL_PARAMS = 1_000_000


def fake_metrics(trial) -> dict[str, float]:
    """Final metrics of a trial as a recipe reports them; the seed adds -0.1 / 0 / +0.1 to eval loss."""
    cfg = trial.cfg
    r = getattr(cfg.method, "r", None)
    trainable = TOTAL_PARAMS if r is None else 1_000 * r
    loss = (1.0 if r is None else 2.0 - 0.2 * math.log2(r)) + 0.1 * (cfg.train.seed - 1)
    peak = 20 * MIB + 16 * trainable
    return {
        "eval/loss": loss, "eval/perplexity": math.exp(loss), "eval/accuracy": max(0.0, 1.0 - loss / 2),
        "model/trainable_params": trainable, "model/total_params": TOTAL_PARAMS,
        "model/adapter_bytes": 4 * trainable, "mem/peak_bytes": peak, "mem/estimated_peak_bytes": peak * 1.1,
        "perf/tokens_per_s": 5000.0 - (2000 if r is None else r * 10) + 50 * cfg.train.seed,
        "time/train_s": 12.0 + cfg.train.seed,
    }


def log_trial(tracker: SweepTracker, run_id: str, trial, steps: int = 5) -> None:
    worker = TrialTracker(tracker.uri, run_id, rank=0)
    final = fake_metrics(trial)
    for step in range(1, steps + 1):
        worker.log_metrics({"train/loss": final["eval/loss"] + 2.0 / step, "train/lr": 1e-3,
                            "train/tokens_per_s": final["perf/tokens_per_s"]}, step=step * 10)
    worker.log_metrics(final)


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory):
    """One sqlite store for the module (creating one runs MLflow's migrations: seconds); each test
    uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, store_uri):
    """full_vs_lora x 3 seeds: lora r=8 seed=2 failed, full seed=2 was skipped, the rest finished."""
    root = tmp_path_factory.mktemp("report")
    plan = make_plan(["+sweep=full_vs_lora", "sweep.seeds=[0,1,2]"])
    tracker = SweepTracker(store_uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, ["sweep.seeds=[0,1,2]"], "")
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        tracker.set_status(run_id, "RUNNING")
        label = trial.label
        if label == "lora r=8 seed=2":
            log_trial(tracker, run_id, trial, steps=2)
            tracker.set_status(run_id, "FAILED", "NonFiniteLossError: non-finite loss at step 20")
        elif label.startswith("full") and label.endswith("seed=2"):
            tracker.skip(run_id, "skipped: trial time budget of the sweep spent")
        else:
            log_trial(tracker, run_id, trial)
            tracker.set_status(run_id, "FINISHED")
    tracker.set_status(parent, "FAILED")
    run = tracker.client.get_run(parent)
    cells, out = build_report(tracker.client, run, root / "out")
    return tracker, run, cells, out, plan


def by_label(cells):
    return {c.label: c for c in cells}


def test_cells_group_seeds_with_mean_std_and_n(sweep_store):
    _, _, cells, _, plan = sweep_store
    assert len(plan.trials) == 12
    cells = by_label(cells)
    assert set(cells) == {"full lr=0.0003", "lora r=2", "lora r=8", "lora r=32"}
    r2 = cells["lora r=2"]
    assert [r.seed for r in r2.runs] == ["0", "1", "2"]
    loss = r2.metric("eval/loss")
    assert (loss.n, loss.mean) == (3, pytest.approx(1.8)) and loss.std == pytest.approx(0.1)
    # The failed seed is left out of the aggregates, not averaged in.
    r8 = cells["lora r=8"].metric("eval/loss")
    assert r8.n == 2 and r8.mean == pytest.approx(statistics.fmean([1.4 - 0.1, 1.4]))
    assert r8.std == pytest.approx(statistics.stdev([1.3, 1.4]))
    assert cells["lora r=8"].state == "2/3 FINISHED, 1/3 FAILED"
    assert cells["full lr=0.0003"].state == "2/3 FINISHED, 1/3 SKIPPED"


def test_markdown_and_console_agree_and_name_every_unfinished_trial(sweep_store):
    _, _, cells, out, _ = sweep_store
    md = markdown_table(cells)
    header = [h.strip() for h in md.splitlines()[0].strip("|").split("|")]
    for column in ("method", "r", "precision", "n", "trainable", "trainable %", "adapter", "est. peak mem",
                   "peak mem", "tokens/s", "train s", "eval loss", "perplexity", "accuracy", "state"):
        assert column in header, column
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in md.splitlines()[2:6]}
    r2 = dict(zip(header, rows["lora r=2"]))
    assert r2["eval loss"] == "1.8000 ± 0.1000" and r2["n"] == "3" and r2["trainable"] == "2,000"
    assert r2["trainable %"] == "0.200" and r2["adapter"] == "7.81 KiB" and r2["state"] == "FINISHED"
    assert dict(zip(header, rows["lora r=8"]))["n"] == "2/3"
    assert "lora r=8 seed=2" in md and "FAILED - NonFiniteLossError: non-finite loss at step 20" in md
    assert "full lr=0.0003 seed=2" in md and "SKIPPED - skipped: trial time budget of the sweep spent" in md

    console = console_table(cells).splitlines()
    console_header = console[0].split()
    assert "method" in console_header and "perplexity" not in console_header  # fewer columns...
    for label, md_row in rows.items():  # ...same rows and values
        line = next(line for line in console if line.startswith(label + " "))
        for column in ("eval loss", "accuracy", "tokens/s", "peak mem", "state"):
            assert dict(zip(header, md_row))[column] in line, (label, column)
    assert any("NonFiniteLossError" in line for line in console)
    comparison = (out / "comparison.md").read_text().split("## Which method for my budget?")[0]
    assert comparison.count("| lora r=") == 3  # the budget tables below name trials again


def test_csv_has_raw_means_stds_and_seeds(sweep_store):
    _, _, _, out, _ = sweep_store
    rows = {r["trial"]: r for r in csv.DictReader(io.StringIO((out / "comparison.csv").read_text()))}
    r2 = rows["lora r=2"]
    assert float(r2["eval loss"]) == pytest.approx(1.8) and float(r2["eval loss std"]) == pytest.approx(0.1)
    assert r2["seeds"] == "0 1 2" and len(r2["run_ids"].split()) == 3 and r2["r"] == "2"
    assert float(r2["peak mem"]) == pytest.approx(20 * MIB + 16 * 2000)
    assert "NonFiniteLossError" in rows["lora r=8"]["reasons"]
    trials = list(csv.DictReader(io.StringIO((out / "trials.csv").read_text())))
    assert len(trials) == 12 and {t["status"] for t in trials} == {"FINISHED", "FAILED", "SKIPPED"}
    assert all(t["replay"].startswith("MLFLOW_TRACKING_URI=") for t in trials)


def test_files_plots_that_apply_and_artifacts(sweep_store):
    tracker, parent, _, out, _ = sweep_store
    drawn = {"loss_accuracy_vs_rank", "pareto", "pareto_budget", "train_loss", "throughput"}
    assert {p.stem for p in out.glob("*.png")} == drawn
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    md = (out / "comparison.md").read_text()
    assert "- memory_vs_precision: precision does not vary (fp32)" in md  # skipped, with the reason
    logged = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{n}" for n in ("comparison.md", "comparison.csv", "trials.csv", "report.html")} <= logged
    assert {f"report/{n}.png" for n in drawn} <= logged


def test_precision_sweep_draws_memory_and_skips_rank(tmp_path, store_uri):
    plan = make_plan(["+sweep=precision"])
    tracker = SweepTracker(store_uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, [], "")
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        log_trial(tracker, run_id, trial)
        tracker.set_status(run_id, "FINISHED")
    cells, out = build_report(tracker.client, tracker.client.get_run(parent), tmp_path / "out")
    assert "n" not in markdown_table(cells).splitlines()[0].split(" | ")  # one seed: no n column
    assert (out / "memory_vs_precision.png").exists() and not (out / "loss_accuracy_vs_rank.png").exists()
    assert "- loss_accuracy_vs_rank: method.r does not vary (8)" in (out / "comparison.md").read_text()


def test_stage_metrics_become_columns_only_when_present(tmp_path, store_uri):
    """An RLHF pipeline's reward stage logs eval/pairwise_accuracy and eval/reward_mean: they get
    columns, the table gets a stage column, and each stage is plotted apart."""
    plan = make_plan(["+sweep=lora_rank", "sweep.axes={method.r:[2,4,8]}", "tracking.experiment=stages"])
    tracker = SweepTracker(store_uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, [], "")
    for i, trial in enumerate(plan.trials):
        run_id = tracker.create_child(trial, trial.config)
        log_trial(tracker, run_id, trial)
        if i == 0:
            tracker.client.set_tag(run_id, "stage", "reward")
            TrialTracker(tracker.uri, run_id, 0).log_metrics({"eval/pairwise_accuracy": 0.75, "eval/reward_mean": 0.5})
        tracker.set_status(run_id, "FINISHED")
    cells, out = build_report(tracker.client, tracker.client.get_run(parent), tmp_path / "out")
    header = [h.strip() for h in markdown_table(cells).splitlines()[0].strip("|").split("|")]
    assert {"stage", "pairwise_accuracy", "reward_mean"} <= set(header)
    row = next(line for line in markdown_table(cells).splitlines() if line.startswith("| lora r=2 "))
    assert "| reward |" in row and "| 0.75 | 0.5 |" in row
    assert (out / "loss_accuracy_vs_rank_sft.png").exists() and (out / "train_loss_reward.png").exists()
    assert "- loss_accuracy_vs_rank_reward: method.r does not vary (2)" in (out / "comparison.md").read_text()
    sft_only = markdown_table(cells[1:]).splitlines()[0]
    assert "pairwise_accuracy" not in sft_only and "stage" not in sft_only


def test_a_trial_skipped_as_inapplicable_is_recorded_on_the_parent_and_a_row_of_the_rebuilt_report(
        tmp_path, store_uri, nobias_model, capsys):
    """The plan leaves bitfit out (the model has no biases); the parent run keeps it (tag and
    skipped_trials.json) and `python -m orchestrator.report` shows it as a row with its reason."""
    from orchestrator import report

    plan = make_plan([f"model.name_or_path={nobias_model}", "sweep.variants=[{method:lora},{method:bitfit}]",
                      "tracking.experiment=inapplicable"])
    tracker = SweepTracker(store_uri, plan.experiment)
    parent = tracker.start_parent(plan.sweep, [], "")
    tracker.record_skipped(parent, plan.skipped)
    for trial in plan.trials:
        run_id = tracker.create_child(trial, trial.config)
        log_trial(tracker, run_id, trial)
        tracker.set_status(run_id, "FINISHED")
    tracker.set_status(parent, "FINISHED")
    run = tracker.client.get_run(parent)
    assert run.data.tags["skipped_trials"].startswith("1 inapplicable to the model") and "bitfit" in \
        run.data.tags["skipped_trials"]
    assert report.main([parent, "--tracking-uri", store_uri, "--out", str(tmp_path / "out")]) == 0
    console = capsys.readouterr().out
    reason = plan.skipped[0].reason
    row = next(line for line in console.splitlines() if line.startswith("bitfit "))
    assert "INAPPLICABLE" in row and f"bitfit: INAPPLICABLE - {reason}" in console
    assert next(line for line in console.splitlines() if line.startswith("lora ")).rstrip().endswith("FINISHED")
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "1 trial(s) (+1 skipped as inapplicable to the model)" in md and reason in md
    trials = list(csv.DictReader(io.StringIO((tmp_path / "out" / "trials.csv").read_text())))
    assert [(t["trial"], t["status"]) for t in trials] == [("lora", "FINISHED"), ("bitfit", "INAPPLICABLE")]


# --------------------------------------------------------------------------- the page in a browser


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_html_page_renders_in_a_headless_browser(sweep_store, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (CI installs it: apt-get install -y chromium)")
    _, _, cells, out, _ = sweep_store
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)\s*=|url\(|@import", page), "the page must load nothing from anywhere"
    # No name resolves: the page must render from the file alone.
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000"]
    dom = subprocess.run(cmd + ["--dump-dom", (out / "report.html").as_uri() + "#selftest"],
                         capture_output=True, text=True, timeout=60, check=False).stdout
    start = dom.index('<pre id="selftest">') + len('<pre id="selftest">')
    result = json.loads(dom[start:dom.index("</pre>", start)].replace("&amp;", "&").replace("&lt;", "<")
                        .replace("&gt;", ">").replace("&quot;", '"'))
    # rank: loss+accuracy; pareto: 2 qualities x 2 costs; pareto_budget: 2 qualities x (peak memory,
    # adapter bytes: these runs log no perf/train_flops); train loss; throughput
    panels = 2 + 4 + 4 + 1 + 1
    assert result["charts"] == panels
    for cell in cells:
        if cell.finished:
            assert cell.label in result["labels"], cell.label
    assert "lora r=8 seed=2 (FAILED)" in result["labels"]  # the failed trial's partial loss curve
    assert result["tooltip_visible"] and result["tooltip_hidden_after"]
    assert "method:" in result["tooltip"] and "eval loss:" in result["tooltip"]
    assert result["series_hidden_on_click"] and result["series_shown_on_second_click"]

    shot = tmp_path / "page.png"
    subprocess.run(cmd + [f"--screenshot={shot}", "--window-size=1300,2400", (out / "report.html").as_uri()],
                   capture_output=True, timeout=60, check=False)
    from PIL import Image

    pixels = Image.open(shot).convert("L").resize((65, 120))
    colors = set(pixels.getdata())
    assert len(colors) > 20, "the screenshot looks blank"


# --------------------------------------------------------------------------- numbers users can trust


SMOKE = ("train=smoke", "train.max_steps=4", "train.log_every=2", "train.batch_size=8", "data.max_train_rows=64",
         "data.max_eval_rows=16")


def test_rerun_with_the_same_seed_reproduces_eval_loss(make_cfg, tmp_path):
    from trainers.trial import run_trial

    cfg = make_cfg(*SMOKE)
    first, again = run_trial(cfg, tmp_path / "first"), run_trial(cfg, tmp_path / "again")
    for name in ("eval/loss", "eval/accuracy", "train/final_loss", "model/trainable_params"):
        assert first[name] == again[name], name
    other_seed = run_trial(make_cfg(*SMOKE, "train.seed=1"), tmp_path / "other")
    assert other_seed["eval/loss"] != first["eval/loss"], "the seed must matter, or this test proves nothing"


def test_environment_and_replay_name_what_a_rerun_needs(make_cfg, tmp_path, store_uri):
    import hashlib

    import yaml
    from mlflow.artifacts import download_artifacts

    from trainers.validate import from_container
    from trainers.data import resolve_path
    from trainers.trial import ENV_PACKAGES, environment

    cfg = make_cfg(*SMOKE)
    env = environment(cfg)
    assert set(ENV_PACKAGES) | {"python", "device"} <= set(env) and env["device"].startswith("cpu")
    expected = hashlib.sha256(resolve_path(cfg.data.train_file).read_bytes()).hexdigest()
    assert env["data.train_sha256"] == expected and len(env["data.eval_sha256"]) == 64

    plan = make_plan(["+sweep=lora_rank", "sweep.axes={method.r:[4]}"])
    tracker = SweepTracker(store_uri, plan.experiment)
    tracker.start_parent(plan.sweep, [], "")
    trial = plan.trials[0]
    run_id = tracker.create_child(trial, trial.config)
    tags = tracker.client.get_run(run_id).data.tags
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert tags["env.git_commit"] == head  # this checkout's commit, which a rerun checks out
    assert git_state(tmp_path)["env.git_commit"].startswith("unknown")  # not a checkout: said, not guessed
    replay = tags["replay"]
    assert f"--run-id {run_id} --artifact-path config.yaml" in replay and "python -m trainers --config" in replay
    # The config the replay command trains from is the trial's own config.
    path = download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "replay"),
                              tracking_uri=tracker.uri)
    # The Ray-free trainers library loads it (carrying cluster/tracking/sweep along untyped); the
    # orchestrator's schema types those sections too.
    from orchestrator.config import OrchestratorConfig
    from trainers.config import to_container

    logged = yaml.safe_load(Path(path).read_text())
    assert to_container(from_container(logged)) == to_container(trial.cfg)
    assert from_container(logged, OrchestratorConfig) == trial.cfg


def test_the_replay_command_reproduces_the_logged_eval_loss(tmp_path, store_uri):
    """The `replay` tag, run as a user would (a shell in an empty directory), retrains the trial
    from its logged config.yaml and gets the eval loss its run logged."""
    import os
    import sys

    plan = make_plan(["+sweep=lora_rank", "sweep.axes={method.r:[4]}", *SMOKE])
    tracker = SweepTracker(store_uri, plan.experiment + "-replay")
    tracker.start_parent(plan.sweep, [], "")
    trial = plan.trials[0]
    run_id = tracker.create_child(trial, trial.config)
    from trainers.trial import run_trial

    run_trial(trial.cfg, tmp_path / "trial", tracker=TrialTracker(tracker.uri, run_id, rank=0))
    logged = tracker.client.get_run(run_id).data.metrics["eval/loss"]

    replay = tracker.client.get_run(run_id).data.tags["replay"]
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "rerun").mkdir()
    proc = subprocess.run(["bash", "-c", replay], cwd=tmp_path / "rerun", env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    replayed = json.loads(next((tmp_path / "rerun").glob("replay-*/metrics.json")).read_text())
    assert replayed["eval/loss"] == pytest.approx(logged, rel=1e-6)


def test_a_line_plot_of_many_trials_keeps_its_axes_and_tells_same_coloured_lines_apart(tmp_path):
    """A tuned sweep's loss curves have dozens of series: the legend goes beside the axes (inside,
    taller than the axes, it squeezed them to nothing), and lines that share a colour differ in marker."""
    import warnings

    from matplotlib.image import imread

    from orchestrator.plots import PALETTE, Colors, Figure, Panel, Point, Series, render_png

    colors = Colors()

    def figure(n):
        series = [Series(f"trial {i} lr={0.001 * (i + 1):g}", colors(f"trial {i}"),
                         [Point(step, 5.0 - step / 10 - i / n) for step in (10, 20, 30, 40)], kind="lines")
                  for i in range(n)]
        return Figure("curves", "Training-loss curves", [Panel("Training loss", "step", "loss", series)])

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "constrained_layout not applied" is a UserWarning
        few = imread(render_png(figure(3), tmp_path / "few.png"))
        many_path = render_png(figure(40), tmp_path / "many.png")
    many = imread(many_path)
    assert many.shape[0] == few.shape[0] and many.shape[1] > few.shape[1] * 1.3  # room beside the axes

    from matplotlib.figure import Figure as MplFigure

    from orchestrator.plots import _xy_panel

    ax = MplFigure().subplots()
    _xy_panel(ax, figure(len(PALETTE) + 1).panels[0])
    markers = [line.get_marker() for line in ax.get_lines()]
    assert markers[0] != markers[len(PALETTE)]  # the first and the (palette + 1)th share a colour
