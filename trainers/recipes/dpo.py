"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from preference pairs
directly, no reward model, no sampling. setup -> evaluate the start -> train -> evaluate -> save.

The policy is `stage.init_from` (the SFT output, merged) with a fresh adapter of the method on top;
the reference is that same starting policy, whose log-probs of every pair are computed once before
the first step (every mergeable method starts as the identity, so the untrained policy *is* the
reference). Loss: -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi/ref the summed
response log-probs of the chosen (c) and rejected (r) sides; beta * (pi - ref) is each side's
implicit reward. DPO can widen the margin by pushing both sides down, the chosen answer too;
`stage.nll_weight` adds the chosen side's per-token negative log-likelihood (RPO, Pang et al.
2024; TRL's rpo_alpha), which keeps the chosen answers likely.

Per step: `dpo/reward_margin` (implicit reward of chosen minus rejected), `dpo/reward_accuracy`
(share of pairs with a positive margin), `dpo/chosen_reward`, `dpo/rejected_reward`,
`dpo/chosen_nll`. Final, on held-out pairs and prompts: `eval/reward_margin`,
`eval/pairwise_accuracy` (the implicit reward model ranking the pairs, comparable with a reward
stage's), `eval/accuracy` (greedy answers vs the chosen ones) and `eval/response_length`, each
also for the starting policy (`eval/accuracy_init`, ...); with `stage.reward_from`, also the
reward model's mean score of the answers before and after (`eval/reward_mean[_init]`).
"""

from __future__ import annotations

import dataclasses
from array import array
from dataclasses import dataclass
from typing import Optional, Sequence

from trainers.context import TrialContext
from trainers.data import PairExample
from trainers.evaluate import margin_metrics, score_in_batches
from trainers.policy import policy_evaluation, sequence_logprobs
from trainers.recipes.base import register
from trainers.recipes.base import (RecipeSpec, StageConfig, needs_mergeable_method, pair_logprobs, scores_pairs,
                                   start_preference_policy)
from trainers.recipes.inputs import load_reward_model
from trainers.training import train_loop


@dataclass
class DpoConfig(StageConfig):
    name: str = "dpo"
    # Strength of the implicit KL anchor to the starting policy: higher stays closer to it (smaller
    # log-prob moves for the same loss); lower lets it move further from it.
    beta: float = 0.1
    # Weight of the chosen answers' NLL beside the DPO loss (RPO): > 0 keeps them likely while the
    # margin grows; 0 is plain DPO.
    nll_weight: float = 0.0
    # Optional output dir of a reward stage: only scores the answers before and after training.
    reward_from: Optional[str] = None

    def check(self) -> list[tuple[str, str]]:
        problems = [] if self.beta > 0 else [("beta", f"must be > 0, got {self.beta}")]
        if self.nll_weight < 0:
            problems.append(("nll_weight", f"must be >= 0, got {self.nll_weight}"))
        return problems


@dataclass
class ScoredPair:
    pair: PairExample
    ref_chosen: float
    ref_rejected: float


class ScoredPairs(Sequence):
    """The pairs (lazy prepared rows) with their reference log-probs: two floats a pair in memory."""

    def __init__(self, pairs: Sequence[PairExample], ref_chosen: list[float], ref_rejected: list[float]):
        self.pairs, self.ref_chosen, self.ref_rejected = pairs, ref_chosen, ref_rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return ScoredPair(self.pairs[index], self.ref_chosen[index], self.ref_rejected[index])


def score_reference(model, pairs: Sequence[PairExample], pad_id: int, batch_size: int, device) -> ScoredPairs:
    """Each pair with its summed response log-probs under the (untrained) policy."""

    def score(model, chunk):
        logps = sequence_logprobs(model, [p.chosen for p in chunk] + [p.rejected for p in chunk], pad_id, device)
        return list(zip(logps[:len(chunk)].tolist(), logps[len(chunk):].tolist()))

    scores = score_in_batches(model, pairs, batch_size, score)
    return ScoredPairs(pairs, array("d", (c for c, _ in scores)), array("d", (r for _, r in scores)))


def implicit_rewards(model, items: list[ScoredPair], beta: float, pad_id: int, device):
    """(beta * (pi_c - ref_c), beta * (pi_r - ref_r)), each [len(items)], the chosen side's mean
    token NLL, and the tokens read."""
    import torch

    logps = pair_logprobs(model, [s.pair for s in items], pad_id, device)
    ref_chosen = torch.tensor([s.ref_chosen for s in items], device=logps.chosen.device)
    ref_rejected = torch.tensor([s.ref_rejected for s in items], device=logps.chosen.device)
    return (beta * (logps.chosen - ref_chosen), beta * (logps.rejected - ref_rejected), logps.chosen_nll(),
            logps.tokens_read)


def dpo_loss(beta: float, nll_weight: float, pad_id: int, device):
    import torch.nn.functional as F

    def loss_fn(model, items: list[ScoredPair]):
        chosen, rejected, nll, tokens = implicit_rewards(model, items, beta, pad_id, device)
        margin = chosen - rejected
        loss = -F.logsigmoid(margin).mean() + nll_weight * nll
        return loss, tokens, {
            "dpo/chosen_nll": nll.item(),
            "dpo/reward_margin": margin.mean().item(),
            "dpo/reward_accuracy": (margin > 0).float().mean().item(),
            "dpo/chosen_reward": chosen.mean().item(),
            "dpo/rejected_reward": rejected.mean().item(),
        }

    return loss_fn


def evaluate_margins(model, items: list[ScoredPair], beta: float, pad_id: int, batch_size: int,
                     device) -> dict[str, float]:
    def margins(model, chunk):
        chosen, rejected, _, _ = implicit_rewards(model, chunk, beta, pad_id, device)
        return (chosen - rejected).tolist()

    return margin_metrics(score_in_batches(model, items, batch_size, margins))


def run(ctx: TrialContext) -> dict[str, float]:
    cfg, stage, device = ctx.cfg, ctx.cfg.stage, ctx.device

    # --- setup: data, then the starting policy with the method on top
    start = start_preference_policy(ctx)
    tokenizer, data, model = start.tokenizer, start.data, start.model
    pad_id, batch = tokenizer.pad_token_id, cfg.train.eval_batch_size
    reward_model = load_reward_model(cfg, stage.reward_from, device, pad_id) if stage.reward_from else None

    # --- the reference log-probs, and the starting policy's answers (rank 0)
    scored = score_reference(model, data.train, pad_id, batch, device)
    scored_eval = score_reference(model, data.eval_pairs, pad_id, batch, device) if data.eval_pairs else None
    answers = policy_evaluation(cfg, tokenizer, data.eval_prompts, device, reward_model)
    metrics: dict[str, float] = {}
    if ctx.dist.is_main:
        metrics.update(answers(model, suffix="_init"))

    # --- train
    loss_fn = dpo_loss(stage.beta, stage.nll_weight, pad_id, device)
    stats = train_loop(ctx.wrap_parallel(model), scored, cfg.train, pad_id, device, ctx.dist, ctx.tracker,
                       checkpoints=ctx.checkpoints, faults=ctx.faults, loss_fn=loss_fn, step_cost=ctx.step_cost(model))
    metrics.update(stats.as_metrics(start.trainable, start.total))

    # --- evaluate and save (rank 0; the others wait at the barrier)
    def evaluate(model) -> dict[str, float]:
        margins = evaluate_margins(model, scored_eval, stage.beta, pad_id, batch, device) if scored_eval else {}
        return {**margins, **answers(model)}

    return ctx.finish(start.method, model, tokenizer, metrics, evaluate)


def memory_terms(cfg, method_terms):
    """Both sides of a pair in one forward; the reference's log-probs of each pair, one no-grad
    forward of the untrained policy computed before the first step, charged to the steps that use
    them (an epoch of steps pays the whole reference pass)."""
    return dataclasses.replace(scores_pairs(cfg, method_terms), reference_forwards=1)


register(RecipeSpec(name="dpo", config_cls=DpoConfig, run=run, data_kind="preference",
                    inputs={"init_from": "policy", "reward_from": "reward_model"},
                    check_combination=needs_mergeable_method("dpo"), memory_terms=memory_terms,
                    metric_prefixes=("dpo/",),
                    summary="direct preference optimisation against the frozen starting policy"))
