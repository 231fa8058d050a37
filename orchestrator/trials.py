"""What a plan is made of: its trials (each a resolved config and its key), the trials left out
before Ray, the searched grid points, and the small helpers that name and key them. Planning
(orchestrator/plan.py) and the method choice (orchestrator/method_search.py) both build these;
neither is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainers.config import ConfigError, ExperimentConfig, to_container
from trainers.identity import digest, identity

GROUPS = ("model", "data", "method", "precision", "train", "stage", "cluster", "tracking")
ON_INAPPLICABLE = ("skip", "error")


@dataclass
class Trial:
    key: str
    label: str
    overrides: list[str]  # the sweep's own overrides for this trial (axes, variant, seed)
    cfg: ExperimentConfig
    resources: dict[str, float] = field(default_factory=dict)  # per worker
    after: list[str] = field(default_factory=list)  # keys of the trials whose outputs it starts from
    stage: str = ""  # its pipeline stage (a sweep.stages name); "" in a flat sweep
    estimated_bytes: int | None = None  # predicted peak memory per worker (trainers.memory)
    group: str = ""  # key of its SearchGroup, if it is one of a searched grid point's trials
    sample: dict[str, Any] = field(default_factory=dict)  # its drawn values (empty: default settings)
    step_cost: Any = None  # orchestrator.budget.StepCost of one step, with sweep.budget_unit=tokens|flops

    @property
    def config(self) -> dict[str, Any]:
        return to_container(self.cfg)


@dataclass
class SkippedTrial:
    """A trial of a comparison left out before Ray: its method cannot work on the model's
    architecture (INAPPLICABLE), or its estimate exceeds sweep.memory_limit (OVER_MEMORY_LIMIT,
    orchestrator/memcap.py). Recorded on the sweep's parent run (orchestrator/tracking.py:
    record_skipped)."""

    label: str
    overrides: list[str]
    problems: list[tuple[str, str]]
    cfg: ExperimentConfig  # the composed config that was refused
    state: str = "INAPPLICABLE"  # a key of orchestrator.tracking.SKIP_STATES

    @property
    def reason(self) -> str:
        return "; ".join(f"{key}: {message}" for key, message in self.problems)

    @property
    def config(self) -> dict[str, Any]:
        return to_container(self.cfg)


@dataclass
class SearchGroup:
    """A searched grid point (orchestrator/search.py): its default-setting trial, run as it is, and
    the space its other num_samples - 1 trials are drawn from while the sweep runs."""

    key: str
    label: str
    default: Trial
    raw: dict  # the grid point's composed config, interpolations unresolved (search.apply_sample)
    space: dict  # config key -> search.Dimension
    num_samples: int
    branches: dict = field(default_factory=dict)  # a method choice: method -> method_search.Branch

    @property
    def defaults(self) -> list[Trial]:
        """Its default-setting trials: one, or one per method of a method choice."""
        return [b.default for b in self.branches.values()] or [self.default]

    @property
    def budget_steps(self) -> int:
        """Optimizer steps its trials may spend: trials x train.max_steps (ASHA spends less)."""
        return self.num_samples * self.default.cfg.train.max_steps

    @property
    def budget_tokens(self) -> int:
        """Upper bound of the tokens those steps see: steps x rows per step x data.max_seq_len."""
        train = self.default.cfg.train
        return self.budget_steps * train.batch_size * train.grad_accum * train.num_workers * \
            self.default.cfg.data.max_seq_len


@dataclass
class Plan:
    sweep: str
    experiment: str
    trials: list[Trial]
    base: ExperimentConfig
    max_concurrent: int | None = None
    notes: list[str] = field(default_factory=list)
    groups: list[SearchGroup] = field(default_factory=list)
    skipped: list[SkippedTrial] = field(default_factory=list)

    @property
    def key(self) -> str:
        """Identity of the whole sweep: its experiment, the set of its trials and of its searches."""
        return digest([self.experiment, sorted(t.key for t in self.trials)]
                      + ([sorted(g.key for g in self.groups)] if self.groups else []), 12)


def override(key: str, value: Any) -> str:
    """A Hydra override string for one key/value of a sweep block."""
    if key in GROUPS and isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={literal(value)}"


def literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        safe = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"'{safe}'"
    return str(value)


def trial_key(cfg: ExperimentConfig, inputs: dict[str, str] | None = None) -> str:
    """Hash of the resolved config and of the data files' contents; `inputs` ({stage field:
    upstream trial key}) replace the upstream output paths, so the key follows the upstream
    trials, not where storage lives. Edited data is a new trial: a rerun neither keeps results
    nor resumes checkpoints made from the old data."""
    from trainers.data import data_fingerprint

    container = identity(to_container(cfg))
    container["data_sha256"] = data_fingerprint(cfg.data)
    for name, upstream_key in (inputs or {}).items():
        container["stage"][name] = f"trial:{upstream_key}"
    return digest(container, 12)


def trial_label(pairs: list[tuple[str, Any]], cfg: ExperimentConfig, multi_seed: bool) -> str:
    parts = [cfg.method.name] if not any(k == "method" for k, _ in pairs) else []
    for key, value in pairs:
        if key == "train.seed" and not multi_seed:
            continue
        if key in GROUPS:
            parts.append(str(value))
        else:
            parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    return " ".join(parts) or cfg.method.name


def check_given_inputs(cfg: ExperimentConfig) -> None:
    """A stage input set by hand (`stage.init_from=DIR`) must be a finished stage's output."""
    from trainers import storage
    from trainers.recipes import RECIPES
    from trainers.recipes.inputs import LINEAGE_FILE

    for name in RECIPES[cfg.stage.name].inputs:
        value = getattr(cfg.stage, name, None)
        if value and not storage.exists(storage.join(storage.normalize(value), LINEAGE_FILE)):
            raise ConfigError([(f"stage.{name}", f"{value}: not the output of a finished stage (no {LINEAGE_FILE})")])


def budgeted_trial(overrides: list[str], trial_overrides: list[str], cfg: ExperimentConfig, label: str,
                   searched: bool, seen: dict[str, str]) -> Trial:
    """A planned trial of `cfg` (composed from overrides + trial_overrides): under a tokens or flops
    budget its train.max_steps follows from its own step cost; its key must be new to `seen`."""
    from orchestrator import budget
    from orchestrator.compose import compose

    step_cost = None
    if cfg.sweep.budget_unit != "steps":
        steps, step_cost = budget.steps_within(cfg, searched, label)
        trial_overrides = [*trial_overrides, override("train.max_steps", steps)]
        cfg = compose(list(overrides) + trial_overrides)
    key = trial_key(cfg)
    if key in seen:
        raise ConfigError([("sweep", f"trials '{seen[key]}' and '{label}' resolve to the same config")])
    seen[key] = label
    check_given_inputs(cfg)
    return Trial(key=key, label=label, overrides=trial_overrides, cfg=cfg, step_cost=step_cost)

