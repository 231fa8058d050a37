"""Which parts of a config identify an experiment: one exclusion list for every hash and grouping.

Three things compare configs, and all of them go through `identity()`:

- the trial key (orchestrator/plan.py `trial_key`): a rerun finds the finished trials and the
  output directories of the same experiments;
- the checkpoint fingerprint (trainers/context.py `trial_fingerprint`): a checkpoint resumes only
  the trial that wrote it;
- the report's cells (orchestrator/report.py): trials that differ only by their seed are one cell,
  so it compares with `seed=False`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

# Where and how a trial runs, logs and is stored, and how the sweep is driven: the same
# experiment run elsewhere, logged elsewhere, resumed or promoted is the same experiment. Its CPUs
# (torch threads) too: the planner sizes them to the node and to how many trials run at once.
NOT_IDENTITY = ("cluster", "tracking", "storage", "sweep", "dry_run", "resume", "promote", "train.cpus_per_worker")
# The seed, and what follows from it: a pipeline stage starts from its upstream trial of the same
# seed, whose output path differs per seed.
SEED_DEPENDENT = ("train.seed", "stage.init_from", "stage.reward_from")


def _excluded(key: str, excluded: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in excluded)


def identity(config: Mapping[str, Any], seed: bool = True, _prefix: str = "") -> dict[str, Any]:
    """`config` without the keys that do not identify its experiment (NOT_IDENTITY, and with
    seed=False also SEED_DEPENDENT). Works on a nested config (`to_container(cfg)`) and on its
    dotted flattening (MLflow params) alike: a key is dropped when its dotted path is listed or
    lies under a listed one."""
    excluded = NOT_IDENTITY + (() if seed else SEED_DEPENDENT)
    kept: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{_prefix}{key}"
        if _excluded(path, excluded):
            continue
        kept[key] = identity(value, seed, path + ".") if isinstance(value, Mapping) else value
    return kept


def digest(value: Any, length: int) -> str:
    """Stable short sha256 of a JSON-able value (keys sorted; other objects by their str)."""
    blob = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
