"""Odds-ratio preference optimisation (Hong et al. 2024, ORPO): supervised fine-tuning and
preference learning in one stage, from the base model, with no reference model (nothing frozen to
hold or score beforehand) and no SFT stage before it. setup -> evaluate the start -> train ->
evaluate -> save.

With p(y) = exp(mean log-prob per response token) (a length-normalised likelihood) and
odds(y) = p / (1 - p), the loss of a batch of pairs is

    NLL of the chosen responses (per token, as the sft stage's loss)
    + beta * mean over pairs of -log sigmoid(log odds(chosen) - log odds(rejected))

The NLL teaches the chosen answers; the odds-ratio term makes the rejected ones relatively less
likely, and, unlike DPO's unbounded margin, saturates once they are. Its values equal TRL's
ORPOTrainer on the same pairs and model (tests/test_recipes.py) but for one choice: TRL's NLL also
counts the prompt tokens, ours only the response (the paper's L_SFT, and what the sft stage
trains on).

Per step (TRL's names in brackets): `orpo/log_odds_ratio` (mean log sigmoid of the log odds
ratio [log_odds_ratio]: -0.69 when both sides are as likely, towards 0 as chosen wins),
`orpo/log_odds_chosen` (mean log odds ratio [log_odds_chosen]), `orpo/chosen_reward`,
`orpo/rejected_reward` (beta * mean token log-prob [rewards/chosen, rewards/rejected]),
`orpo/reward_margin`, `orpo/reward_accuracy` (share of pairs whose chosen reward is higher
[rewards/accuracies]) and `orpo/chosen_nll` [nll_loss, which counts the prompt too]; the loss is
`train/loss`. Final, on held-out pairs and prompts: `eval/reward_margin` and
`eval/pairwise_accuracy` (that reward ranking the pairs), `eval/accuracy` (greedy answers vs the
chosen ones) and `eval/response_length`, each also for the starting model
(`eval/accuracy_init`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainers.context import TrialContext
from trainers.data import PairExample
from trainers.evaluate import margin_metrics, score_in_batches
from trainers.policy import policy_evaluation
from trainers.recipes.base import (PairLogprobs, RecipeSpec, StageConfig, needs_mergeable_method, pair_logprobs,
                                   register, scores_pairs, start_preference_policy)
from trainers.training import train_loop

# A mean log-prob of exactly 0 (every response token certain, which float32 log-softmax reaches)
# has infinite odds and an infinite gradient; this cap (p <= 1 - 1e-6) keeps both finite and stops
# the gradient of a side that is already certain.
MAX_MEAN_LOGPROB = -1e-6


@dataclass
class OrpoConfig(StageConfig):
    name: str = "orpo"
    # Weight of the odds-ratio term beside the chosen answers' NLL (the paper's lambda, TRL's beta):
    # higher pushes the rejected answers down harder; lower is closer to SFT on the chosen answers.
    beta: float = 0.1

    def check(self) -> list[tuple[str, str]]:
        return [] if self.beta > 0 else [("beta", f"must be > 0 (0 is sft on the chosen answers), got {self.beta}")]


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    import torch

    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(mean_logprob):
    """log(p / (1 - p)) of p = exp(mean_logprob)."""
    x = mean_logprob.clamp(max=MAX_MEAN_LOGPROB)
    return x - log1mexp(x)


@dataclass
class OddsRatio:
    logps: PairLogprobs
    chosen_mean: object  # mean token log-prob of each chosen response, [n]
    rejected_mean: object
    log_odds_ratio: object  # log odds(chosen) - log odds(rejected), [n]


def odds_ratio(model, pairs: list[PairExample], pad_id: int, device) -> OddsRatio:
    logps = pair_logprobs(model, pairs, pad_id, device)
    chosen, rejected = logps.chosen / logps.chosen_tokens, logps.rejected / logps.rejected_tokens
    return OddsRatio(logps, chosen, rejected, log_odds(chosen) - log_odds(rejected))


def orpo_loss(beta: float, pad_id: int, device):
    import torch.nn.functional as F

    def loss_fn(model, pairs: list[PairExample]):
        terms = odds_ratio(model, pairs, pad_id, device)
        nll = terms.logps.chosen_nll()
        preference = F.logsigmoid(terms.log_odds_ratio)
        loss = nll - beta * preference.mean()
        chosen, rejected = beta * terms.chosen_mean.detach(), beta * terms.rejected_mean.detach()
        return loss, terms.logps.tokens_read, {
            "orpo/chosen_nll": nll.item(),
            "orpo/log_odds_ratio": preference.mean().item(),
            "orpo/log_odds_chosen": terms.log_odds_ratio.mean().item(),
            "orpo/chosen_reward": chosen.mean().item(),
            "orpo/rejected_reward": rejected.mean().item(),
            "orpo/reward_margin": (chosen - rejected).mean().item(),
            "orpo/reward_accuracy": (chosen > rejected).float().mean().item(),
        }

    return loss_fn


def evaluate_margins(model, pairs: list[PairExample], beta: float, pad_id: int, batch_size: int,
                     device) -> dict[str, float]:
    def margins(model, chunk):
        terms = odds_ratio(model, chunk, pad_id, device)
        return (beta * (terms.chosen_mean - terms.rejected_mean)).tolist()

    return margin_metrics(score_in_batches(model, pairs, batch_size, margins))


def run(ctx: TrialContext) -> dict[str, float]:
    cfg, stage, device = ctx.cfg, ctx.cfg.stage, ctx.device

    # --- setup: data, then the starting model (the base unless stage.init_from) with the method on top
    start = start_preference_policy(ctx)
    tokenizer, data, model = start.tokenizer, start.data, start.model
    pad_id, batch = tokenizer.pad_token_id, cfg.train.eval_batch_size

    # --- the starting model's answers (rank 0)
    answers = policy_evaluation(cfg, tokenizer, data.eval_prompts, device)
    metrics: dict[str, float] = {}
    if ctx.dist.is_main:
        metrics.update(answers(model, suffix="_init"))

    # --- train
    stats = train_loop(ctx.wrap_parallel(model), data.train, cfg.train, pad_id, device, ctx.dist, ctx.tracker,
                       checkpoints=ctx.checkpoints, faults=ctx.faults, loss_fn=orpo_loss(stage.beta, pad_id, device),
                       step_cost=ctx.step_cost(model))
    metrics.update(stats.as_metrics(start.trainable, start.total))

    # --- evaluate and save (rank 0; the others wait at the barrier)
    def evaluate(model) -> dict[str, float]:
        margins = evaluate_margins(model, data.eval_pairs, stage.beta, pad_id, batch, device) if data.eval_pairs else {}
        return {**margins, **answers(model)}

    return ctx.finish(start.method, model, tokenizer, metrics, evaluate)


register(RecipeSpec(name="orpo", config_cls=OrpoConfig, run=run, data_kind="preference",
                    check_combination=needs_mergeable_method("orpo"), memory_terms=scores_pairs,
                    metric_prefixes=("orpo/",),
                    summary="odds-ratio preference optimisation: SFT and preference in one stage, no reference"))
