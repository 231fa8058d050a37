"""The method as a searched choice: which method, and which settings of it, in one search.

    sweep:
      search:
        method: {choice: [lora, qlora, ia3]}
        train.lr: {loguniform: [1.0e-4, 1.0e-1]}       # shared: every method draws it
      method_spaces:                                   # each method's own keys (conditional)
        lora: {method.r: {choice: [4, 8, 16]}}
        qlora: {fixed: {precision: nf4, train.optimizer: paged_adamw_8bit}, method.r: {choice: [4, 8]}}
        ia3: {train.lr: {loguniform: [1.0e-3, 1.0e-1]}}  # replaces the shared range for ia3

A method's space is the shared keys of the grid point plus its own `sweep.method_spaces.NAME`
keys (its own replace shared ones), each checked against that method's composed config. `fixed:`
holds the overrides a method needs to be valid (a config group such as `precision: nf4`, or a
value), applied to every trial of that method and to nothing else.

A grid point whose space chooses the method is one searched group: a default-setting trial per
method of the choice (that method at its defaults, with its fixed overrides: every method runs
at least once, and the report has each one's baseline), then num_samples - (number of methods)
drawn trials. A draw picks the method first, then that method's keys: an Optuna define-by-run
space (Ray Tune's OptunaSearch(space=callable)), in which a method's own keys are parameters of
their own ("lora:train.lr"), or the same order with `random`. hyperopt is refused for a method
choice. ASHA runs one bracket over all the group's draws, whatever their method, so the budget
goes to the methods whose draws do well.

The budget of a choice is sweep.budget for the whole group. In steps (the default) every method
takes the same train.max_steps of the same batches. In tokens or FLOPs (orchestrator/budget.py)
each method gets as many steps as its own step cost buys of sweep.budget / trials, and each draw
as many as its drawn config's cost buys; ASHA's rungs are then in that unit, so the bracket
compares draws of different methods at equal compute.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from orchestrator import budget, search
from orchestrator.search import Dimension
from trainers.config import ConfigError, InapplicableError, to_container
from trainers.identity import digest

METHOD = "method"  # the searched key that chooses the method
FIXED = "fixed"  # a method_spaces entry's overrides that method needs
OWN = ":"  # a method's own key in the Optuna study is METHOD:KEY, so methods do not share its distribution


@dataclass
class Branch:
    """One method of a choice: its fixed overrides, its space and, once planned, its default trial
    and composed (unresolved) config, which its draws are applied to."""

    method: str
    fixed: dict[str, Any]
    space: dict[str, Dimension]  # the shared keys and its own
    own: frozenset = frozenset()  # the keys from sweep.method_spaces.NAME
    default: Any = None  # orchestrator.trials.Trial
    raw: dict = field(default_factory=dict)

    @property
    def overrides(self) -> list[str]:
        from orchestrator.trials import GROUPS, override

        pairs = sorted(self.fixed.items(), key=lambda kv: kv[0] not in GROUPS)  # groups before values
        return [override(METHOD, self.method)] + [override(k, v) for k, v in pairs]

    def param(self, key: str) -> str:
        return f"{self.method}{OWN}{key}" if key in self.own else key


def _methods() -> list[str]:
    from trainers.methods import METHODS

    return sorted(METHODS)


def parse_method_spaces(block: Any) -> dict[str, tuple[dict, dict[str, Dimension]]]:
    """`sweep.method_spaces`: method name -> (its fixed overrides, its own space)."""
    if not block:
        return {}
    if not isinstance(block, dict):
        raise ConfigError([("sweep.method_spaces", "must map method names to {KEY: distribution, ..., "
                                                   "fixed: {KEY: value}}")])
    parsed = {}
    for name, entry in block.items():
        where = f"sweep.method_spaces.{name}"
        if name not in _methods():
            raise ConfigError([(where, f"{name!r} is not a method; known: {', '.join(_methods())}")])
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError([(where, f"must map keys to distributions (and fixed: to values), got {entry!r}")])
        entry = dict(entry or {})
        fixed = entry.pop(FIXED, None) or {}
        if not isinstance(fixed, dict):
            raise ConfigError([(f"{where}.{FIXED}", f"must map config keys or groups to values, got {fixed!r}")])
        if METHOD in fixed:
            raise ConfigError([(f"{where}.{FIXED}.{METHOD}", "the method is what sweep.search.method chooses")])
        space = search.parse_space(entry, where)
        if METHOD in space:
            raise ConfigError([(f"{where}.{METHOD}", "a method's space cannot choose the method again")])
        parsed[name] = (fixed, space)
    return parsed


def split_choice(space: dict[str, Dimension]) -> tuple[Dimension, dict[str, Dimension]]:
    """The method choice of a grid point's space and its other (shared) keys; ConfigError naming
    `sweep.search.method` when it is not a choice of known, distinct methods."""
    dim, shared = space[METHOD], {k: d for k, d in space.items() if k != METHOD}
    if dim.kind != "choice":
        raise ConfigError([("sweep.search.method", f"a method is searched as {{choice: [NAME, ...]}}, got {dim.kind}")])
    unknown = [str(name) for name in dim.args if name not in _methods()]
    if unknown:
        raise ConfigError([("sweep.search.method", f"unknown method(s) {', '.join(unknown)}; known: "
                                                   f"{', '.join(_methods())}")])
    if len(set(dim.args)) != len(dim.args):
        raise ConfigError([("sweep.search.method", f"lists a method twice: {list(dim.args)}")])
    return dim, shared


def plan_choice(plan, overrides: list[str], pairs: list, space: dict, method_spaces: dict, seen: dict) -> None:
    """The searched group of a grid point (`pairs`) whose space chooses the method: each method's
    default-setting trial into plan.trials (an inapplicable one into plan.skipped, or refused, per
    sweep.on_inapplicable) and the group into plan.groups."""
    sweep = plan.base.sweep
    choice, shared = split_choice(space)
    if any(key == METHOD for key, _ in pairs):
        raise ConfigError([("sweep.search.method", "this grid point sets the method too (a variant or axis "
                                                   "`method`): choose it with one or the other")])
    if sweep.search_alg == "hyperopt":
        raise ConfigError([("sweep.search_alg", "hyperopt does not draw a method choice's conditional spaces "
                                                "here: use optuna (define-by-run) or random")])
    branches = {}
    for name in choice.args:
        fixed, own = method_spaces.get(name, ({}, {}))
        branch = Branch(name, fixed, {**shared, **own}, frozenset(own))
        if plan_branch(plan, overrides, pairs, branch, seen):
            branches[name] = branch
    if not branches:
        raise ConfigError([("sweep.search.method", "no method of the choice can run here: " +
                            "; ".join(t.reason for t in plan.skipped))])
    plan.groups.append(choice_group(branches, choice, shared, sweep))


def plan_branch(plan, overrides: list[str], pairs: list, branch: Branch, seen: dict) -> bool:
    """Compose and check one method's default-setting trial and its space; False if the method
    cannot work on the model and the sweep skips it."""
    from orchestrator.compose import compose, compose_raw
    from orchestrator.trials import SkippedTrial, budgeted_trial, override, trial_label
    from omegaconf import OmegaConf

    trial_overrides = [override(k, v) for k, v in pairs] + branch.overrides
    label_pairs = [(METHOD, branch.method)] + pairs
    multi_seed = len(plan.base.sweep.seeds) > 1
    try:
        cfg = compose(list(overrides) + trial_overrides)
    except InapplicableError as err:
        if plan.base.sweep.on_inapplicable == "skip":
            plan.skipped.append(SkippedTrial(trial_label(label_pairs, err.config, multi_seed), trial_overrides,
                                             err.problems, err.config))
            return False
        raise ConfigError([("sweep.search.method", f"choice {branch.method}: {k}: {m} (sweep.on_inapplicable=skip "
                                                   "leaves it out of the choice)") for k, m in err.problems]) from None
    except ConfigError as err:
        raise ConfigError([("sweep.search.method", f"choice {branch.method} gives an invalid trial ({k}: {m}); the "
                            f"overrides a method needs go in sweep.method_spaces.{branch.method}.{FIXED}")
                           for k, m in err.problems]) from None
    # Under a tokens or flops budget, the method's steps are what its own step cost buys.
    branch.default = budgeted_trial(overrides, trial_overrides, cfg, trial_label(label_pairs, cfg, multi_seed),
                                    True, seen)
    branch.raw = OmegaConf.to_container(compose_raw(list(overrides) + branch.default.overrides), resolve=False)
    check_branch_space(branch)
    problems = search.check_search(plan.base.sweep, branch.default.cfg, branch.default.label)
    if problems:
        raise ConfigError(problems)
    plan.trials.append(branch.default)
    return True


def check_branch_space(branch: Branch) -> None:
    """Each key of a method's space is a value of that method's config and each bound is valid;
    errors name the key where it was written."""
    resolved = to_container(branch.default.cfg)
    own = {k: d for k, d in branch.space.items() if k in branch.own}
    shared = {k: d for k, d in branch.space.items() if k not in branch.own}
    where_own = f"sweep.method_spaces.{branch.method}"
    search.check_keys(own, resolved, where_own)
    search.check_bounds(own, branch.raw, where_own)
    try:
        search.check_keys(shared, resolved, "sweep.search")
        search.check_bounds(shared, branch.raw, "sweep.search")
    except ConfigError as err:
        raise ConfigError([(k, f"{m} (method {branch.method} of the choice; a key only some methods have goes "
                               f"in sweep.method_spaces.NAME)") for k, m in err.problems]) from None


def choice_group(branches: dict[str, Branch], choice: Dimension, shared: dict, sweep):
    """The SearchGroup of a method choice: one budget, one searcher, one ASHA bracket. In steps its
    methods must take equal steps of equal batches; in tokens or FLOPs each took its own steps
    (plan_branch), and their trials spend the same."""
    from orchestrator.trials import SearchGroup

    first = next(iter(branches.values()))
    sizes = {b.method: (b.default.cfg.train.max_steps, b.default.cfg.train.batch_size, b.default.cfg.train.grad_accum,
                        b.default.cfg.train.num_workers, b.default.cfg.data.max_seq_len) for b in branches.values()}
    if sweep.budget_unit == "steps" and len(set(sizes.values())) > 1:
        raise ConfigError([("sweep.budget", "the methods of a choice must get equal budgets (train.max_steps, batch, "
                                            f"data.max_seq_len), got {sizes}; check sweep.method_spaces.NAME.{FIXED}, "
                                            "or give each the same compute: sweep.budget_unit=flops")])
    num_samples = sweep.num_samples
    if sweep.budget is not None and sweep.budget_unit == "steps":
        num_samples = int(sweep.budget // first.default.cfg.train.max_steps)
    if num_samples < len(branches):
        key = "sweep.budget" if sweep.budget is not None else "sweep.num_samples"
        raise ConfigError([(key, f"a choice of {len(branches)} methods runs each at its defaults first: it needs at "
                                 f"least {len(branches)} trials, got {num_samples}")])
    parts = [[(b.default.key, b.fixed, sorted((k, d.kind, list(d.args)) for k, d in b.space.items()))
              for b in branches.values()], sweep.search_alg, sweep.search_seed, num_samples, sweep.scheduler,
             sweep.grace_steps, sweep.reduction_factor]
    key = digest(parts, 12)
    for b in branches.values():
        b.default.group = key
    space = {METHOD: choice, **shared}  # the whole choice, methods left out as inapplicable too
    for b in branches.values():
        space.update({k: d for k, d in b.space.items() if k in b.own})  # for the plan's notes on replaced keys
    label = "{" + ",".join(branches) + "}" + first.default.label[len(first.method):]
    return SearchGroup(key=key, label=label, default=first.default, raw=first.raw, space=space,
                       num_samples=num_samples, branches=branches)


def check_unused(method_spaces: dict, groups: list) -> None:
    """Every sweep.method_spaces entry is a method of some grid point's choice."""
    chosen = {name for g in groups for name in g.space.get(METHOD, Dimension(METHOD, "choice", ())).args}
    for name in method_spaces:
        if not any(g.branches for g in groups):
            raise ConfigError([(f"sweep.method_spaces.{name}", "method_spaces applies to a method choice: add "
                                                               "sweep.search.method: {choice: [...]}")])
        if name not in chosen:
            raise ConfigError([(f"sweep.method_spaces.{name}", f"{name} is not a method of the choice "
                                                               f"({', '.join(sorted(chosen))})")])


