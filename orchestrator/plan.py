"""Plan a sweep: expand its variants x axes x seeds into trials, each a fully resolved config.

Every trial is composed by Hydra from the same overrides a user could type, so a group swap
(`method=full`) and a value (`method.r=4`) are both just overrides, and each trial is checked
like a single run. A trial's key is a hash of its resolved config (tracking, cluster and storage
excluded): the same experiment always has the same key, which is how reruns find finished work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from orchestrator.compose import compose
from trainers.config import ConfigError, ExperimentConfig, to_container

GROUPS = ("model", "data", "method", "precision", "train", "stage", "cluster", "tracking")
NOT_IN_KEY = ("cluster", "tracking", "storage", "sweep", "dry_run", "resume")


@dataclass
class Trial:
    key: str
    label: str
    overrides: list[str]  # the sweep's own overrides for this trial (axes, variant, seed)
    cfg: ExperimentConfig
    resources: dict[str, float] = field(default_factory=dict)  # per worker

    @property
    def config(self) -> dict[str, Any]:
        return to_container(self.cfg)


@dataclass
class Plan:
    sweep: str
    experiment: str
    trials: list[Trial]
    base: ExperimentConfig
    max_concurrent: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Identity of the whole sweep: its experiment and the set of its trials."""
        blob = json.dumps([self.experiment, sorted(t.key for t in self.trials)])
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def override(key: str, value: Any) -> str:
    """A Hydra override string for one key/value of a sweep block."""
    if key in GROUPS and isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={_literal(value)}"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        safe = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"'{safe}'"
    return str(value)


def trial_key(cfg: ExperimentConfig) -> str:
    container = {k: v for k, v in to_container(cfg).items() if k not in NOT_IN_KEY}
    blob = json.dumps(container, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _label(pairs: list[tuple[str, Any]], cfg: ExperimentConfig, multi_seed: bool) -> str:
    parts = [cfg.method.name] if not any(k == "method" for k, _ in pairs) else []
    for key, value in pairs:
        if key == "train.seed" and not multi_seed:
            continue
        if key in GROUPS:
            parts.append(str(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts) or cfg.method.name


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
        # Group choices first: `method=full` must be applied before `method.*` values.
        ordered = sorted(variant.items(), key=lambda kv: kv[0] not in GROUPS)
        for combo in itertools.product(*axis_items):
            for seed in seeds:
                trials.append(ordered + list(combo) + [("train.seed", seed)])
    return trials


def make_plan(overrides: list[str]) -> Plan:
    """Compose and check the base config and every trial; raise ConfigError on the first bad one."""
    base = compose(overrides)
    sweep_block = OmegaConf.to_container(OmegaConf.structured(base.sweep), resolve=True)
    multi_seed = len(sweep_block.get("seeds") or [0]) > 1
    trials: list[Trial] = []
    seen: dict[str, str] = {}
    for pairs in expand(sweep_block):
        trial_overrides = [override(k, v) for k, v in pairs]
        try:
            cfg = compose(list(overrides) + trial_overrides)
        except ConfigError as err:
            where = " ".join(trial_overrides)
            raise ConfigError([(key, f"{msg} (in sweep trial: {where})") for key, msg in err.problems]) from None
        key = trial_key(cfg)
        label = _label(pairs, cfg, multi_seed)
        if key in seen:
            raise ConfigError([("sweep", f"trials '{seen[key]}' and '{label}' resolve to the same config")])
        seen[key] = label
        trials.append(Trial(key=key, label=label, overrides=trial_overrides, cfg=cfg,
                            resources=worker_resources(cfg)))
    experiment = base.tracking.experiment or base.sweep.name
    plan = Plan(sweep=base.sweep.name, experiment=experiment, trials=trials, base=base)
    plan.max_concurrent = concurrency(plan)
    return plan


def worker_resources(cfg: ExperimentConfig) -> dict[str, float]:
    resources = {"CPU": float(cfg.train.cpus_per_worker)}
    if cfg.train.use_gpu:
        resources["GPU"] = 1.0
    return resources


def concurrency(plan: Plan) -> int | None:
    """Trials at once: the user's cap, and for a local Ray what its CPUs hold."""
    cap = plan.base.cluster.max_concurrent_trials
    if plan.base.cluster.address is None and plan.trials:
        cpus = plan.base.cluster.num_cpus or os.cpu_count() or 1
        per_trial = max(t.resources["CPU"] * t.cfg.train.num_workers for t in plan.trials)
        fits = max(1, int(cpus // per_trial))
        cap = min(cap, fits) if cap else fits
    return cap


def format_plan(plan: Plan) -> str:
    lines = [f"sweep {plan.sweep}: {len(plan.trials)} trial(s), experiment '{plan.experiment}', "
             f"at most {plan.max_concurrent or 'cluster-limited'} at once"]
    width = max((len(t.label) for t in plan.trials), default=5)
    lines.append(f"  {'trial':<{width}}  {'key':<12}  {'stage':<6}  {'workers':>7}  resources/worker")
    for t in plan.trials:
        res = ", ".join(f"{k}={v:g}" for k, v in t.resources.items())
        lines.append(f"  {t.label:<{width}}  {t.key:<12}  {t.cfg.stage.name:<6}  {t.cfg.train.num_workers:>7}  {res}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
