"""On-policy RL from a reward model (GRPO, Shao et al. 2024): the policy answers prompts, the
trained reward model scores the answers, and the policy moves towards the better ones while a KL
penalty holds it near where it started. setup -> evaluate the start -> train -> evaluate -> save.

Each micro-step takes `train.batch_size` prompts and samples `stage.num_generations` responses to
each (up to `data.max_new_tokens` tokens); a response's advantage is its reward minus the mean
reward of its prompt's group (divided by the group's std with `stage.scale_rewards`), so no value
model is needed. One gradient step per batch of rollouts keeps it on-policy (the PPO ratio is 1
and needs no clipping). Loss per response token: -advantage * log pi(token) + kl_coef * KL, with
KL the k3 estimate exp(ref - logp) - (ref - logp) - 1 against the starting policy (`stage.init_from`
merged: for a PEFT method the policy with its adapter switched off).

    rollouts per optimizer step = train.batch_size * stage.num_generations * train.grad_accum

Per step: `rl/reward_mean` (after `stage.missing_eos_penalty`), `rl/reward_std`, `rl/kl` (per
token), `rl/response_length` (tokens, eos included), `rl/accuracy` (rollouts equal to the known
answer). Final, on held-out prompts with
greedy answers: `eval/reward_mean`, `eval/accuracy` and `eval/response_length`, and the same
for the starting policy (`eval/reward_mean_init`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from trainers.context import TrialContext
from trainers.data import EvalPrompt
from trainers.evaluate import normalise_answer
from trainers.generation import decode, generate
from trainers.memory.terms import Cost, StageTerms
from trainers.methods import METHODS
from trainers.model import count_parameters
from trainers.policy import Reference, policy_evaluation, reward_scores, reward_sequence, token_logprobs
from trainers.recipes.base import RecipeSpec, StageConfig, needs_mergeable_method, register
from trainers.recipes.inputs import load_reward_model, load_start
from trainers.templates import load_chat_tokenizer
from trainers.training import train_loop


@dataclass
class RlConfig(StageConfig):
    name: str = "rl"
    # Output dir of a reward stage: its model scores the rollouts (a pipeline fills it in).
    reward_from: Optional[str] = None
    # Responses sampled per prompt; the group's mean reward is each one's baseline. More = less
    # noisy advantages, proportionally more generation and compute.
    num_generations: int = 8
    temperature: float = 1.0  # of the rollouts: lower explores less
    # Weight of the KL penalty to the starting policy: higher stays closer to it (less reward
    # hacking, slower gains).
    kl_coef: float = 0.05
    # Divide advantages by the group's reward std (GRPO); false keeps raw differences (Dr. GRPO),
    # which weighs near-unanimous groups less.
    scale_rewards: bool = True
    # Subtracted from the reward of a response cut off at data.max_new_tokens without eos: a reward
    # model reads a cut-off answer like a finished one and a policy learns to ramble (TRL's
    # missing_eos_penalty). 0 = none.
    missing_eos_penalty: float = 0.0

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.reward_from:
            problems.append(("reward_from", "required: the output dir of a reward stage (a pipeline that runs "
                                            "this stage after a reward stage fills it in)"))
        if self.num_generations < 2:
            problems.append(("num_generations", f"must be >= 2 (the group is the baseline), got {self.num_generations}"))
        if not self.temperature > 0:
            problems.append(("temperature", f"must be > 0, got {self.temperature}"))
        if self.kl_coef < 0:
            problems.append(("kl_coef", f"must be >= 0, got {self.kl_coef}"))
        if self.missing_eos_penalty < 0:
            problems.append(("missing_eos_penalty", f"must be >= 0, got {self.missing_eos_penalty}"))
        return problems


def group_advantages(rewards, group_size: int, scale_rewards: bool):
    """Each response's reward minus its prompt group's mean (over the std + 1e-4 with scale_rewards),
    [len(rewards), 1]; `rewards` holds each prompt's group_size responses one after another."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1, 1)


def policy_loss(model, reference: Reference, rollouts, advantages, kl_coef: float, temperature: float):
    """(loss, per-token KL, response mask): -advantage * log pi(token) + kl_coef * KL per response
    token, averaged over each response's tokens, then over the responses.

    Written as REINFORCE (its value is -A log pi); TRL's GRPOTrainer writes the same objective as a
    PPO ratio pi / pi_old, which is 1 on-policy (its value is -A): the gradients are the same
    (tests/test_recipes.py compares them). The KL term is GRPO's k3 penalty as published: its
    gradient leaves out the score-function part KL * grad log pi that TRL adds by default
    (`use_bias_correction_kl`): 2.7% of the gradient on that test's batch (kl 0.014, kl_coef 0.3)."""
    batch = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels, rollouts.position_ids)
    logps, mask = token_logprobs(model, *batch, temperature=temperature)
    ref_logps, _ = reference.token_logprobs(model, *batch, temperature=temperature)
    delta = (ref_logps - logps) * mask
    kl = (delta.exp() - delta - 1) * mask
    per_token = -advantages * logps + kl_coef * kl
    lengths = mask.sum(dim=1).clamp(min=1)
    return ((per_token * mask).sum(dim=1) / lengths).mean(), kl, mask