# --------------------------------------------------------------------------- drawing


def searcher_space(group):
    """What search.make_searcher builds the group's searcher on: its space, or for a method choice
    a define-by-run function of an Optuna trial (the method first, then that method's keys)."""
    if not group.branches:
        return group.space

    def space(trial) -> None:
        branch = group.branches[trial.suggest_categorical(METHOD, list(group.branches))]
        for key, dim in branch.space.items():
            suggest(trial, branch.param(key), dim)

    return space


def suggest(trial, name: str, dim: Dimension) -> Any:
    """One Optuna suggestion of `dim`'s distribution."""
    if dim.kind == "choice":
        return trial.suggest_categorical(name, list(dim.args))
    low, high = dim.args
    if dim.kind == "randint":
        return trial.suggest_int(name, low, high - 1)
    return trial.suggest_float(name, low, high, log=dim.kind == "loguniform")


def sample_of(group, params: dict) -> dict[str, Any]:
    """A searcher's suggestion as a sample: config key -> value (and `method` for a choice)."""
    if not group.branches:
        return {key: params[key] for key in group.space}
    branch = group.branches[params[METHOD]]
    return {METHOD: branch.method, **{key: params[branch.param(key)] for key in branch.space}}


def draw_random(group, rng: random.Random) -> dict[str, Any]:
    if not group.branches:
        return {key: dim.draw(rng) for key, dim in group.space.items()}
    branch = group.branches[rng.choice(list(group.branches))]
    return {METHOD: branch.method, **{key: dim.draw(rng) for key, dim in branch.space.items()}}


