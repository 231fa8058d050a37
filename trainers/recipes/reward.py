"""Reward model: a scalar head on the policy, trained so that chosen responses outscore rejected
ones. setup -> train -> evaluate -> save.

The model is the policy in `stage.init_from` (the SFT output, merged; the base model if unset)
loaded as AutoModelForSequenceClassification with num_labels=1: a new linear `score` head reads
the hidden state of the last response token (trainers/policy.py: reward_sequence). The method applies as in SFT (LoRA, full, ...); the head
always trains and is saved with the artifact (PEFT keeps it as a module to save).
Loss (Bradley-Terry): -log sigmoid(r_chosen - r_rejected). Eval: `eval/pairwise_accuracy` (the
share of held-out pairs ranked right) and `eval/reward_margin` (mean r_chosen - r_rejected).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainers.context import TrialContext
from trainers.data import PairExample
from trainers.evaluate import margin_metrics, score_in_batches
from trainers.methods import METHODS
from trainers.model import count_parameters
from trainers.policy import reward_scores, reward_sequence
from trainers.recipes.base import register
from trainers.recipes.base import (RecipeSpec, StageConfig, load_preference_splits, needs_mergeable_method,
                                   scores_pairs)
from trainers.recipes.inputs import load_start
from trainers.templates import load_chat_tokenizer
from trainers.training import train_loop


@dataclass
class RewardConfig(StageConfig):
    name: str = "reward"


def pair_scores(model, pairs: list[PairExample], pad_id: int, eos_id: int, device):
    """(r_chosen, r_rejected), each [len(pairs)], and the tokens read, from one forward over both sides."""
    sequences = [reward_sequence([], e.input_ids, eos_id) for p in pairs for e in (p.chosen, p.rejected)]
    scores = reward_scores(model, sequences[0::2] + sequences[1::2], pad_id, device)
    return scores[:len(pairs)], scores[len(pairs):], sum(len(s) for s in sequences)


def pairwise_loss(pad_id: int, eos_id: int, device):
    import torch.nn.functional as F

    def loss_fn(model, pairs: list[PairExample]):
        chosen, rejected, tokens = pair_scores(model, pairs, pad_id, eos_id, device)
        margin = chosen - rejected
        return -F.logsigmoid(margin).mean(), tokens, {"reward/accuracy": (margin > 0).float().mean().item(),
                                                      "reward/margin": margin.mean().item()}

    return loss_fn


def evaluate_pairs(model, pairs: list[PairExample], pad_id: int, eos_id: int, batch_size: int,
                   device) -> dict[str, float]:
    def margins(model, chunk):
        chosen, rejected, _ = pair_scores(model, chunk, pad_id, eos_id, device)
        return (chosen - rejected).tolist()

    return margin_metrics(score_in_batches(model, pairs, batch_size, margins))


def train_head(model) -> None:
    """Unfreeze the new score head (PEFT methods already train it as a module to save)."""
    import peft

    if isinstance(model, peft.PeftModel):
        return
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no score/classifier head to train")
    head.requires_grad_(True)


def run(ctx: TrialContext) -> dict[str, float]:
    cfg, device = ctx.cfg, ctx.device

    # --- setup: data first, so a bad row fails before the model costs anything
    tokenizer = load_chat_tokenizer(cfg)
    data = load_preference_splits(ctx, tokenizer)
    pad_id, eos_id, batch = tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.train.eval_batch_size

    ctx.memory.start()
    spec = METHODS[cfg.method.name]
    base = load_start(cfg, device, task="sequence_classification")
    base.config.pad_token_id = pad_id  # the score is read at the last non-pad token
    model = spec.prepare(base, cfg)
    train_head(model)
    trainable, total = count_parameters(model)
    ctx.tracker.log_metrics({"model/trainable_params": trainable, "model/total_params": total,
                             **data.train_stats.as_metrics("train"), **data.data_metrics})

    def evaluate(model) -> dict[str, float]:
        return evaluate_pairs(model, data.eval_pairs, pad_id, eos_id, batch, device) if data.eval_pairs else {}

    metrics: dict[str, float] = {}
    if ctx.dist.is_main and data.eval_pairs:
        metrics["eval/pairwise_accuracy_init"] = evaluate(model)["eval/pairwise_accuracy"]

    # --- train
    stats = train_loop(ctx.wrap_parallel(model), data.train, cfg.train, pad_id, device, ctx.dist, ctx.tracker,
                       checkpoints=ctx.checkpoints, faults=ctx.faults, loss_fn=pairwise_loss(pad_id, eos_id, device),
                       step_cost=ctx.step_cost(model))
    metrics.update(stats.as_metrics(trainable, total))

    # --- evaluate and save (rank 0; the others wait at the barrier)
    return ctx.finish(spec, model, tokenizer, metrics, evaluate)


def memory_terms(cfg, method_terms):
    """Both answers of a pair in one forward, through a scalar head instead of the vocabulary."""
    return dataclasses.replace(scores_pairs(cfg, method_terms), scalar_head=True)


register(RecipeSpec(name="reward", config_cls=RewardConfig, run=run, data_kind="preference",
                    produces="reward_model", inputs={"init_from": "policy"},
                    check_combination=needs_mergeable_method("reward"), memory_terms=memory_terms,
                    metric_prefixes=("reward/",), headline=("eval/pairwise_accuracy", "max"),
                    summary="reward model: scalar head on the policy, pairwise (Bradley-Terry) loss"))
