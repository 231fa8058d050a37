"""Plan a sweep: expand its variants x axes x seeds into trials, each a fully resolved config.

Every trial is composed by Hydra from the same overrides a user could type, so a group swap
(`method=full`) and a value (`method.r=4`) are both just overrides, and each trial is checked
like a single run. A trial's key is a hash of its resolved config (what trainers/identity.py
counts as the experiment): the same experiment always has the same key, which is how reruns find
finished work.

A trial whose method the model's architecture cannot take (trainers.config.InapplicableError:
BitFit on a model without biases) is left out of a comparison with its reason
(`sweep.on_inapplicable=skip`, the default) and the rest is planned; a sweep left with no trial,
`sweep.on_inapplicable=error` or a pipeline refuses it. A trial estimated over
`sweep.memory_limit` is left out the same way (orchestrator/memcap.py). A command-line value
that a sweep's own overrides replace in some trial is named in the plan's notes.

A pipeline (`sweep.stages`, orchestrator/dag.py) expands stage by stage: a downstream trial's
`stage.init_from` / `stage.reward_from` is its upstream trial's output directory,
storage.path/<experiment>/<upstream key>, and its key hashes the upstream keys in place of those
paths, so it changes whenever an upstream trial does (and not with where storage lives).
"""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter
from typing import Any

from omegaconf import OmegaConf

from orchestrator import budget, dag, memcap
from orchestrator.compose import compose
from orchestrator.memcap import estimate_bytes
from orchestrator.trials import (GROUPS, ON_INAPPLICABLE, Plan, SearchGroup, SkippedTrial, Trial, budgeted_trial,
                                 literal, override, trial_key, trial_label)
from trainers.config import ConfigError, ExperimentConfig, InapplicableError, to_container
from trainers.identity import digest

def expand(sweep_block: dict) -> list[list[tuple[str, Any]]]:
    """Override pairs of every trial: each variant crossed with the product of the axes and seeds."""
    axes = sweep_block.get("axes") or {}
    variants = sweep_block.get("variants") or [{}]
    seeds = sweep_block.get("seeds") or [0]
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError([(f"sweep.axes.{key}", "must be a non-empty list of values")])
    axis_items = [[(key, v) for v in values] for key, values in axes.items()]
    trials = []
    for variant in variants:
        if not isinstance(variant, dict):
            raise ConfigError([("sweep.variants", f"each variant must be a mapping of overrides, got {variant!r}")])
        # Group choices first: `method=full` must be applied before `method.*` values. A variant's
        # `search` space stays a pair of its own, which make_plan takes out.
        ordered = sorted(variant.items(), key=lambda kv: (kv[0] == "search", kv[0] not in GROUPS))
        for combo in itertools.product(*axis_items):
            for seed in seeds:
                trials.append(ordered + list(combo) + [("train.seed", seed)])
    return trials


def make_plan(overrides: list[str]) -> Plan:
    """Compose and check the base config and every trial; raise ConfigError on the first bad one."""
    from orchestrator import search

    base = compose(overrides)
    sweep_block = OmegaConf.to_container(OmegaConf.structured(base.sweep), resolve=True)
    problems = search.check_sweep(base.sweep) + check_sweep_block(base.sweep)
    if problems:
        raise ConfigError(problems)
    sweep_space = search.parse_space(sweep_block.get("search"), "sweep.search")
    experiment = base.tracking.experiment or base.sweep.name
    if sweep_block.get("stages"):
        if sweep_space or base.sweep.scheduler or sweep_block.get("method_spaces"):
            raise ConfigError([("sweep.search" if sweep_space or not base.sweep.scheduler else "sweep.scheduler",
                                "search and early stopping apply to a flat sweep, not to sweep.stages")])
        if base.sweep.budget_unit != "steps":
            raise ConfigError([("sweep.budget_unit", "a tokens or flops budget applies to a flat sweep, "
                                                     "not to sweep.stages")])
        trials = plan_pipeline(overrides, base, sweep_block)
        plan = Plan(sweep=base.sweep.name, experiment=experiment, trials=trials, base=base)
    else:
        plan = Plan(sweep=base.sweep.name, experiment=experiment, trials=[], base=base)
        with budget.shared_inputs():  # the step costs prepare each distinct data input once
            plan_grid(overrides, plan, sweep_block, sweep_space)
    plan.notes += replaced_overrides(overrides, plan) + cluster_notes(base)
    budget.check_searched(plan)
    budget.check_grace(plan)
    return finish_plan(plan)


