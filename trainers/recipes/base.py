"""Shared shapes of a stage recipe (its config base class and registry record) and the data
setup the preference stages share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

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
    # How its loss may batch examples besides padded micro-batches (trainers/validate.py refuses the
    # others naming their key): "packing" (data.packing=true), "padding_free"
    # (data.packing=padding_free), "group_by_length" (data.group_by_length=true).
    batching: tuple[str, ...] = ()
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
    train: list["PairExample"]
    train_stats: "DatasetStats"
    eval_pairs: list["PairExample"] | None = None
    eval_prompts: list["EvalPrompt"] | None = None  # the eval pairs' prompts, answer = chosen


def load_preference_splits(cfg: "ExperimentConfig", tokenizer, with_prompts: bool = False) -> PreferenceSplits:
    """data.train_file's preference pairs, tokenized, and data.eval_file's (if set), also as prompts
    with known answers when `with_prompts`. Bad rows raise DataError naming file:line."""
    from trainers.data import load_rows, prompts_with_answers, tokenize_pairs

    data = cfg.data
    _, rows, sources = load_rows(data.train_file, "preference", data.max_train_rows, data.columns.mapping())
    splits = PreferenceSplits(*tokenize_pairs(tokenizer, rows, sources, data.max_seq_len, data.overlength,
                                              template=data.template))
    if data.eval_file:
        _, rows, sources = load_rows(data.eval_file, "preference", data.max_eval_rows, data.columns.mapping())
        splits.eval_pairs, _ = tokenize_pairs(tokenizer, rows, sources, data.max_seq_len, data.overlength,
                                              template=data.template)
        if with_prompts:
            splits.eval_prompts, _ = prompts_with_answers(tokenizer, rows, sources, "preference", data.max_seq_len,
                                                          data.overlength, template=data.template)
    return splits


# Every recipe module registers itself here when trainers.recipes imports it.
RECIPES: dict[str, RecipeSpec] = {}


def register(spec: RecipeSpec) -> RecipeSpec:
    if spec.name in RECIPES:
        raise ValueError(f"recipe {spec.name!r} registered twice")
    RECIPES[spec.name] = spec
    return spec
