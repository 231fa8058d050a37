"""Equal compute for every grid point of a sweep: `sweep.budget_unit=steps|tokens|flops`.

With `steps` (the default) `sweep.budget` counts optimizer steps and fixes each searched grid
point's number of trials (orchestrator/plan.py). With `tokens` or `flops` it is an amount of that
unit per grid point (a variant x axes x seed; searched or not), and each grid point's step count
follows from what one of its steps costs:

    per-trial budget = sweep.budget / trials      (trials: sweep.num_samples if searched, else 1)
    train.max_steps  = floor(per-trial budget / per-step cost)     refused if < 1 (sweep.budget)

so a full fine-tuning step, which costs more FLOPs than a LoRA step, gets fewer steps, and prompt
tuning's longer rows cost more FLOPs (not more tokens). The per-step cost is, in this order:

- measured on the data: on a local Ray (no cluster.address) with unpacked rows, the trial's data is
  prepared here (trainers.trial.prepare_inputs: the driver's data pass, which then finds it
  built; once per distinct data input of a plan, shared_inputs) and the cost is the mean of the
  first MEASURED_BATCHES micro-batches of the trial's own seeded stream (at most one epoch), as
  its stage runs them (trainers.flops.StepCounter);
- else planned (trainers.flops.planned_step): every micro-batch full, train.batch_size rows of
  data.max_seq_len tokens (a padding-free batch: its token budget), an upper bound, so trials
  spend at most the budget;

either way x train.grad_accum x train.num_workers. perf/train_flops and perf/train_tokens log what
trials spent. A method choice (orchestrator/method_search.py) is one grid point whose trials are
its methods' default-setting trials and its draws: each method's steps follow from its own step
cost, and a drawn trial's from its drawn config's (method_search.config_of: a drawn rank or batch
changes what a step costs), so every trial of the choice spends the same sweep.budget / trials.

ASHA's time axis is the same unit: the worker's cumulative perf/train_tokens or perf/train_flops
(logged beside every periodic eval/loss), and its grace period is sweep.grace_steps steps of the
cheapest default-setting trial of a searched grid point (of a choice: its cheapest method): every
trial gets at least grace_steps steps before it can be stopped, and a choice's one bracket compares
its methods' draws at equal compute.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from trainers.config import ConfigError

if TYPE_CHECKING:
    from orchestrator.trials import Plan
    from trainers.config import ExperimentConfig
    from trainers.flops import Cost

BUDGET_UNITS = ("steps", "tokens", "flops")
MEASURED_BATCHES = 256
# What a stage's train product (trainers/prepared PRODUCTS_OF_KIND) holds, as its loop's items.
PRODUCT_ITEMS = {"examples": "examples", "examples+prompts": "examples", "pairs": "pairs", "prompts": "prompts"}
# data_key -> trial_data's answer, while shared_inputs() is entered (one plan).
_SHARED: ContextVar[dict | None] = ContextVar("shared_inputs", default=None)


@dataclass(frozen=True)
class StepCost:
    """What one optimizer step of a trial costs, and where that figure comes from."""

    cost: "Cost"
    source: str  # "data" (measured on its prepared data) | "max_seq_len" (planned: full batches)
# The Ray progress key each unit's ASHA rungs are measured in (trainers/training.py logs the last two).
TIME_ATTR = {"steps": "progress/step", "tokens": "perf/train_tokens", "flops": "perf/train_flops"}


def check_unit(sweep) -> list[tuple[str, str]]:
    """Problems with sweep.budget_unit and sweep.budget (orchestrator.config.SweepConfig)."""
    if sweep.budget_unit not in BUDGET_UNITS:
        return [("sweep.budget_unit", f"must be one of {', '.join(BUDGET_UNITS)}, got {sweep.budget_unit!r}")]
    if sweep.budget_unit != "steps" and sweep.budget is None:
        return [("sweep.budget", f"sweep.budget_unit={sweep.budget_unit} needs sweep.budget: the {sweep.budget_unit} "
                                 "each grid point may spend")]
    if sweep.budget is not None and sweep.budget < 1:
        return [("sweep.budget", f"must be >= 1 {sweep.budget_unit} or null, got {sweep.budget:g}")]
    return []


def in_unit(cost: "Cost", unit: str) -> float:
    return cost.flops if unit == "flops" else cost.tokens


@contextmanager
def shared_inputs() -> Iterator[None]:
    """Within it, trial_data prepares each distinct data input once: a plan's grid points (a
    choice's methods) differ in method and settings, seldom in data, and the tokenizer load and
    data pass would otherwise be paid per point. Entered around one plan (the files it reads do
    not change while it is made); nested, the outer one's inputs are shared."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def data_key(cfg: "ExperimentConfig") -> tuple:
    """What trainers.trial.prepare_inputs reads of a config: the model (its tokenizer, the weights
    check), data.* (data.template among them, unresolved), the stage (its data kind and formats)
    and where prepared data lives."""
    return repr(cfg.model), repr(cfg.data), cfg.stage.name, cfg.storage.path