def check_sweep_block(sweep) -> list[tuple[str, str]]:
    """Problems with the sweep's seeds and its sweep.on_inapplicable policy."""
    problems = []
    if not sweep.seeds:
        problems.append(("sweep.seeds", "must list at least one seed (default: [train.seed])"))
    if sweep.on_inapplicable not in ON_INAPPLICABLE:
        problems.append(("sweep.on_inapplicable", f"must be one of {', '.join(ON_INAPPLICABLE)}, "
                                                  f"got {sweep.on_inapplicable!r}"))
    return problems


def plan_grid(overrides: list[str], plan: Plan, sweep_block: dict, sweep_space: dict) -> None:
    """Trials (and searched grid points) of a flat sweep into `plan`; inapplicable ones into
    plan.skipped when the sweep skips them and others remain."""
    from orchestrator import method_search, search

    base = plan.base
    multi_seed = len(sweep_block.get("seeds") or [0]) > 1
    method_spaces = method_search.parse_method_spaces(sweep_block.get("method_spaces"))
    seen: dict[str, str] = {}
    for pairs in expand(sweep_block):
        variant_space = search.parse_space(dict(pairs).get("search"), "sweep.variants.search")
        pairs = [(k, v) for k, v in pairs if k != "search"]
        if method_search.METHOD in {**sweep_space, **variant_space}:
            method_search.plan_choice(plan, overrides, pairs, {**sweep_space, **variant_space}, method_spaces, seen)
            continue
        trial_overrides = [override(k, v) for k, v in pairs]
        where = " ".join(trial_overrides)
        try:
            cfg = compose(list(overrides) + trial_overrides)
        except InapplicableError as err:
            if base.sweep.on_inapplicable == "skip":
                plan.skipped.append(SkippedTrial(trial_label(pairs, err.config, multi_seed), trial_overrides,
                                                 err.problems, err.config))
                continue
            raise ConfigError([(key, f"{msg} (in sweep trial: {where}; sweep.on_inapplicable=skip leaves "
                                     "it out)") for key, msg in err.problems]) from None
        except ConfigError as err:
            raise ConfigError([(key, f"{msg} (in sweep trial: {where})") for key, msg in err.problems]) from None
        space = {**sweep_space, **variant_space}
        trial = budgeted_trial(overrides, trial_overrides, cfg, trial_label(pairs, cfg, multi_seed), bool(space), seen)
        trial.resources = worker_resources(trial.cfg)
        plan.trials.append(trial)
        if space:
            plan.groups.append(search_group(trial, list(overrides) + trial.overrides, space, base.sweep))
    if plan.skipped and not plan.trials:  # nothing left to compare: refuse, as for a single run
        raise ConfigError([(key, f"{msg} (in sweep trial: {' '.join(t.overrides)})")
                           for t in plan.skipped for key, msg in t.problems])
    method_search.check_unused(method_spaces, plan.groups)
    check_budgets(plan.groups, base)


