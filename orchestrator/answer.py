""""Which method for my budget?": the part of a sweep report that answers it, from MLflow alone.

- The Pareto table: the trials (seed cells) that no other trial beats on quality (eval loss, or
  exact-match accuracy) at no more cost, for each cost a user pays: total training FLOPs
  (`perf/train_flops`), measured peak memory (`mem/peak_bytes`) and adapter bytes
  (`model/adapter_bytes`: what is stored and shipped per task). A cost no trial logged (runs
  from before `perf/train_flops` existed) is left out, not guessed.
- The figure `pareto_budget`: the same frontiers drawn (orchestrator/plots.py: budget_figure).
- Best under each memory limit: for 4 / 8 / 16 / 24 / 80 GiB (and the sweep's own
  sweep.memory_limit), the best finished trial whose *estimated* memory fits it: the logged
  `mem/estimated_peak_bytes` plus the runtime overhead (orchestrator/memcap.py), the quantity the
  plan checks, so the table also answers for GPUs the sweep did not run on.

Trials ASHA stopped early never ran their budget: they are not candidates here (as in promote).
Stages of a pipeline are answered apart: their losses are not the same quantity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator import memcap, plots
from orchestrator.cells import Cell, ran_budget
from trainers.memory.sizes import format_size

GIB = 2**30
MEMORY_LIMITS = tuple(n * GIB for n in (4, 8, 16, 24, 80))
COSTS = plots.BUDGET_COSTS
SHORT = {"eval/loss": "loss", "eval/accuracy": "accuracy", "perf/train_flops": "FLOPs",
         "mem/peak_bytes": "memory", "model/adapter_bytes": "adapter"}


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> list[str]:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(text.replace("|", "\\|") for text in row) + " |" for row in self.rows]
        return lines + [""] + [f"{note}" for note in self.notes] + ([""] if self.notes else [])


def _metric_text(cell: Cell, metric: str) -> str:
    stat = cell.metric(metric)
    if stat is None:
        return "-"
    if metric.startswith(("mem/", "model/adapter")):
        return format_size(stat.mean)
    return f"{stat.mean:.3g}" if metric == "perf/train_flops" else f"{stat.mean:.4f}"


def frontier_of(cells: list[Cell], quality: str, cost: str) -> set[int]:
    """Indexes of the cells on the Pareto frontier of `quality` against `cost` (needs two cells
    that differ on the cost: one point is no trade-off)."""
    usable = [(i, c) for i, c in enumerate(cells) if c.metric(quality) is not None and c.metric(cost) is not None]
    if len({c.metric(cost).mean for _, c in usable}) < 2:
        return set()
    points = [plots.Point(c.metric(cost).mean, c.metric(quality).mean, label=str(i)) for i, c in usable]
    return {int(p.label) for p in plots.pareto_frontier(points, maximize=quality == "eval/accuracy")}


def pareto_table(cells: list[Cell]) -> Table | None:
    """The cells on some quality x cost frontier, with every cost and quality; None when no cost
    varies."""
    cells = ran_budget(cells)
    qualities = [q for q, _, _ in plots.QUALITIES if any(c.metric(q) is not None for c in cells)]
    costs = [metric for metric, *_ in COSTS if any(c.metric(metric) is not None for c in cells)]
    on = {i: [] for i in range(len(cells))}
    for quality in qualities:
        for cost in costs:
            for i in frontier_of(cells, quality, cost):
                on[i].append(f"{SHORT[quality]}/{SHORT[cost]}")
    kept = [i for i in on if on[i]]
    if not kept:
        return None
    headers = ["trial", "method"] + [name for metric, name, *_ in COSTS if metric in costs] + \
        [name for metric, name, _ in plots.QUALITIES if metric in qualities] + ["Pareto-optimal on (quality/cost)"]
    rows = [[cells[i].label, cells[i].method] + [_metric_text(cells[i], m) for m in costs + qualities]
            + [", ".join(on[i])] for i in kept]
    notes = ["A trial is Pareto-optimal on quality/cost when no other finished trial has at most its cost and a "
             "better quality; the other trials are dominated on every pair shown "
             f"({len(cells) - len(kept)} of {len(cells)})."]
    missing = [name for metric, name, *_ in COSTS if metric not in costs]
    if missing:
        notes.append(f"Not logged by these runs, left out: {', '.join(missing)}.")
    return Table("Pareto table: quality against cost", headers, rows, notes)


def headline(cells: list[Cell]) -> tuple[str, str]:
    """What 'best' means: the stage's headline metric (RecipeSpec.headline) when logged, else eval loss."""
    from trainers.recipes import RECIPES

    recipe = RECIPES.get(cells[0].stage) if cells else None
    metric, mode = recipe.headline if recipe is not None else ("eval/loss", "min")
    if not any(c.metric(metric) is not None for c in cells):
        return "eval/loss", "min"
    return metric, mode


