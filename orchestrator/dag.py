"""Pipelines of dependent stages (`sweep.stages`, e.g. RLHF: sft -> reward -> rl, sft -> dpo):
expand each stage into trials, wire every trial to the upstream trials it starts from, order
them, release what is ready, and skip what a failure leaves without inputs.

Pure functions and one small state machine over plain data: no Hydra, no Ray, no MLflow.
orchestrator/plan.py composes each trial's config from `expand_pipeline`'s nodes;
orchestrator/runner.py drives `PipelineState` from Ray Tune.

    sweep:
      name: rlhf
      seeds: [0]                            # each seed is one whole pipeline
      stages:
        sft:    {overrides: {train.max_steps: 250}}
        reward: {after: [sft], overrides: {data: embedded_pref}}
        rl:     {after: [sft, reward], axes: {method.r: [4, 16]}}
        dpo:    {after: [sft], overrides: {data: embedded_pref}}

A stage's trials are its own variants x axes (as in a flat sweep), for every consistent choice of
one trial per upstream stage; consistent = the chosen trials agree on every common ancestor (rl's
sft and reward trials come from the same sft trial). So one upstream trial is shared by all the
downstream trials that use it: both rl r=4 and rl r=16 start from the one sft and reward run.
The recipe of a stage is its `overrides.stage`, else the stage's own name. A stage's overrides
win over the command line's (as a flat sweep's axes do); change one stage from the command line
with `++sweep.stages.NAME.overrides.KEY=VALUE`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

from trainers.config import ConfigError, flatten

STAGE_KEYS = ("after", "overrides", "axes", "variants")
TERMINAL = ("FINISHED", "FAILED", "SKIPPED")


@dataclass
class StageSpec:
    name: str
    after: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)
    variants: list[dict] = field(default_factory=list)


@dataclass
class Node:
    """One trial of a pipeline, before its config is composed."""

    stage: str
    seed: int
    own: list[tuple[str, Any]]  # its variant/axis overrides: what tells it from its stage siblings
    upstream: dict[str, int] = field(default_factory=dict)  # upstream stage -> index of its node
    lineage: dict[str, int] = field(default_factory=dict)  # every ancestor stage (and itself) -> node index
    label: str = ""


def parse_stages(block: dict) -> list[StageSpec]:
    """Checked stage specs of a `sweep.stages` mapping, in a topological order (declaration order
    where the dependencies allow)."""
    if not isinstance(block, dict) or not block:
        raise ConfigError([("sweep.stages", "must map stage names to {after, overrides, axes, variants}")])
    specs = {}
    for name, raw in block.items():
        where = f"sweep.stages.{name}"
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError([(where, f"must be a mapping with keys {', '.join(STAGE_KEYS)}, got {raw!r}")])
        unknown = sorted(set(raw) - set(STAGE_KEYS))
        if unknown:
            raise ConfigError([(f"{where}.{unknown[0]}", f"unknown key; a stage has {', '.join(STAGE_KEYS)}")])
        after = raw.get("after") or []
        if isinstance(after, str):
            after = [after]
        for upstream in after:
            if upstream not in block:
                raise ConfigError([(f"{where}.after", f"no stage named {upstream!r}; stages: {', '.join(block)}")])
        variants = raw.get("variants") or []
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise ConfigError([(f"{where}.variants", "must be a list of override mappings")])
        for key, values in (raw.get("axes") or {}).items():
            if not isinstance(values, list) or not values:
                raise ConfigError([(f"{where}.axes.{key}", "must be a non-empty list of values")])
        # Nested keys (`++sweep.stages.sft.overrides.train.max_steps=20` on the command line) become
        # dotted ones; a later value of the same key wins.
        overrides = flatten(dict(raw.get("overrides") or {}))
        specs[name] = StageSpec(name, list(after), overrides, dict(raw.get("axes") or {}), list(variants))
    order = topological_order({name: spec.after for name, spec in specs.items()})
    return [specs[name] for name in order]


def topological_order(after: dict[str, list[str]]) -> list[str]:
    """Names ordered so each comes after everything it depends on; ties keep the given order.
    Raises ConfigError naming a cycle."""
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(after):
        ready = [name for name in after if name not in placed and all(u in placed for u in after[name])]
        if not ready:
            left = [name for name in after if name not in placed]
            raise ConfigError([("sweep.stages", "stages depend on each other in a cycle: " + " -> ".join(left))])
        order.append(ready[0])
        placed.add(ready[0])
    return order


def _label_part(key: str, value: Any, groups: tuple[str, ...]) -> str:
    return str(value) if key in groups else f"{key.rsplit('.', 1)[-1]}={value}"


def expand_pipeline(stages: list[StageSpec], seeds: list[int],
                    expand: Callable[[dict], list[list[tuple[str, Any]]]],
                    groups: tuple[str, ...] = ()) -> list[Node]:
    """Every trial of the pipeline, upstream before downstream. `expand` turns a stage's
    {axes, variants, seeds} into override pairs (orchestrator.plan.expand); `groups` are the
    config groups, shown as bare values in labels (`full`, not `method=full`)."""
    nodes: list[Node] = []
    for seed in seeds:
        by_stage: dict[str, list[int]] = {}
        for spec in stages:
            choices = [by_stage[u] for u in spec.after]
            combos = [combo for combo in itertools.product(*choices) if _consistent([nodes[i] for i in combo])]
            block = {"axes": spec.axes, "variants": spec.variants, "seeds": [seed]}
            for combo in combos:
                for pairs in expand(block):
                    own = [(k, v) for k, v in pairs if k != "train.seed"]
                    node = Node(stage=spec.name, seed=seed, own=own, upstream=dict(zip(spec.after, combo)))
                    for index in combo:
                        node.lineage.update(nodes[index].lineage)
                    node.lineage[spec.name] = len(nodes)
                    parts = [spec.name] + [_label_part(k, v, groups) for k, v in own]
                    if len(seeds) > 1:
                        parts.append(f"seed={seed}")
                    for upstream, index in node.upstream.items():
                        if len(by_stage[upstream]) > 1:
                            parts.append(f"[{nodes[index].label}]")
                    node.label = " ".join(parts)
                    by_stage.setdefault(spec.name, []).append(len(nodes))
                    nodes.append(node)
            if spec.name not in by_stage:
                raise ConfigError([(f"sweep.stages.{spec.name}.after",
                                    "no consistent choice of upstream trials (they come from different runs of a "
                                    "common ancestor stage)")])
    return nodes


def _consistent(chosen: list[Node]) -> bool:
    seen: dict[str, int] = {}
    for node in chosen:
        for stage, index in node.lineage.items():
            if seen.setdefault(stage, index) != index:
                return False
    return True


def assign_inputs(stage: str, recipe: str, fields: dict[str, str], upstream: dict[str, str]) -> dict[str, str]:
    """{input field: upstream stage}: each upstream fills the field of the recipe that takes what it
    produces. `fields` = {field: kind it takes} (RecipeSpec.inputs); `upstream` = {stage: kind it
    produces} (RecipeSpec.produces)."""
    assigned: dict[str, str] = {}
    for name, kind in upstream.items():
        matches = [f for f, takes in fields.items() if takes == kind]
        if not matches:
            raise ConfigError([(f"sweep.stages.{stage}.after", f"stage {name} produces a {kind}, which stage "
                                                               f"{stage} (recipe {recipe}) does not take")])
        if matches[0] in assigned:
            raise ConfigError([(f"sweep.stages.{stage}.after",
                                f"stages {assigned[matches[0]]} and {name} would both fill stage.{matches[0]}")])
        assigned[matches[0]] = name
    return assigned


class PipelineState:
    """Which trials may start, which are done, and what a failure leaves without inputs.

    `after` maps each trial key to the keys it starts from; `order` is a topological order (the
    plan's); keys in `done` count as FINISHED already (a resumed sweep keeps them).
    """

    def __init__(self, order: list[str], after: dict[str, list[str]], labels: dict[str, str],
                 done: set[str] | frozenset = frozenset()):
        self.order = list(order)
        self.after = {key: list(after.get(key, [])) for key in order}
        self.labels = labels
        self.states = {key: "FINISHED" if key in done else "PENDING" for key in order}
        self.reasons: dict[str, str] = {}

    def ready(self) -> list[str]:
        """Pending trials whose inputs are all finished, in order."""
        return [key for key in self.order if self.states[key] == "PENDING"
                and all(self.states[u] == "FINISHED" for u in self.after[key])]

    def start(self, key: str) -> None:
        self.states[key] = "RUNNING"

    def finish(self, key: str) -> None:
        self.states[key] = "FINISHED"

    def fail(self, key: str, reason: str = "") -> dict[str, str]:
        """Mark `key` failed; returns {key: reason} of the trials newly skipped because of it."""
        self.states[key] = "FAILED"
        if reason:
            self.reasons[key] = reason
        skipped = {}
        for other in dependents(self.after, key):
            if self.states[other] == "PENDING":
                self.states[other] = "SKIPPED"
                skipped[other] = self.reasons[other] = f"upstream {self.labels.get(key, key)} failed"
        return skipped

    @property
    def finished(self) -> bool:
        """Nothing left to start or wait for."""
        return all(state in TERMINAL for state in self.states.values())


def dependents(after: dict[str, list[str]], key: str) -> list[str]:
    """Every trial that needs `key`'s output, directly or through others, in `after`'s order."""
    found: set[str] = set()
    frontier = [key]
    while frontier:
        current = frontier.pop()
        for other, inputs in after.items():
            if current in inputs and other not in found:
                found.add(other)
                frontier.append(other)
    return [other for other in after if other in found]