def grpo_loss(stage: RlConfig, reference: Reference, reward_model, tokenizer, max_new_tokens: int, device):
    """The loss of one micro-step: sample, score, and weigh each response's log-prob by its advantage."""
    import torch

    group_size = stage.num_generations

    def loss_fn(model, prompts: list[EvalPrompt]):
        group = [p for p in prompts for _ in range(group_size)]
        rollouts = generate(model, tokenizer, group, max_new_tokens, device, sample=True, temperature=stage.temperature)
        with torch.no_grad():
            sequences = [reward_sequence(p.prompt_ids, r, tokenizer.eos_token_id)
                         for p, r in zip(group, rollouts.responses)]
            rewards = reward_scores(reward_model, sequences, tokenizer.pad_token_id, device)
            unfinished = torch.tensor([not r or r[-1] != tokenizer.eos_token_id for r in rollouts.responses],
                                      device=rewards.device)
            rewards = rewards - stage.missing_eos_penalty * unfinished.float()
        advantages = group_advantages(rewards, group_size, stage.scale_rewards)
        loss, kl, mask = policy_loss(model, reference, rollouts, advantages, stage.kl_coef, stage.temperature)

        answers = [normalise_answer(decode(tokenizer, r)) for r in rollouts.responses]
        correct = [a == normalise_answer(p.answer) for a, p in zip(answers, group)]
        return loss, int(rollouts.attention_mask.sum()), {
            "rl/reward_mean": rewards.mean().item(),
            "rl/reward_std": rewards.view(-1, group_size).std(dim=1).mean().item(),
            "rl/kl": (kl.sum() / mask.sum().clamp(min=1)).item(),
            "rl/response_length": mask.sum(dim=1).float().mean().item(),
            "rl/accuracy": sum(correct) / len(correct),
        }

    return loss_fn


def run(ctx: TrialContext) -> dict[str, float]:
    cfg, stage, device = ctx.cfg, ctx.cfg.stage, ctx.device

    # --- setup: data first, so a bad row fails before the model costs anything
    tokenizer = load_chat_tokenizer(cfg)
    data = ctx.stage_data(tokenizer)  # prompts tokenized once per distinct input (trainers/prepared)
    prompts, prompt_stats = data.train.prompts(), data.train.stats
    eval_prompts = data.eval["prompts"].prompts() if data.eval else None
    data_metrics = data.ready(lambda: prompts[0])

    ctx.memory.start()
    spec = METHODS[cfg.method.name]
    model = spec.prepare(load_start(cfg, device), cfg)
    reference = Reference(model)
    reward_model = load_reward_model(cfg, stage.reward_from, device, tokenizer.pad_token_id)
    trainable, total = count_parameters(model)
    ctx.tracker.log_metrics({"model/trainable_params": trainable, "model/total_params": total,
                             **prompt_stats.as_metrics("train"), **data_metrics})
    answers = policy_evaluation(cfg, tokenizer, eval_prompts, device, reward_model)
    metrics: dict[str, float] = {}
    if ctx.dist.is_main:
        metrics.update(answers(model, suffix="_init"))

    # --- train
    loss_fn = grpo_loss(stage, reference, reward_model, tokenizer, cfg.data.max_new_tokens, device)
    stats = train_loop(ctx.wrap_parallel(model), prompts, cfg.train, tokenizer.pad_token_id, device, ctx.dist, ctx.tracker,
                       checkpoints=ctx.checkpoints, faults=ctx.faults, loss_fn=loss_fn, step_cost=ctx.step_cost(model))
    metrics.update(stats.as_metrics(trainable, total))

    # --- evaluate and save (rank 0; the others wait at the barrier)
    return ctx.finish(spec, model, tokenizer, metrics, answers)


@dataclass(frozen=True)
class RolloutTerms(StageTerms):
    """Each prompt of a micro-batch sampled num_generations times, the rollouts scored by a reward
    model and by the reference, then trained on."""

    def sequences(self, batch: list):
        return [(len(p.prompt_ids),) for p in batch for _ in range(self.sequences_per_row)]

    def step_flops(self, model, rows):
        """Sampling up to data.max_new_tokens (an upper bound: a batch stops early only once every
        rollout has ended), the reward model's forward of prompt + answer, the reference's forward
        (the adapter switched off, or a frozen copy: the base alone either way), and the policy's
        forward and backward of the left-padded rollouts."""
        prompts, new = [row[0] for row in rows], self.generated_tokens
        rollouts = [(max(prompts) + new,)] * len(rows)
        flops = (model.generate(prompts, new) + model.scorer().forward([(p + new,) for p in prompts])
                 + model.frozen().forward(rollouts) + model.train(rollouts))
        return Cost(flops, len(rows) * rollouts[0][0])


def memory_terms(cfg, method_terms):
    """Each prompt becomes stage.num_generations answers of up to data.max_new_tokens; a reward
    model as large as the policy scores them, and when the method trains the base's own tensors
    (no adapter to switch off for the reference) a frozen copy of the start is the KL reference."""
    own_tensors = method_terms.storage == "base"
    n, new = cfg.stage.num_generations, cfg.data.max_new_tokens
    return RolloutTerms(sequences_per_row=n, generated_tokens=new, model_copies=3 if own_tensors else 2,
                        note=f"stage {cfg.stage.name}: {cfg.train.batch_size * n} rollouts of prompt + {new} new "
                             "tokens per micro-batch, and a reward model as large as the policy"
                             + (" and a frozen reference copy" if own_tensors else ""))


register(RecipeSpec(name="rl", config_cls=RlConfig, run=run, data_kind="prompts",
                    inputs={"init_from": "policy", "reward_from": "reward_model"},
                    check_combination=needs_mergeable_method("rl"), memory_terms=memory_terms,
                    metric_prefixes=("rl/",),
                    summary="on-policy RL (GRPO) against a trained reward model, KL to the starting policy"))
