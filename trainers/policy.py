"""What the preference stages (reward, rl, dpo) share: response log-probs, reward-model scores,
a frozen reference policy, and the before/after evaluation of a policy on held-out
prompts with known answers.

Sequences are token-id lists built the way training data is (trainers/data.py): prompt ids, then
response ids, then eos when the response ended. A reward model reads its score at the last
response token (`reward_sequence` leaves eos out), so a pair's two sides, and a rollout whether or
not it reached eos, are scored at the same kind of position; cut-off rollouts are handled by the
rl stage's `missing_eos_penalty`.
"""

from __future__ import annotations

import copy
import statistics

from trainers.data import IGNORE_INDEX, EvalPrompt, Example, pad_batch
from trainers.evaluate import exact_match
from trainers.generation import decode, generate
from trainers.parallel import unwrap


def token_logprobs(model, input_ids, attention_mask, labels, position_ids=None, temperature: float = 1.0):
    """(log-prob of each next token, mask of the labelled ones), both [batch, length - 1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, -input_ids.shape[1]:-1].float() / temperature
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * mask, mask


def sequence_logprobs(model, examples: list[Example], pad_id: int, device):
    """Summed log-prob of each example's labelled (response) tokens, [len(examples)]."""
    batch = {k: v.to(device) for k, v in pad_batch(examples, pad_id).items()}
    logps, _ = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return logps.sum(-1)


def reward_sequence(prompt_ids: list[int], response_ids: list[int], eos_id: int) -> list[int]:
    """What a reward model reads: the prompt and the response, without a final eos."""
    if response_ids and response_ids[-1] == eos_id:
        response_ids = response_ids[:-1]
    return prompt_ids + response_ids


def reward_scores(reward_model, sequences: list[list[int]], pad_id: int, device):
    """Scalar score of each token sequence, [len(sequences)] (gradients flow if the model trains)."""
    examples = [Example(ids, ids) for ids in sequences]
    batch = pad_batch(examples, pad_id)
    out = reward_model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits[:, 0].float()


class Reference:
    """Log-probs under the policy as it was before training (the anchor of the KL penalty).

    A PEFT policy is its frozen starting model plus an adapter, so switching the adapter off gives
    the reference for free; any other method (full, BitFit) gets a frozen copy, made before the
    first step.
    """

    def __init__(self, policy):
        import peft

        self.copy = None
        if not isinstance(policy, peft.PeftModel):
            self.copy = copy.deepcopy(policy).requires_grad_(False).eval()

    def token_logprobs(self, policy, *args, **kwargs):
        import torch

        with torch.no_grad():
            if self.copy is not None:
                return token_logprobs(self.copy, *args, **kwargs)
            policy = unwrap(policy)
            with policy.disable_adapter():
                return token_logprobs(policy, *args, **kwargs)


def evaluate_policy(model, tokenizer, prompts: list[EvalPrompt], max_new_tokens: int, batch_size: int, device,
                    reward_model=None, suffix: str = "") -> dict[str, float]:
    """Greedy answers to held-out prompts: exact-match accuracy against the known answers, their
    mean length in tokens (eos included, as rl/response_length) and, with a reward model, its mean
    score (`eval/accuracy{suffix}`, `eval/response_length{suffix}`, `eval/reward_mean{suffix}`)."""
    import torch

    answers, lengths, scores = [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rollouts = generate(model, tokenizer, chunk, max_new_tokens, device)
        answers += [decode(tokenizer, r) for r in rollouts.responses]
        lengths += [len(r) for r in rollouts.responses]
        if reward_model is not None:
            with torch.no_grad():
                sequences = [reward_sequence(p.prompt_ids, r, tokenizer.eos_token_id)
                             for p, r in zip(chunk, rollouts.responses)]
                scores += reward_scores(reward_model, sequences, tokenizer.pad_token_id, device).tolist()
    metrics = {f"eval/accuracy{suffix}": exact_match(answers, prompts),
               f"eval/response_length{suffix}": statistics.fmean(lengths)}
    if reward_model is not None:
        metrics[f"eval/reward_mean{suffix}"] = statistics.fmean(scores)
    return metrics


def policy_evaluation(cfg, tokenizer, prompts: list[EvalPrompt] | None, device, reward_model=None):
    """`evaluate(model, suffix="")` -> evaluate_policy's metrics on `prompts` at the trial's
    answer budget and eval batch size; {} when there are no prompts (no data.eval_file)."""

    def evaluate(model, suffix: str = "") -> dict[str, float]:
        if not prompts:
            return {}
        return evaluate_policy(model, tokenizer, prompts, cfg.data.max_new_tokens, cfg.train.eval_batch_size,
                               device, reward_model, suffix=suffix)

    return evaluate
