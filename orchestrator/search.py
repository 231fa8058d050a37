"""Search spaces of a sweep (`sweep.search`, a variant's `search`): parse and check them, draw
samples, and build the Ray Tune searcher and the per-point budget.

    sweep:
      variants:
        - {method: lora, search: {method.r: {choice: [4, 8, 16]}}}
        - {method: ia3}
      search: {train.lr: {loguniform: [1.0e-4, 3.0e-1]}}    # every variant
      num_samples: 6          # trials per grid point, its default-setting trial included
      search_alg: optuna      # optuna (TPE) | hyperopt (TPE) | random; seeded by sweep.search_seed
      scheduler: asha         # early stopping on eval/loss every train.eval_every steps

Every grid point (variant x axes x seed) with a non-empty space is searched on its own: its
default-setting trial plus num_samples - 1 drawn ones, so each method gets the same number of
trials of the same length (the budget the plan prints). A sample replaces values in the grid
point's composed config before interpolations resolve (`lora_alpha: ${mul:2,${method.r}}` follows
a drawn r), and is checked like any config. Bounds and choices are checked before Ray starts.
A space may also choose the method (`method: {choice: [...]}`): orchestrator/method_search.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from trainers.config import ConfigError, flatten

DISTRIBUTIONS = {"loguniform": "[low, high], 0 < low < high", "uniform": "[low, high], low < high",
                 "randint": "[low, high), integers, low < high", "choice": "[value, ...], non-empty"}
SEARCH_ALGS = ("optuna", "hyperopt", "random")
SCHEDULERS = ("asha",)
METRIC, MODE = "eval/loss", "min"  # what searchers and ASHA minimise
# Sections a search may not vary: where a trial runs and is tracked do not change what it learns.
NOT_SEARCHABLE = ("cluster.", "tracking.", "storage.", "sweep.", "dry_run", "resume")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # a DISTRIBUTIONS name
    args: tuple

    def bounds(self) -> list:
        """The values whose validity stands for the whole range (every value of a choice)."""
        if self.kind == "choice":
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return list(self.args)

    def draw(self, rng: random.Random) -> Any:
        low, *rest = self.args
        if self.kind == "choice":
            return rng.choice(self.args)
        if self.kind == "randint":
            return rng.randrange(low, rest[0])
        if self.kind == "uniform":
            return rng.uniform(low, rest[0])
        return math.exp(rng.uniform(math.log(low), math.log(rest[0])))

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


def parse_dimension(key: str, spec: Any, where: str) -> Dimension:
    """One `KEY: {distribution: args}` entry; ConfigError naming `where.KEY` when malformed."""
    at = f"{where}.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError([(at, "must be one {distribution: arguments} mapping, distributions: "
                                + ", ".join(DISTRIBUTIONS))])
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError([(at, f"unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")])
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError([(at, f"{kind} takes {DISTRIBUTIONS[kind]}, got {args!r}")])
    if kind == "choice":
        return Dimension(key, kind, tuple(args))
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise ConfigError([(at, f"{kind} takes {DISTRIBUTIONS[kind]}, got {args!r}")])
    low, high = args
    if kind == "loguniform" and low <= 0:
        raise ConfigError([(at, f"loguniform bounds must be > 0 (a log scale), got low={low}")])
    if not low < high:
        raise ConfigError([(at, f"{kind} needs low < high, got {list(args)}")])
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError([(at, f"randint bounds must be integers, got {list(args)}")])
    return Dimension(key, kind, (int(low), int(high)) if kind == "randint" else (float(low), float(high)))


def parse_space(block: Any, where: str) -> dict[str, Dimension]:
    if not block:
        return {}
    if not isinstance(block, dict):
        raise ConfigError([(where, f"must map config keys to distributions, got {block!r}")])
    return {key: parse_dimension(key, spec, where) for key, spec in flatten_keys(block).items()}


def flatten_keys(block: dict) -> dict:
    """{"train": {"lr": {...}}} and {"train.lr": {...}} both -> {"train.lr": {...}}."""
    flat = {}
    for key, value in block.items():
        # A mapping of mappings is a config section; anything else is one key's distribution.
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            flat.update({f"{key}.{k}": v for k, v in flatten_keys(value).items()})
        else:
            flat[key] = value
    return flat


def check_sweep(sweep) -> list[tuple[str, str]]:
    """Problems with the search settings of `sweep` (orchestrator.config.SweepConfig)."""
    problems = []
    if sweep.num_samples < 1:
        problems.append(("sweep.num_samples", f"must be >= 1, got {sweep.num_samples}"))
    if sweep.search_alg not in SEARCH_ALGS:
        problems.append(("sweep.search_alg", f"must be one of {', '.join(SEARCH_ALGS)}, got {sweep.search_alg!r}"))
    if sweep.scheduler is not None and sweep.scheduler not in SCHEDULERS:
        problems.append(("sweep.scheduler", f"must be null or one of {', '.join(SCHEDULERS)}, "
                                            f"got {sweep.scheduler!r}"))
    if sweep.grace_steps < 1:
        problems.append(("sweep.grace_steps", f"must be >= 1, got {sweep.grace_steps}"))
    if sweep.reduction_factor < 2:
        problems.append(("sweep.reduction_factor", f"must be >= 2, got {sweep.reduction_factor}"))
    from orchestrator.budget import check_unit

    return problems + check_unit(sweep)


def check_search(sweep, cfg, label: str) -> list[tuple[str, str]]:
    """The searchers rank trials, and ASHA stops them, on eval/loss: the stage must log it on the
    eval split during training (RecipeSpec.periodic_metrics); ASHA needs an eval set and
    train.eval_every too."""
    from trainers.recipes import RECIPES

    where = f" (trial {label})"
    measuring = " or ".join(name for name, recipe in sorted(RECIPES.items()) if METRIC in recipe.periodic_metrics)
    if METRIC not in RECIPES[cfg.stage.name].periodic_metrics:
        asha = sweep.scheduler == "asha"
        key, what = ("sweep.scheduler", "asha decides") if asha else ("sweep.search", "the searchers rank trials")
        return [(key, f"{what} on {METRIC}, which stage {measuring} measures during training; "
                      f"stage {cfg.stage.name} does not" + where)]
    if sweep.scheduler != "asha":
        return []
    if not cfg.data.eval_file:
        return [("data.eval_file", "sweep.scheduler=asha stops trials on eval/loss: set an eval file" + where)]
    if cfg.train.eval_every < 1:
        return [("train.eval_every", "sweep.scheduler=asha needs eval/loss during training: set "
                                     "train.eval_every > 0" + where)]
    if cfg.train.eval_every > sweep.grace_steps:
        return [("train.eval_every", f"{cfg.train.eval_every} > sweep.grace_steps={sweep.grace_steps}: no "
                                     "evaluation would reach the first ASHA rung" + where)]
    return []


def check_keys(space: dict[str, Dimension], resolved: dict, where: str) -> None:
    """Every searched key is a value of the trial's config (not a group, not where it runs)."""
    leaves = flatten(resolved)
    for key in space:
        if key.startswith(NOT_SEARCHABLE) or key.endswith(".name") and key.split(".")[0] in ("method", "stage"):
            raise ConfigError([(f"{where}.{key}", "cannot be searched: choose methods and stages with variants "
                                                  "or axes; cluster, tracking, storage and sweep do not change a result")])
        if key not in leaves:
            close = [k for k in leaves if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
            hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
            raise ConfigError([(f"{where}.{key}", f"not a config key of this trial{hint}")])


def apply_sample(raw: dict, sample: dict[str, Any]):
    """The typed config of `raw` (a composed, unresolved container) with `sample`'s values."""
    from omegaconf import OmegaConf

    from orchestrator.compose import register_resolvers
    from orchestrator.config import OrchestratorConfig
    from trainers.validate import from_container

    register_resolvers()
    node = OmegaConf.create(raw)
    for key, value in sample.items():
        OmegaConf.update(node, key, value, merge=False)
    return from_container(OmegaConf.to_container(node, resolve=True), OrchestratorConfig)


def check_bounds(space: dict[str, Dimension], raw: dict, where: str) -> None:
    """Each bound (each choice) of each dimension gives a valid config, or ConfigError naming it."""
    for key, dim in space.items():
        for value in dim.bounds():
            try:
                apply_sample(raw, {key: value})
            except ConfigError as err:
                why = "; ".join(f"{k}: {m}" for k, m in err.problems)
                raise ConfigError([(f"{where}.{key}", f"{dim.kind} value {value!r} gives an invalid trial ({why})")])


def make_searcher(alg: str, space, seed: int):
    """The Ray Tune searcher of one grid point, or None for `random` (drawn with Dimension.draw).
    `space`: config key -> Dimension, or (optuna only) a define-by-run function of an Optuna trial
    (orchestrator/method_search.py: a method choice)."""
    if alg == "random":
        return None
    domains = space if callable(space) else {key: dim.tune_domain() for key, dim in space.items()}
    if alg == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study would break the board
        return OptunaSearch(space=domains, metric=METRIC, mode=MODE, seed=seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(space=domains, metric=METRIC, mode=MODE, random_state_seed=seed)


def describe(sample: dict[str, Any]) -> str:
    """'lr=0.00312 r=8': a drawn sample in a trial label."""
    def short(value):
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return " ".join(f"{key.rsplit('.', 1)[-1]}={short(v)}" for key, v in sample.items())
