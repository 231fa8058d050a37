"""Shared shapes of a stage recipe (its config base class and registry record) and the data
setup the preference stages share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig
    from trainers.context import TrialContext
    from trainers.data import DatasetStats, EvalPrompt, PairExample

# Data formats each `RecipeSpec.data_kind` trains on (trainers/data.py formats).
DATA_FORMATS_OF_KIND = {
    "instruction": ("instruction", "chat"),
    "preference": ("preference",),
    # prompts with a known answer: instruction/chat rows (answer = the output) or preference rows
    # (answer = chosen)
    "prompts": ("instruction", "chat", "preference"),
}


@dataclass
class StageConfig:
    name: str = "?"
    # Output directory of the stage this one starts from (its adapter or model); the orchestrator
    # fills it in from the upstream trial, a plain-process run sets it by hand.
    init_from: str | None = None

    def check(self) -> list[tuple[str, str]]:
        """Problems with this stage's own fields, keyed relative to `stage.`."""
        return []


def no_combination_limits(cfg: "ExperimentConfig") -> list[tuple[str, str]]:
    return []


@dataclass
class RecipeSpec:
    name: str
    config_cls: type
    run: Callable[["TrialContext"], dict[str, float]]
    # What it trains on: "instruction" (instruction/chat), "preference", or "prompts" (any format
    # that gives a prompt and its known answer); see DATA_FORMATS_OF_KIND.
    data_kind: str = "instruction"
    # What its output directory holds: "policy" (a causal LM) or "reward_model" (a scalar head).
    produces: str = "policy"
    # Stage-config fields that name another stage's output dir -> what that stage must produce.
    # A pipeline (orchestrator/dag.py) fills each from the upstream stage that produces it.
    inputs: dict[str, str] = field(default_factory=lambda: {"init_from": "policy"})
    # Impossible stage x method/data/precision combinations, as (key, reason).
    check_combination: Callable[["ExperimentConfig"], list[tuple[str, str]]] = no_combination_limits
    summary: str = ""

    @property
    def data_formats(self) -> tuple[str, ...]:
        return DATA_FORMATS_OF_KIND[self.data_kind]


def needs_mergeable_method(stage: str) -> Callable[["ExperimentConfig"], list[tuple[str, str]]]:
    """check_combination of the RLHF stages: their method must train the model's own forward (no
    virtual tokens), so scores, log-probs and the next stage see one plain model."""

    def check(cfg: "ExperimentConfig") -> list[tuple[str, str]]:
        from trainers.methods import METHODS

        spec = METHODS.get(cfg.method.name)
        if spec is not None and not spec.mergeable:
            mergeable = ", ".join(name for name, other in METHODS.items() if other.mergeable)
            return [("method.name", f"stage {stage} needs a method that merges into the model "
                                    f"({mergeable}), got {cfg.method.name}")]
        return []

    return check


@dataclass
class PreferenceSplits:
    train: Sequence["PairExample"]  # lazy rows of the prepared dataset (trainers/prepared.py)
    train_stats: "DatasetStats"
    eval_pairs: Sequence["PairExample"] | None = None
    eval_prompts: Sequence["EvalPrompt"] | None = None  # the eval pairs' prompts, answer = chosen
    data_metrics: dict[str, float] = field(default_factory=dict)  # time/data_s


def load_preference_splits(ctx: "TrialContext", tokenizer, with_prompts: bool = False) -> PreferenceSplits:
    """data.train_file's preference pairs, prepared, and data.eval_file's (if set), also as prompts
    with known answers when `with_prompts`. Bad rows raise DataError naming file:line."""
    data = ctx.stage_data(tokenizer)
    splits = PreferenceSplits(data.train.pairs(), data.train.stats)
    if data.eval:
        splits.eval_pairs = data.eval["pairs"].pairs()
        if with_prompts:
            splits.eval_prompts = data.eval["prompts"].prompts()
    splits.data_metrics = data.ready(lambda: splits.train[0])
    return splits


# Every recipe module registers itself here when trainers.recipes imports it.
RECIPES: dict[str, RecipeSpec] = {}


def register(spec: RecipeSpec) -> RecipeSpec:
    if spec.name in RECIPES:
        raise ValueError(f"recipe {spec.name!r} registered twice")
    RECIPES[spec.name] = spec
    return spec