def trial_data(cfg: "ExperimentConfig") -> "tuple[str, Sequence] | None":
    """(data.template as trial `cfg` resolves it, the items of its stage's train product), or None
    where the data is not readable (the driver's data pass reports what is wrong); inside
    shared_inputs() prepared once per data_key."""
    cache = _SHARED.get()
    if cache is None:
        return _prepared(cfg)
    key = data_key(cfg)
    if key not in cache:
        cache[key] = _prepared(cfg)
    return cache[key]


def _prepared(cfg: "ExperimentConfig") -> "tuple[str, Sequence] | None":
    from trainers.data import DataError
    from trainers.prepared import PRODUCTS_OF_KIND, prepared_root
    from trainers.recipes import RECIPES
    from trainers.trial import prepare_inputs

    trial = copy.deepcopy(cfg)  # prepare_inputs resolves data.template in the config it gets
    try:
        data = prepare_inputs(trial, prepared_root(cfg.storage.path))
    except (DataError, ConfigError, OSError, ValueError):
        return None
    product = PRODUCTS_OF_KIND[RECIPES[cfg.stage.name].data_kind]["train"][0]
    return trial.data.template, getattr(data.train, PRODUCT_ITEMS[product])()


def measured_cost(cfg: "ExperimentConfig") -> "Cost | None":
    """The mean cost of the first micro-batches of the trial's data stream, times the micro-batches
    of a step; None where that is not cheap here (a cluster's data, packed rows, unreadable data)."""
    from trainers.flops import Cost, StepCounter
    from trainers.runtime import DistInfo
    from trainers.training import micro_batches

    if cfg.cluster.address is not None or cfg.data.packing:
        return None
    data = trial_data(cfg)
    if data is None:
        return None
    trial = copy.deepcopy(cfg)  # as prepare_inputs leaves a trial's config: data.template resolved
    trial.data.template, items = data
    train = cfg.train
    n = max(1, min(MEASURED_BATCHES, len(items) // train.batch_size))
    stream = micro_batches(items, train.batch_size, train.seed, DistInfo(), cfg.data.group_by_length)
    counter = StepCounter(trial)
    total = sum((counter(next(stream)) for _ in range(n)), Cost())
    micro = train.grad_accum * train.num_workers / n
    return Cost(total.flops * micro, round(total.tokens * micro))


def step_cost(cfg: "ExperimentConfig", where: str) -> StepCost:
    """What one optimizer step of `cfg` costs, or ConfigError naming sweep.budget_unit."""
    from trainers.flops import planned_step

    try:
        measured = measured_cost(cfg)
        return StepCost(measured, "data") if measured else StepCost(planned_step(cfg), "max_seq_len")
    except (ValueError, OSError) as err:
        raise ConfigError([("sweep.budget_unit", f"{cfg.sweep.budget_unit} needs the cost of a step of trial "
                                                 f"'{where}', which the FLOPs model cannot tell: {err}")]) from None


def steps_within(cfg: "ExperimentConfig", searched: bool, where: str) -> tuple[int, StepCost]:
    """(train.max_steps, cost of one step) of a grid point under sweep.budget in its unit."""
    sweep = cfg.sweep
    cost = step_cost(cfg, where)
    trials = sweep.num_samples if searched else 1
    per_trial, per_step = sweep.budget / trials, in_unit(cost.cost, sweep.budget_unit)
    steps = math.floor(per_trial / per_step) if per_step > 0 else 0
    if steps < 1:
        raise ConfigError([("sweep.budget", f"{sweep.budget:.4g} {sweep.budget_unit} over {trials} trial(s) "
                                            f"= {per_trial:.4g} a trial do not cover one step of '{where}' "
                                            f"({per_step:.4g} {sweep.budget_unit} a step)")])
    return steps, cost


def asha_settings(plan: "Plan") -> dict:
    """PerGroupASHA's time axis: its Ray progress key, grace period and horizon (None: one past
    each trial's train.max_steps) in sweep.budget_unit."""
    sweep = plan.base.sweep
    if sweep.budget_unit == "steps":
        return {"time_attr": TIME_ATTR["steps"], "grace": sweep.grace_steps, "horizon": None,
                "reduction_factor": sweep.reduction_factor}
    per_step = min(in_unit(t.step_cost.cost, sweep.budget_unit) for g in plan.groups for t in g.defaults)
    return {"time_attr": TIME_ATTR[sweep.budget_unit], "grace": sweep.grace_steps * per_step,
            "horizon": sweep.budget / sweep.num_samples, "reduction_factor": sweep.reduction_factor}


def check_searched(plan: "Plan") -> None:
    """Under tokens or FLOPs the budget sets every trial's steps: a searched train.max_steps would
    be replaced in every draw."""
    sweep = plan.base.sweep
    if sweep.budget_unit != "steps" and any("train.max_steps" in g.space for g in plan.groups):
        raise ConfigError([("sweep.budget_unit", f"sweep.budget_unit={sweep.budget_unit} sets each trial's "
                                                 "train.max_steps from sweep.budget: do not search it (sweep.search "
                                                 "or sweep.method_spaces)")])


def check_grace(plan: "Plan") -> None:
    """The first ASHA rung must come before a trial's budget is spent."""
    sweep = plan.base.sweep
    if sweep.scheduler != "asha" or sweep.budget_unit == "steps" or not plan.groups:
        return
    settings = asha_settings(plan)
    if settings["grace"] >= settings["horizon"]:
        raise ConfigError([("sweep.grace_steps", f"{sweep.grace_steps} steps of the cheapest grid point = "
                                                 f"{settings['grace']:.4g} {sweep.budget_unit}, not less than a "
                                                 f"trial's budget {settings['horizon']:.4g}: no ASHA rung")])


def format_budget(plan: "Plan") -> list[str]:
    """Per trial of the plan: steps, FLOPs and tokens a step, and what it spends."""
    sweep = plan.base.sweep
    if sweep.budget_unit == "steps":
        return []
    lines = [f"  budget: {sweep.budget:.4g} {sweep.budget_unit} per grid point; train.max_steps = budget / trials "
             "/ cost of a step, measured on the trial's data (data) or planned from full batches of "
             "data.max_seq_len (max_seq_len, an upper bound)"]
    width = max(len(t.label) for t in plan.trials)
    for t in plan.trials:
        if t.step_cost is None:
            continue
        steps, cost = t.cfg.train.max_steps, t.step_cost.cost
        lines.append(f"    {t.label:<{width}}  {steps:>6} steps x {cost.flops:.3e} FLOPs ({cost.tokens:,} tokens) "
                     f"a step = {steps * in_unit(cost, sweep.budget_unit):.4g} {sweep.budget_unit} a trial "
                     f"(cost from {t.step_cost.source})")
    if sweep.scheduler == "asha" and plan.groups:
        settings = asha_settings(plan)
        lines.append(f"    ASHA rungs in {sweep.budget_unit} ({settings['time_attr']}): grace {settings['grace']:.4g} "
                     f"= sweep.grace_steps={sweep.grace_steps} steps of the cheapest searched trial, horizon "
                     f"{settings['horizon']:.4g} a trial")
    return lines


def format_group(group, sweep) -> str:
    """A searched grid point's budget line: its trials and what each may spend; in tokens or FLOPs
    also the steps of its default-setting trial (of each method of a choice)."""
    if sweep.budget_unit == "steps":
        return (f"{group.num_samples} trials x {group.default.cfg.train.max_steps} steps = {group.budget_steps} steps "
                f"(<= {group.budget_tokens:,} batch tokens)")
    steps = ", ".join(f"{name} {b.default.cfg.train.max_steps}" for name, b in group.branches.items()) or \
        str(group.default.cfg.train.max_steps)
    drawn = "; a draw: as many as its own step cost buys" if group.branches else ""
    return (f"{group.num_samples} trials x {sweep.budget / group.num_samples:.4g} {sweep.budget_unit} = "
            f"{sweep.budget:.4g} {sweep.budget_unit} (steps at the defaults: {steps}{drawn})")
