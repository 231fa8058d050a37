"""Shared shapes of a stage recipe (its config base class and registry record) and the data
setup the preference stages share: their data, the starting policy of dpo and orpo, and both
sides of a pair scored in one pass.

A recipe's RecipeSpec is all the rest of the code knows of its stage: what data it trains on, what
it needs and produces (pipelines wire stages by these), what it adds to a step's memory (the
estimator, and so Ray's reservations), which metrics it logs (the report's columns), how its
trials are ranked and whether they can be searched, early-stopped, packed, sharded or promoted.
Nothing outside trainers/recipes/ asks for a stage by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from trainers.memory.terms import StageTerms

if TYPE_CHECKING:
    import torch

    from trainers.config import ExperimentConfig
    from trainers.context import TrialContext
    from trainers.data import DatasetStats, EvalPrompt, PairExample
    from trainers.memory.terms import MethodTerms

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


def no_stage_terms(cfg: "ExperimentConfig", method_terms: "MethodTerms") -> StageTerms:
    return StageTerms()


@dataclass(frozen=True)
class PairTerms(StageTerms):
    """A stage whose micro-batch is preference pairs, both sides padded together in one forward
    (pair_logprobs, the reward model's pair_scores)."""

    def sequences(self, batch: list):
        pairs = [getattr(item, "pair", item) for item in batch]  # DPO's items carry reference log-probs
        return [(len(p.chosen.input_ids),) for p in pairs] + [(len(p.rejected.input_ids),) for p in pairs]


def scores_pairs(cfg: "ExperimentConfig", method_terms: "MethodTerms") -> StageTerms:
    """memory_terms of a stage that scores each preference pair's chosen and rejected answers in
    one forward, in training and in evaluation."""
    return PairTerms(sequences_per_row=2, eval_sequences_per_row=2,
                     note=f"stage {cfg.stage.name}: chosen + rejected = {2 * cfg.train.batch_size} sequences "
                          "per micro-batch")


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
    # What it changes in a training step's memory (trainers.memory.terms.StageTerms), for a config
    # and its method's terms (MethodTerms): sequences per row, models held beside the trained one,
    # the output head, generated tokens. The estimator's input, and so Ray's reservations.
    memory_terms: Callable[["ExperimentConfig", "MethodTerms"], "StageTerms"] = no_stage_terms
    # Its own metric namespaces beyond the contract's eval/ (e.g. ("dpo/",)): the report gives their
    # final values columns.
    metric_prefixes: tuple[str, ...] = ()
    # (metric, "max" | "min"): the final metric that ranks its finished trials (promote's default).
    headline: tuple[str, str] = ("eval/accuracy", "max")
    # Metrics it logs on the eval split every train.eval_every steps and at its end: what sweep
    # searchers and ASHA can decide on.
    periodic_metrics: tuple[str, ...] = ()
    # It can run sharded with train.fsdp (FSDP2 over train.num_workers).
    shards: bool = False

    @property
    def data_formats(self) -> tuple[str, ...]:
        return DATA_FORMATS_OF_KIND[self.data_kind]

    @property
    def promotable(self) -> bool:
        """Its output is a text-generation model that can be registered and served."""
        return self.produces == "policy"


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
    train: Sequence["PairExample"]  # lazy rows of the prepared dataset (trainers/prepared)
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


@dataclass
class PolicyStart:
    """What start_preference_policy set up."""

    tokenizer: object
    data: PreferenceSplits
    method: object  # the MethodSpec that wrapped the model
    model: object
    trainable: int
    total: int


def start_preference_policy(ctx: "TrialContext") -> PolicyStart:
    """The policy-training preference stages' setup: the data first (a bad row fails before the
    model costs anything), then the starting model (the base or stage.init_from merged) with the
    method on top; logs the parameter counts and the data stats."""
    from trainers.methods import METHODS
    from trainers.model import count_parameters
    from trainers.recipes.inputs import load_start
    from trainers.templates import load_chat_tokenizer

    cfg = ctx.cfg
    tokenizer = load_chat_tokenizer(cfg)
    data = load_preference_splits(ctx, tokenizer, with_prompts=True)
    ctx.memory.start()
    method = METHODS[cfg.method.name]
    model = method.prepare(load_start(cfg, ctx.device), cfg)
    trainable, total = count_parameters(model)
    ctx.tracker.log_metrics({"model/trainable_params": trainable, "model/total_params": total,
                             **data.train_stats.as_metrics("train"), **data.data_metrics})
    return PolicyStart(tokenizer, data, method, model, trainable, total)


@dataclass
class PairLogprobs:
    """Summed response log-probs of each pair's chosen and rejected side under a model ([n] each,
    gradients flow), the number of response tokens each sums over, and the tokens read."""

    chosen: "torch.Tensor"
    rejected: "torch.Tensor"
    chosen_tokens: "torch.Tensor"
    rejected_tokens: "torch.Tensor"
    tokens_read: int

    def chosen_nll(self) -> "torch.Tensor":
        """Mean negative log-likelihood per chosen response token (the SFT loss on the chosen side)."""
        return -self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)


def pair_logprobs(model, pairs: list["PairExample"], pad_id: int, device) -> PairLogprobs:
    """Both sides of every pair scored in one forward pass."""
    import torch

    from trainers.data import IGNORE_INDEX
    from trainers.policy import sequence_logprobs

    examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    logps = sequence_logprobs(model, examples, pad_id, device)
    # labels[0] is never predicted (log-probs are read shifted by one): count what the sum covers
    lengths = torch.tensor([sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples],
                           device=logps.device)
    n = len(pairs)
    return PairLogprobs(logps[:n], logps[n:], lengths[:n], lengths[n:], sum(len(e.input_ids) for e in examples))


# Every recipe module registers itself here when trainers.recipes imports it.
RECIPES: dict[str, RecipeSpec] = {}


def register(spec: RecipeSpec) -> RecipeSpec:
    if spec.name in RECIPES:
        raise ValueError(f"recipe {spec.name!r} registered twice")
    RECIPES[spec.name] = spec
    return spec