def replaced_overrides(overrides: list[str], plan: Plan) -> list[str]:
    """A note for each command-line KEY=VALUE that the sweep replaces in some trial: its axes,
    variants, seeds or stage overrides come after the command line's, and a search draws its keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    set_by_sweep: dict[str, list] = {}
    for trial in plan.trials:
        for item in parser.parse_overrides(trial.overrides):
            set_by_sweep.setdefault(item.key_or_group, []).append(item.value())
    notes = []
    for text, item in zip(overrides, parser.parse_overrides(list(overrides))):
        key = item.key_or_group
        if item.is_delete() or key == "sweep" or key.startswith("sweep."):
            continue
        typed = text.lstrip("+")
        others = [value for value in set_by_sweep.get(key, []) if value != item.value()]
        if others:
            shown = ", ".join(dict.fromkeys(v if isinstance(v, str) else literal(v) for v in others))
            notes.append(f"command-line {typed} is replaced in {len(others)} of {len(plan.trials)} trial(s): the sweep "
                         f"sets {key} to {shown} there" + (" (sweep.seeds)" if key == "train.seed" else ""))
        searched = [g for g in plan.groups if key in g.space]
        if searched:
            notes.append(f"command-line {typed} is replaced in the drawn trials of {len(searched)} searched grid "
                         f"point(s): the search draws {key}")
    return notes


def search_group(default: Trial, overrides: list[str], space: dict, sweep) -> SearchGroup:
    """The searched grid point of `default`, its space checked against the trial's own config."""
    from orchestrator import search
    from orchestrator.compose import compose_raw

    search.check_keys(space, to_container(default.cfg), "sweep.search")
    raw = OmegaConf.to_container(compose_raw(overrides), resolve=False)
    search.check_bounds(space, raw, "sweep.search")
    problems = search.check_search(sweep, default.cfg, default.label)
    if problems:
        raise ConfigError(problems)
    num_samples = sweep.num_samples
    if sweep.budget is not None and sweep.budget_unit == "steps":
        num_samples = int(sweep.budget // default.cfg.train.max_steps)
        if num_samples < 1:
            raise ConfigError([("sweep.budget", f"{sweep.budget:g} steps do not cover one trial of "
                                                f"train.max_steps={default.cfg.train.max_steps} ({default.label})")])
    parts = [default.key, sorted((k, d.kind, list(d.args)) for k, d in space.items()), sweep.search_alg,
             sweep.search_seed, num_samples, sweep.scheduler, sweep.grace_steps, sweep.reduction_factor]
    key = digest(parts, 12)
    default.group = key
    return SearchGroup(key=key, label=default.label, default=default, raw=raw, space=space, num_samples=num_samples)


def check_budgets(groups: list[SearchGroup], base: ExperimentConfig) -> None:
    """A tuned comparison gives every searched grid point the same steps and batch tokens."""
    if base.sweep.scheduler and not groups:
        raise ConfigError([("sweep.scheduler", "early stopping applies to searched trials: set sweep.search")])
    if base.sweep.budget_unit != "steps":  # equal in its unit by construction (orchestrator/budget.py)
        return
    budgets = {(g.budget_steps, g.budget_tokens) for g in groups}
    if len(budgets) > 1:
        each = "; ".join(f"{g.label}: {g.budget_steps} steps, {g.budget_tokens:,} tokens" for g in groups)
        raise ConfigError([("sweep.budget", f"searched grid points must get equal budgets, got {each} (give them the "
                                            "same train.max_steps, batch and data.max_seq_len)")])


def cluster_notes(base: ExperimentConfig) -> list[str]:
    """What an attached cluster needs that a local Ray does not: stores every node can reach."""
    from trainers import storage

    if not base.cluster.address:
        return []
    notes = []
    if base.tracking.uri.startswith("sqlite:"):
        notes.append(f"tracking.uri={base.tracking.uri} is a file: every Ray node must see it at the same path; "
                     "on several machines use an MLflow server (tracking.uri=http://HOST:5000)")
    if not storage.is_remote(base.storage.path):
        notes.append(f"storage.path={base.storage.path} is a local path: every Ray node must see it at "
                     f"{storage.normalize(base.storage.path)} (a shared filesystem), or use s3://bucket/prefix")
    return notes


def plan_pipeline(overrides: list[str], base: ExperimentConfig, sweep_block: dict) -> list[Trial]:
    """Trials of a `sweep.stages` pipeline, upstream before downstream, each wired to its inputs."""
    from trainers import storage
    from trainers.recipes import RECIPES
    from trainers.methods import METHODS

    for name in ("axes", "variants"):
        if sweep_block.get(name):
            raise ConfigError([(f"sweep.{name}", "a pipeline (sweep.stages) sets axes and variants per stage")])
    stages = dag.parse_stages(sweep_block["stages"])
    specs = {spec.name: spec for spec in stages}
    nodes = dag.expand_pipeline(stages, sweep_block.get("seeds") or [0], expand, GROUPS)
    # Where the runner puts each trial's outputs (orchestrator/runner.py: run_sweep).
    outputs = storage.join(storage.normalize(base.storage.path), base.tracking.experiment or base.sweep.name)
    trials: list[Trial] = []
    for node in nodes:
        spec = specs[node.stage]
        if any(k == "search" for k, _ in node.own):
            raise ConfigError([(f"sweep.stages.{node.stage}.variants", "search applies to a flat sweep, not to a stage")])
        recipe_name = spec.overrides.get("stage", node.stage)
        if recipe_name not in RECIPES:
            raise ConfigError([(f"sweep.stages.{node.stage}.overrides.stage",
                                f"{recipe_name!r} is not a stage recipe; known: {', '.join(sorted(RECIPES))}")])
        upstream = {name: trials[index] for name, index in node.upstream.items()}
        fields = dag.assign_inputs(node.stage, recipe_name, RECIPES[recipe_name].inputs,
                                   {name: RECIPES[t.cfg.stage.name].produces for name, t in upstream.items()})
        for name, trial in upstream.items():
            if not METHODS[trial.cfg.method.name].mergeable:
                raise ConfigError([(f"sweep.stages.{name}", f"method {trial.cfg.method.name} cannot be merged into "
                                                            f"the model, so stage {node.stage} cannot start from it")])
        # Group choices first: `method=full` must be applied before `method.*` values.
        pairs = sorted([("stage", recipe_name)] + [kv for kv in spec.overrides.items() if kv[0] != "stage"]
                       + node.own + [("train.seed", node.seed)], key=lambda kv: kv[0] not in GROUPS)
        pairs += [(f"stage.{field_name}", storage.join(outputs, upstream[name].key))
                  for field_name, name in fields.items()]
        trial_overrides = [override(k, v) for k, v in pairs]
        try:
            cfg = compose(list(overrides) + trial_overrides)
        except ConfigError as err:
            raise ConfigError([(key, f"{msg} (in pipeline stage {node.stage}: {node.label})")
                               for key, msg in err.problems]) from None
        key = trial_key(cfg, {field_name: upstream[name].key for field_name, name in fields.items()})
        if any(t.key == key for t in trials):
            raise ConfigError([("sweep.stages", f"trial '{node.label}' resolves to the same config as another")])
        trials.append(Trial(key=key, label=node.label, overrides=trial_overrides, cfg=cfg,
                            resources=worker_resources(cfg), after=[t.key for t in upstream.values()],
                            stage=node.stage))
    return trials


GiB = 2**30


def worker_resources(cfg: ExperimentConfig, estimated: int | None = None) -> dict[str, float]:
    """Ray resources of one worker: CPUs; on GPU nodes the GPU fraction the estimate needs (so
    small trials share a GPU); on CPU nodes the estimate as Ray `memory` (so trials that fit share
    a node and the rest wait)."""
    resources = {"CPU": float(cfg.train.cpus_per_worker or 1)}
    if cfg.train.use_gpu:
        gpu_bytes = cfg.cluster.gpu_memory_gb * GiB
        share = 1.0
        if estimated is not None and cfg.train.num_workers == 1:
            share = min(1.0, math.ceil(20 * estimated / gpu_bytes) / 20)  # in steps of 1/20 GPU
        resources["GPU"] = share
    elif estimated is not None:
        resources["memory"] = float(estimated)
    return resources


def node_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fit(trials: list[Trial], largest_node_bytes: int, where: str) -> None:
    """Refuse, with the numbers, any trial whose estimate fits no node (or no GPU)."""
    problems = []
    for t in trials:
        if t.estimated_bytes is None:
            continue
        if t.cfg.train.use_gpu and t.estimated_bytes > t.cfg.cluster.gpu_memory_gb * GiB:
            problems.append(("cluster.gpu_memory_gb", f"trial '{t.label}' needs an estimated "
                             f"{t.estimated_bytes / GiB:.1f} GiB per worker, more than one "
                             f"{t.cfg.cluster.gpu_memory_gb:g} GiB GPU"))
        elif not t.cfg.train.use_gpu and t.estimated_bytes > largest_node_bytes:
            problems.append(("train", f"trial '{t.label}' needs an estimated {t.estimated_bytes / GiB:.1f} GiB per "
                             f"worker; the largest {where} has {largest_node_bytes / GiB:.1f} GiB"))
    if problems:
        raise ConfigError(problems)


def concurrency(plan: Plan) -> int | None:
    """Trials at once: the user's cap, and for a local Ray what its CPUs and memory hold."""
    cap = plan.base.cluster.max_concurrent_trials
    if plan.base.cluster.address is None and plan.trials:
        cpus = plan.base.cluster.num_cpus or os.cpu_count() or 1
        per_trial = max(t.resources["CPU"] * t.cfg.train.num_workers for t in plan.trials)
        fits = max(1, int(cpus // per_trial))
        per_trial_mem = max((t.estimated_bytes or 0) * t.cfg.train.num_workers for t in plan.trials)
        if per_trial_mem:
            fits = max(1, min(fits, int(node_memory_bytes() // per_trial_mem)))
        cap = min(cap, fits) if cap else fits
    return cap


def resolve_cpus(plan: Plan) -> None:
    """Each trial's train.cpus_per_worker (also its torch threads) where it is auto (null): a trial
    that runs alone on a local Ray gets the whole node, split over its workers; otherwise 1, which
    lets trials run side by side. Not part of a trial's identity (trainers/identity.py): threads
    change speed, not what is learned."""
    cluster = plan.base.cluster
    alone = len(plan.trials) == 1 or cluster.max_concurrent_trials == 1
    node_cpus = cluster.num_cpus or os.cpu_count() or 1
    for t in plan.trials:
        if t.cfg.train.cpus_per_worker is not None:
            continue
        if alone and cluster.address is None:
            t.cfg.train.cpus_per_worker = max(1, node_cpus // t.cfg.train.num_workers)
        else:
            t.cfg.train.cpus_per_worker = 1
    if cluster.address is not None and any(t.cfg.train.cpus_per_worker == 1 for t in plan.trials):
        plan.notes.append("train.cpus_per_worker unset: 1 CPU (and 1 torch thread) per worker on an attached "
                          "cluster, whose nodes this plan does not see; set it to use more")


def leave_out_over_limit(plan: Plan) -> None:
    """The trials estimated over sweep.memory_limit into plan.skipped (and those downstream of
    them), with their searched grid points (orchestrator/memcap.py)."""
    limit = memcap.limit_bytes(plan.base.sweep.memory_limit)
    if limit is None:
        return
    over = memcap.over_limit(plan.trials, limit)
    plan.skipped += [SkippedTrial(t.label, t.overrides, [(memcap.KEY, reason)], t.cfg, state=memcap.OVER_MEMORY_LIMIT)
                     for t, reason in over]
    left_out = {t.key for t, _ in over}
    plan.trials = [t for t in plan.trials if t.key not in left_out]
    plan.groups = [g for g in plan.groups if g.default.key not in left_out]
    plan.notes += memcap.notes(plan.trials, plan.groups, limit)


def finish_plan(plan: Plan) -> Plan:
    """Memory estimates, the memory cap, threads and resources of every trial, the fit check, and
    the concurrency."""
    for t in plan.trials:
        t.estimated_bytes = estimate_bytes(t.cfg)
    leave_out_over_limit(plan)
    resolve_cpus(plan)
    for t in plan.trials:
        t.resources = worker_resources(t.cfg, t.estimated_bytes)
    if plan.base.cluster.address is None:
        check_fit(plan.trials, node_memory_bytes(), "node (this machine)")
    plan.max_concurrent = concurrency(plan)
    return plan


def _amount(name: str, value: float) -> str:
    return f"{value / 2**20:,.0f}MiB" if name == "memory" else f"{value:g}"


# SkippedTrial.state -> how the plan counts and lists those trials
SKIPPED = {"INAPPLICABLE": ("inapplicable", "the method cannot work on this model (sweep.on_inapplicable=error "
                                            "refuses the sweep instead)"),
           "OVER_MEMORY_LIMIT": ("over sweep.memory_limit", "estimated over sweep.memory_limit (python -m "
                                 "trainers.memory fit MODEL --memory SIZE: the largest micro-batch that fits)")}


def format_plan(plan: Plan) -> str:
    counts = Counter(t.state for t in plan.skipped)
    skipped = "".join(f" (+{counts[state]} skipped as {short})" for state, (short, _) in SKIPPED.items()
                      if counts[state])
    lines = [f"sweep {plan.sweep}: {len(plan.trials)} trial(s){skipped}, experiment '{plan.experiment}', "
             f"at most {plan.max_concurrent or 'cluster-limited'} at once"]
    width = max((len(t.label) for t in plan.trials), default=5)
    lines.append(f"  {'trial':<{width}}  {'key':<12}  {'stage':<6}  {'workers':>7}  {'est. mem':>9}  "
                 "resources/worker (CPU = torch threads)")
    labels = {t.key: t.label for t in plan.trials}
    for t in plan.trials:
        res = ", ".join(f"{k}={_amount(k, v)}" for k, v in t.resources.items())
        mem = f"{t.estimated_bytes / 2**20:,.0f} MiB" if t.estimated_bytes else "?"
        after = f"  after: {', '.join(labels[k] for k in t.after)}" if t.after else ""
        lines.append(f"  {t.label:<{width}}  {t.key:<12}  {t.cfg.stage.name:<6}  {t.cfg.train.num_workers:>7}  "
                     f"{mem:>9}  {res}{after}")
    for state, (_, heading) in SKIPPED.items():
        left_out = [t for t in plan.skipped if t.state == state]
        if left_out:
            lines.append(f"  skipped before Ray, {heading}:")
            lines += [f"    {t.label}: {t.reason}" for t in left_out]
    lines += format_search(plan) + budget.format_budget(plan)
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def format_search(plan: Plan) -> list[str]:
    """What each searched grid point draws and its budget (the same for all: check_budgets)."""
    from orchestrator import method_search

    if not plan.groups:
        return []
    sweep = plan.base.sweep
    first = plan.groups[0]
    defaults = "default-setting trial per method of its choice" if first.branches else "default-setting trial"
    lines = [f"  search: {sweep.search_alg} (seed {sweep.search_seed}), each point's {defaults} + "
             f"{first.num_samples - len(first.defaults)} drawn while the sweep runs"
             + (f"; ASHA on eval/loss (grace {sweep.grace_steps} steps, reduction factor {sweep.reduction_factor})"
                if sweep.scheduler == "asha" else "")]
    width = max(len(g.label) for g in plan.groups)
    for g in plan.groups:
        space = method_search.describe_space(g)
        lines.append(f"  budget {g.label:<{width}}  {budget.format_group(g, sweep)}  over {space}")
    return lines