def cell_estimate(cell: Cell) -> float | None:
    """The largest estimated total (peak + runtime overhead) of the cell's finished trials."""
    values = [memcap.device_estimate(r) for r in cell.finished]
    return None if not values or None in values else max(values)


def _trainable(cell: Cell) -> float:
    stat = cell.metric("model/trainable_params")
    return stat.mean if stat is not None else float("inf")


def best_under_memory(cells: list[Cell], sweep_limit: int | None) -> Table | None:
    """Per memory limit, the best cell by the headline metric whose estimate fits (a tie goes to
    fewer trainable parameters, as in promote); None when no trial logged an estimate."""
    cells = [c for c in ran_budget(cells) if cell_estimate(c) is not None]
    metric, mode = headline(cells)
    cells = [c for c in cells if c.metric(metric) is not None]
    if not cells:
        return None
    sign = -1.0 if mode == "max" else 1.0
    limits = sorted(set(MEMORY_LIMITS) | ({sweep_limit} if sweep_limit else set()))
    headers = ["memory limit", "best trial", "method", "estimated memory", "measured peak",
               *[name for m, name, _ in plots.QUALITIES], "training FLOPs", "fit / trials"]
    rows = []
    for limit in limits:
        name = format_size(limit) + (" (sweep.memory_limit)" if limit == sweep_limit else "")
        fitting = [c for c in cells if cell_estimate(c) <= limit]
        if not fitting:
            rows.append([name, "none fits", "", "", "", "", "", "", f"0 / {len(cells)}"])
            continue
        best = min(fitting, key=lambda c: (sign * c.metric(metric).mean, _trainable(c)))
        rows.append([name, best.label, best.method, format_size(cell_estimate(best)),
                     _metric_text(best, "mem/peak_bytes"), *[_metric_text(best, m) for m, _, _ in plots.QUALITIES],
                     _metric_text(best, "perf/train_flops"), f"{len(fitting)} / {len(cells)}"])
    notes = [f"Best by {metric} ({mode}). Estimated memory: the estimator's prediction, not a measurement: the "
             "logged mem/estimated_peak_bytes plus the runtime overhead (CUDA context, or the Python/torch process), "
             "as sweep.memory_limit and `python -m trainers.memory fit` count it; trials that logged no estimate "
             "are not candidates."]
    return Table("Best under each memory limit (estimated)", headers, rows, notes)


def tables(cells: list[Cell]) -> list[Table]:
    """The budget tables of every stage of the report (titled by stage when there are several)."""
    stages = list(dict.fromkeys(c.stage for c in cells))
    limit = memcap.sweep_limit([r for c in cells for r in c.runs])
    out = []
    for stage in stages:
        group = [c for c in cells if c.stage == stage]
        for table in (pareto_table(group), best_under_memory(group, limit)):
            if table is not None:
                if len(stages) > 1:
                    table.title += f" ({stage} stage)"
                out.append(table)
    return out