def base_of(group, sample: dict):
    """(default-setting trial, raw config, config values) of a drawn sample: what it is applied to."""
    if not group.branches:
        return group.default, group.raw, sample
    branch = group.branches[sample[METHOD]]
    return branch.default, branch.raw, {k: v for k, v in sample.items() if k != METHOD}


def config_of(group, sample: dict):
    """The typed config of a drawn sample; ConfigError if the config rejects it. Under
    sweep.budget_unit=tokens|flops its train.max_steps is what its own step cost buys of a trial's
    budget: a drawn key that changes the cost (a rank, a batch, virtual tokens) changes its steps,
    so every trial of the group spends the same."""
    _, raw, values = base_of(group, sample)
    cfg = search.apply_sample(raw, values)
    if cfg.sweep.budget_unit == "steps":
        return cfg
    steps, _ = budget.steps_within(cfg, True, f"{group.label} draw {search.describe(values)}")
    return search.apply_sample(raw, {**values, "train.max_steps": steps})


def label_of(group, number: int, sample: dict) -> str:
    """'lora #3 lr=0.00312 r=8': the drawn trial's label, led by its method's default trial's."""
    default, _, values = base_of(group, sample)
    return f"{default.label if group.branches else group.label} #{number} {search.describe(values)}"


def run_tags(group, trial) -> dict[str, str]:
    """Tags of a child run of a method choice: `search_choice`, the label of its method's
    default-setting trial, which the report's tuning table has one row per."""
    if not group.branches:
        return {}
    return {"search_choice": group.branches[trial.cfg.method.name].default.label}


def describe_space(group) -> str:
    """'method~choice[lora, ia3]' and a line per method ('lora: method.r~choice[4, 8]'), or the
    space of a plain group: what the plan prints a searched group draws."""
    def dims(space):
        return ", ".join(f"{k}~{d.kind}{list(d.args)}" for k, d in space.items())

    if not group.branches:
        return dims(group.space)
    parts = [f"method~choice{list(group.branches)}"]
    for b in group.branches.values():
        fixed = f" (fixed {', '.join(f'{k}={v}' for k, v in b.fixed.items())})" if b.fixed else ""
        parts.append(f"{b.method}{fixed}: {dims(b.space) or 'defaults only'}")
    return "\n      ".join(parts)  # a line per method under the plan's budget line
