"""The trade-off plots of a sweep report, described once and drawn twice: as PNG (matplotlib, Agg)
and in the interactive page (orchestrator/report_html.py renders the same description in SVG).

`figures(cells, histories)` decides which plots apply to a sweep and returns them with the list of
those skipped and why (a rank plot needs ranks that vary, a precision plot precisions that vary...):

    loss_accuracy_vs_rank   eval loss and accuracy against LoRA rank, one line per method
    memory_vs_precision     measured (and estimated) peak memory per precision
    pareto                  quality against trainable parameters and against peak memory, with
                            the Pareto frontier (no other trial is better on both axes)
    pareto_budget           quality against training FLOPs, peak memory and adapter bytes, with
                            the frontier (orchestrator/answer.py: "Which method for my budget?")
    train_loss              training-loss curves overlaid (mean ± std band over seeds)
    throughput              training tokens/s per trial, coloured by method
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cells import Cell, Stat, ran_budget

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
FRONTIER_COLOR = "#222222"
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
MIB = 2**20
QUALITIES = (("eval/loss", "eval loss", "{:.4f}"), ("eval/accuracy", "exact-match accuracy", "{:.3f}"))


@dataclass
class Point:
    x: float | str  # a category name on bar panels
    y: float
    err: float | None = None  # ± std over seeds
    label: str = ""  # the trial (cell) it stands for
    info: list[str] = field(default_factory=list)  # tooltip lines, formatted like the table


@dataclass
class Series:
    name: str
    color: str
    points: list[Point]
    kind: str = "markers"  # markers | lines | frontier (dashed step) | hline (reference level)
    dashed: bool = False
    band: list[tuple[float, float, float]] = field(default_factory=list)  # (x, low, high)


@dataclass
class Panel:
    title: str
    x_label: str
    y_label: str
    series: list[Series]
    kind: str = "xy"  # xy | bar
    categories: list[str] = field(default_factory=list)  # bar panels: x order
    x_log: bool = False
    x_ticks: list[float] = field(default_factory=list)  # explicit ticks (e.g. the ranks swept)
    note: str = ""


@dataclass
class Figure:
    name: str  # file stem
    title: str
    panels: list[Panel]


# --------------------------------------------------------------------------- what to draw


class Colors:
    """The same name gets the same colour in every figure of a report."""

    def __init__(self):
        self.assigned: dict[str, str] = {}

    def __call__(self, name: str) -> str:
        if name not in self.assigned:
            self.assigned[name] = PALETTE[len(self.assigned) % len(PALETTE)]
        return self.assigned[name]


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _stat_text(name: str, stat: Stat | None, fmt: str, unit: str = "") -> str:
    if stat is None:
        return f"{name}: -"
    text = fmt.format(stat.mean)
    if stat.std is not None:
        text += " ± " + fmt.format(stat.std)
    return f"{name}: {text}{unit} (n={stat.n})"


def _scaled(stat: Stat, factor: float) -> Stat:
    return type(stat)(stat.mean / factor, None if stat.std is None else stat.std / factor, stat.n)


def _point(cell: Cell, x, stat: Stat, extra: list[str] = ()) -> Point:
    info = [f"method: {cell.method}", *extra]
    return Point(x=x, y=stat.mean, err=stat.std, label=cell.label, info=info)


def _without(label: str, token_prefix: str) -> str:
    return " ".join(t for t in label.split() if not t.startswith(token_prefix)) or label


def _wide(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > 20


def rank_figure(cells: list[Cell], colors: Colors) -> Figure | str:
    with_loss = [c for c in cells if c.metric("eval/loss") is not None]
    ranked = [c for c in with_loss if _num(c.param("method.r")) is not None]
    ranks = sorted({_num(c.param("method.r")) for c in ranked})
    if len(ranks) < 2:
        return (f"method.r does not vary ({', '.join(f'{r:g}' for r in ranks)})" if ranks
                else "no trial with a rank (method.r) and an eval loss")
    panels = []
    for metric, name, fmt in QUALITIES:
        if all(c.metric(metric) is None for c in with_loss):
            continue
        groups: dict[str, list[Point]] = {}
        for c in ranked:
            stat = c.metric(metric)
            if stat is not None:
                r = _num(c.param("method.r"))
                groups.setdefault(_without(c.label, "r="), []).append(
                    _point(c, r, stat, [f"r: {r:g}", _stat_text(name, stat, fmt)]))
        series = [Series(group, colors(group), sorted(points, key=lambda p: p.x), kind="lines")
                  for group, points in groups.items()]
        # Trials without a rank (full fine-tuning, IA3...) are reference levels across the plot.
        for c in with_loss:
            stat = c.metric(metric)
            if _num(c.param("method.r")) is None and stat is not None:
                series.append(Series(c.label, colors(c.label), [_point(c, None, stat, [_stat_text(name, stat, fmt)])],
                                     kind="hline", dashed=True))
        if series:
            panels.append(Panel(f"{name} vs LoRA rank", "rank r (log scale)", name, series, x_log=True,
                                x_ticks=ranks, note="error bars: ± std over seeds"))
    return Figure("loss_accuracy_vs_rank", "Eval loss and accuracy vs rank", panels)


def memory_figure(cells: list[Cell], colors: Colors) -> Figure | str:
    measured = [c for c in cells if c.metric("mem/peak_bytes") is not None and c.param("precision.name")]
    precisions = {c.param("precision.name") for c in measured}
    if len(precisions) < 2:
        return (f"precision does not vary ({', '.join(sorted(precisions))})" if precisions
                else "no trial logged mem/peak_bytes")
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    measured.sort(key=lambda c: (order.get(c.param("precision.name"), len(order)), c.label))
    categories = [c.label for c in measured]
    series = []
    for metric, name in (("mem/peak_bytes", "measured peak"), ("mem/estimated_peak_bytes", "estimated peak")):
        points = []
        for c in measured:
            stat = c.metric(metric)
            if stat is not None:
                scaled = _scaled(stat, MIB)
                points.append(_point(c, c.label, scaled, [f"precision: {c.param('precision.name')}",
                                                          _stat_text(name, scaled, "{:,.1f}", " MiB")]))
        if points:
            series.append(Series(name, colors(name), points))
    panel = Panel("Peak memory by precision", "trial (by precision)", "peak memory (MiB)", series, kind="bar",
                  categories=categories, note="measured: peak bytes of live tensors during training")
    return Figure("memory_vs_precision", "Peak memory vs precision", [panel])


def pareto_frontier(points: list[Point], maximize: bool) -> list[Point]:
    """Points no other point beats on both axes (lower x, and lower y or higher y if maximize)."""
    frontier, best = [], None
    for p in sorted(points, key=lambda p: (p.x, -p.y if maximize else p.y)):
        if best is None or (p.y > best if maximize else p.y < best):
            frontier.append(p)
            best = p.y
    return frontier


def pareto_figure(cells: list[Cell], colors: Colors) -> Figure | str:
    costs = [("model/trainable_params", "trainable parameters", "", 1.0, "{:,.0f}"),
             ("mem/peak_bytes", "peak memory", "MiB", MIB, "{:,.1f}")]
    panels = pareto_panels(cells, colors, costs)
    if not panels:
        return "fewer than two finished trials with eval metrics and differing parameters or memory"
    return Figure("pareto", "Quality vs cost, with the Pareto frontier", panels)


def pareto_panels(cells: list[Cell], colors: Colors, costs: list[tuple[str, str, str, float, str]]) -> list[Panel]:
    """A panel per quality x cost (metric, name, unit, scale, format) that at least two cells
    differ on: every cell a point coloured by method, and the Pareto frontier."""
    panels = []
    for q_metric, q_name, q_fmt in QUALITIES:
        maximize = q_metric == "eval/accuracy"
        better = "higher" if maximize else "lower"
        for x_metric, x_name, unit, scale, x_fmt in costs:
            usable = [c for c in cells if c.metric(q_metric) is not None and c.metric(x_metric) is not None]
            if len({c.metric(x_metric).mean for c in usable}) < 2:
                continue
            by_method: dict[str, list[Point]] = {}
            for c in usable:
                q, x = c.metric(q_metric), _scaled(c.metric(x_metric), scale)
                info = [_stat_text(x_name, x, x_fmt, f" {unit}" if unit else ""), _stat_text(q_name, q, q_fmt)]
                by_method.setdefault(c.method, []).append(_point(c, x.mean, q, info))
            series = [Series(m, colors(m), pts) for m, pts in by_method.items()]
            frontier = pareto_frontier([p for s in series for p in s.points], maximize)
            series.append(Series("Pareto frontier", FRONTIER_COLOR, frontier, kind="frontier", dashed=True))
            log_x = _wide([p.x for s in series for p in s.points])
            x_label = x_name + (f" ({unit}{', ' if unit and log_x else ''}{'log scale' if log_x else ''})"
                                if unit or log_x else "")
            panels.append(Panel(f"{q_name} vs {x_name}", x_label, f"{q_name} ({better} is better)", series,
                                x_log=log_x, note=f"frontier: no trial has less {x_name} and {better} {q_name}"))
    return panels


# What a user pays, for "Which method for my budget?" (orchestrator/answer.py): metric, name,
# unit, scale, format, as pareto_panels takes them.
BUDGET_COSTS = [("perf/train_flops", "training FLOPs", "", 1.0, "{:.3g}"),
                ("mem/peak_bytes", "peak memory", "MiB", MIB, "{:,.1f}"),
                ("model/adapter_bytes", "adapter bytes", "MiB", MIB, "{:,.2f}")]


def budget_figure(cells: list[Cell], colors: Colors) -> Figure | str:
    """Quality against training FLOPs, peak memory and adapter bytes, with the frontiers, of the
    trials that ran their whole budget; a cost no trial logged has no panel."""
    panels = pareto_panels(ran_budget(cells), colors, BUDGET_COSTS)
    if not panels:
        return "fewer than two finished trials with eval metrics and differing FLOPs, memory or adapter bytes"
    return Figure("pareto_budget", "Which method for my budget? Quality vs FLOPs, memory, adapter bytes", panels)


def loss_curve_figure(cells: list[Cell], histories: dict[str, list[tuple[int, float]]],
                      colors: Colors) -> Figure | str:
    import statistics

    series = []
    for c in cells:
        curves = [dict(histories[r.run_id]) for r in c.finished if len(histories.get(r.run_id, ())) >= 2]
        if curves:
            steps = sorted(set.intersection(*(set(curve) for curve in curves)))
            points, band = [], []
            for step in steps:
                values = [curve[step] for curve in curves]
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else None
                info = [f"step: {step}", f"train loss: {mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")
                        + f" (n={len(values)})"]
                points.append(Point(step, mean, std, c.label, info))
                if std is not None:
                    band.append((step, mean - std, mean + std))
            if points:
                series.append(Series(c.label, colors(c.label), points, kind="lines", band=band))
        # A failed trial's curve up to where it stopped is often the explanation (divergence).
        for r in c.runs:
            if r.status != "FINISHED" and len(histories.get(r.run_id, ())) >= 1:
                name = f"{r.label} ({r.status})"
                pts = [Point(s, v, None, name, [f"step: {s}", f"train loss: {v:.4f}", f"{r.status}: {r.reason}"])
                       for s, v in histories[r.run_id]]
                series.append(Series(name, colors(name), pts, kind="lines", dashed=True))
    if not series:
        return "no trial logged a train/loss history of two or more steps"
    panel = Panel("Training loss", "optimizer step", "train loss (mean over the logging window)", series,
                  note="band: ± std over seeds; dashed: trials that did not finish")
    return Figure("train_loss", "Training-loss curves", [panel])


def throughput_figure(cells: list[Cell], colors: Colors) -> Figure | str:
    usable = [c for c in cells if c.metric("perf/tokens_per_s") is not None]
    if len(usable) < 2:
        return "fewer than two finished trials logged perf/tokens_per_s"
    by_method: dict[str, list[Point]] = {}
    for c in usable:
        stat = c.metric("perf/tokens_per_s")
        by_method.setdefault(c.method, []).append(_point(c, c.label, stat, [_stat_text("tokens/s", stat, "{:,.0f}")]))
    series = [Series(m, colors(m), pts) for m, pts in by_method.items()]
    panel = Panel("Training throughput", "trial", "tokens/s (trained tokens per second)", series, kind="bar",
                  categories=[c.label for c in usable], note="error bars: ± std over seeds")
    return Figure("throughput", "Tokens/s per method", [panel])


def figures(cells: list[Cell], histories: dict[str, list[tuple[int, float]]]
            ) -> tuple[list[Figure], list[tuple[str, str]]]:
    """The figures that apply to these cells, and (name, why) for those that do not. Stages of a
    pipeline (sft, reward, dpo...) are plotted apart: their losses are not the same quantity."""
    colors = Colors()
    for c in cells:  # methods first, so a method keeps its colour in every figure
        colors(c.method)
    stages = list(dict.fromkeys(c.stage for c in cells))
    drawn, skipped = [], []
    for stage in stages:
        group = [c for c in cells if c.stage == stage]
        built = [("loss_accuracy_vs_rank", rank_figure(group, colors)),
                 ("memory_vs_precision", memory_figure(group, colors)),
                 ("pareto", pareto_figure(group, colors)),
                 ("pareto_budget", budget_figure(group, colors)),
                 ("train_loss", loss_curve_figure(group, histories, colors)),
                 ("throughput", throughput_figure(group, colors))]
        for name, figure in built:
            if len(stages) > 1:
                name = f"{name}_{stage}"
            if isinstance(figure, Figure) and figure.panels:
                if len(stages) > 1:
                    figure.name, figure.title = name, f"{figure.title} ({stage} stage)"
                drawn.append(figure)
            else:
                skipped.append((name, figure if isinstance(figure, str) else "nothing to draw"))
    return drawn, skipped


# --------------------------------------------------------------------------- PNG


def render_png(figure: Figure, path: Path) -> Path:
    from matplotlib.figure import Figure as MplFigure  # no pyplot: no global state, no GUI backend

    columns = min(2, len(figure.panels))
    rows = (len(figure.panels) + columns - 1) // columns
    widest = max((len(p.categories) for p in figure.panels), default=0)
    width = 6.4 * columns if widest <= 6 else max(9.0, 0.75 * widest + 3)
    # a line plot with many series (a tuned sweep has dozens of trials) keeps its legend beside the
    # axes, in columns of up to _LEGEND_COLUMN_ROWS entries: inside, it would cover the lines or, taller
    # than the axes, squeeze them to nothing
    outside = max((_outside_legend_columns(p) for p in figure.panels), default=0)
    width += _LEGEND_COLUMN_WIDTH * outside * columns
    fig = MplFigure(figsize=(width, 4.8 * rows + 0.6), dpi=110, layout="constrained")
    fig.suptitle(figure.title, fontsize=14, fontweight="bold")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, panel in zip(axes, figure.panels):
        (_bar_panel if panel.kind == "bar" else _xy_panel)(ax, panel)
        ax.set_title(panel.title, fontsize=11, pad=16 if panel.note else 6)
        if panel.note:  # a smaller line between the title and the plot
            ax.text(0.5, 1.012, panel.note, transform=ax.transAxes, fontsize=7.5, color="#555555", va="bottom",
                    ha="center")
        ax.set_xlabel(panel.x_label)
        ax.set_ylabel(panel.y_label)
        ax.grid(True, alpha=0.3)
        ax.set_axisbelow(True)
        legend_columns = _outside_legend_columns(panel)
        if legend_columns:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=legend_columns,
                      borderaxespad=0.0)
        else:
            ax.legend(fontsize=8, loc="upper right" if panel.kind == "bar" else "best",
                      ncol=len(panel.series) if panel.kind == "bar" else 1)
    for ax in axes[len(figure.panels):]:
        ax.set_visible(False)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


_MARKERS = ("o", "s", "^", "D", "v")
_LEGEND_INSIDE_MAX = 12  # more line series than this: the legend goes beside the axes
_LEGEND_COLUMN_ROWS = 24  # entries per column of that legend
_LEGEND_COLUMN_WIDTH = 3.2  # inches a column of that legend takes


def _outside_legend_columns(panel: Panel) -> int:
    """Columns of a legend drawn beside `panel` (0: the legend fits inside it)."""
    if panel.kind == "bar" or len(panel.series) <= _LEGEND_INSIDE_MAX:
        return 0
    return -(-len(panel.series) // _LEGEND_COLUMN_ROWS)


def _xy_panel(ax, panel: Panel) -> None:
    import math

    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    labelled = set()
    position = (lambda x: math.log10(x)) if panel.x_log else (lambda x: x)
    all_x = [position(p.x) for s in panel.series if s.kind != "hline" for p in s.points]
    right_edge = min(all_x) + 0.75 * (max(all_x) - min(all_x)) if all_x else 0.0
    lines_drawn = 0
    for s in panel.series:
        style = "--" if s.dashed else "-"
        if s.kind == "hline":
            ax.axhline(s.points[0].y, color=s.color, linestyle=style, linewidth=1.3, label=s.name)
            continue
        xs, ys = [p.x for p in s.points], [p.y for p in s.points]
        if s.band:
            ax.fill_between([b[0] for b in s.band], [b[1] for b in s.band], [b[2] for b in s.band],
                            color=s.color, alpha=0.18, linewidth=0)
        if s.kind == "frontier":
            ax.plot(xs, ys, drawstyle="steps-post", color=s.color, linestyle=style, linewidth=1.2, label=s.name,
                    zorder=1)
            continue
        errs = [p.err or 0.0 for p in s.points]
        if s.kind == "lines":
            # past the palette's colours, another marker tells apart two lines of the same colour
            marker = _MARKERS[(lines_drawn // len(PALETTE)) % len(_MARKERS)] if len(xs) <= 30 else None
            lines_drawn += 1
            ax.plot(xs, ys, color=s.color, linestyle=style, marker=marker, markersize=4, linewidth=1.5, label=s.name)
            if any(errs) and not s.band:
                ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor=s.color, capsize=3, linewidth=1)
        else:
            ax.errorbar(xs, ys, yerr=errs if any(errs) else None, fmt="o", color=s.color, markersize=7,
                        capsize=3, label=s.name, zorder=3)
            for p in s.points:
                if p.label not in labelled:
                    labelled.add(p.label)
                    right = all_x and max(all_x) > min(all_x) and position(p.x) > right_edge
                    ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=(-6 if right else 6, 5),
                                ha="right" if right else "left", fontsize=7, color="#333333")
    if panel.x_log:
        ax.set_xscale("log", base=2 if panel.x_ticks else 10)
    if panel.x_ticks:
        ax.xaxis.set_major_locator(FixedLocator(panel.x_ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _bar_panel(ax, panel: Panel) -> None:
    index = {name: i for i, name in enumerate(panel.categories)}
    count = max(1, len(panel.series))
    # Series that share no category (bars coloured by method) sit in the middle of their slot.
    overlapping = len({p.x for s in panel.series for p in s.points}) < sum(len(s.points) for s in panel.series)
    width = 0.8 / count if overlapping else 0.6
    for i, s in enumerate(panel.series):
        offset = (i - (count - 1) / 2) * width if overlapping else 0.0
        xs = [index[p.x] + offset for p in s.points]
        errs = [p.err or 0.0 for p in s.points]
        bars = ax.bar(xs, [p.y for p in s.points], width=width, color=s.color, label=s.name,
                      yerr=errs if any(errs) else None, capsize=3, alpha=0.9)
        ax.bar_label(bars, labels=[f"{p.y:,.0f}" if p.y >= 100 else f"{p.y:,.3g}" for p in s.points],
                     fontsize=7, padding=2)
    top = max((p.y + (p.err or 0.0) for s in panel.series for p in s.points), default=1.0)
    ax.set_ylim(0, top * 1.2)  # headroom for the value labels and the legend
    ax.set_xticks(range(len(panel.categories)))
    ax.set_xticklabels(panel.categories, rotation=30 if len(panel.categories) > 3 else 0, ha="right"
                       if len(panel.categories) > 3 else "center", fontsize=8)
