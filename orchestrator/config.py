"""The orchestrator's part of the configuration: where a sweep runs (cluster), where it is tracked
(tracking) and what it varies (sweep). trainers/config.py types what one trial needs; this
module's `OrchestratorConfig` extends it with these sections for Hydra's ConfigStore, so a
composed sweep rejects unknown keys and wrong types here too, while a trial (and a logged
config.yaml) loads in the Ray-free trainers library, which only carries these sections along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from trainers.config import ExperimentConfig


@dataclass
class ClusterConfig:
    # null = start a local Ray; auto | HOST:PORT | ray://HOST:10001 = attach to a running cluster.
    address: Optional[str] = None
    # Upper bound on trials running at once; null = as many as the cluster's resources allow.
    max_concurrent_trials: Optional[int] = None
    # Local Ray only: CPUs it may use (null = all).
    num_cpus: Optional[int] = None
    # Memory of one GPU on the GPU nodes: trials whose estimate fits share a GPU by fraction.
    gpu_memory_gb: float = 80.0
    # Times Ray Train restarts a trial's workers after a worker failure.
    max_failures: int = 1


@dataclass
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"
    experiment: Optional[str] = None  # null = the sweep's name


@dataclass
class SweepConfig:
    name: str = "single"
    # Cartesian product: {"method.r": [1, 2, 4]} -> 3 trials. Keys are Hydra override keys.
    axes: Dict[str, Any] = field(default_factory=dict)
    # Explicit override sets, each crossed with `axes`: [{"method": "full"}, {"method.r": 8}]. A
    # variant's own `search: {...}` adds to (and per key replaces) the sweep's search space.
    variants: List[Any] = field(default_factory=list)
    # One trial per seed for every variant x axes point; default: the one seed train.seed resolves to.
    seeds: List[int] = field(default_factory=lambda: ["${train.seed}"])
    # A trial whose method the model's architecture cannot take (BitFit on a model without biases,
    # LoRA targets it has no layer of): skip (left out before Ray, its reason in the plan, the
    # table and the parent run) | error (refuse the whole sweep). Only one trial: always refused.
    on_inapplicable: str = "skip"
    # A pipeline instead (e.g. RLHF: sft -> reward -> rl, sft -> dpo): stage name -> {after: [stage
    # names], overrides: {...}, axes: {...}, variants: [...], seeds: [...]}. Each stage expands like
    # a sweep of its own, and its trials start from the outputs of the stages it comes after
    # (orchestrator/dag.py; sweeps/rlhf.yaml). Excludes the top-level axes and variants.
    stages: Dict[str, Any] = field(default_factory=dict)
    # Ray Tune search (orchestrator/search.py): config key -> distribution, e.g.
    # {train.lr: {loguniform: [1.0e-5, 1.0e-1]}, method.r: {choice: [4, 8, 16]}}; uniform: [lo, hi],
    # randint: [lo, hi) too. Every grid point (variant x axes x seed) is searched on its own.
    search: Dict[str, Any] = field(default_factory=dict)
    # With `search: {method: {choice: [lora, ia3]}}`, each method's own keys and the overrides it
    # needs (orchestrator/method_search.py): {lora: {method.r: {choice: [4, 8]}}, qlora: {fixed:
    # {precision: nf4}, method.r: {choice: [4, 8]}}}.
    method_spaces: Dict[str, Any] = field(default_factory=dict)
    # Trials per searched grid point, its default-setting trial included (the budget's unit).
    num_samples: int = 1
    # Tune searcher: optuna (TPE, the default) | hyperopt (TPE) | random.
    search_alg: str = "optuna"
    search_seed: int = 0  # the searchers' seed: the same sweep draws the same first trials
    # Early stopping of searched trials on eval/loss: null | asha (needs train.eval_every > 0).
    scheduler: Optional[str] = None
    grace_steps: int = 20  # ASHA: optimizer steps every trial gets before it can be stopped
    reduction_factor: int = 3  # ASHA: 1/reduction_factor of the trials go on at each rung
    # What each searched grid point may spend, in sweep.budget_unit. steps: optimizer steps
    # (trials x train.max_steps); null = num_samples x max_steps; set, it fixes num_samples per
    # grid point, and the plan refuses a comparison whose points would get different budgets.
    budget: Optional[float] = None
    # steps | tokens | flops. tokens or flops: every grid point (searched or not) gets sweep.budget
    # of that unit, and its train.max_steps follows from the cost of its step, so every method gets
    # the same compute; ASHA's rungs are in that unit too (orchestrator/budget.py).
    budget_unit: str = "steps"
    # Memory of one device (24GiB, 512MiB, 8GB, bytes; null = no cap): a trial whose estimate
    # (peak + runtime overhead, as dry_run prints it) exceeds it is left out before Ray and listed
    # in the plan with its estimate (orchestrator/memcap.py); promote=true picks within it.
    memory_limit: Optional[str] = None


@dataclass
class OrchestratorConfig(ExperimentConfig):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
