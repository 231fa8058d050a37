"""The one generator of the project: responses to a batch of prompts, greedy (evaluation) or
sampled (the rl stage's rollouts), as token ids the policy can score again.

Prompts of different lengths are left-padded; position ids count only real tokens, as
`model.generate` counts them, so scoring a rollout (trainers/policy.py: token_logprobs) sees
each sequence as it would alone. Prefix/prompt/P-tuning put their virtual tokens before any
left padding, which shifts them away from the prompt: evaluation batches such models' prompts
by length (trainers/evaluate.py: generate_answers).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.data import IGNORE_INDEX, EvalPrompt
from trainers.parallel import unwrap


@dataclass
class Rollouts:
    """Left-padded prompts + generated responses, as one batch the policy can score."""

    input_ids: object  # [n, prompt_width + response_width]
    attention_mask: object  # prompt tokens and response tokens up to and including the first eos
    labels: object  # response tokens only (IGNORE_INDEX elsewhere)
    position_ids: object  # as generate() counted them (left padding shifts them)
    responses: list[list[int]]  # each response's ids, eos included when it was generated


def generate(model, tokenizer, prompts: list[EvalPrompt], max_new_tokens: int, device, sample: bool = False,
             temperature: float = 1.0) -> Rollouts:
    """Responses to `prompts`: greedy, or sampled at `temperature` (no top-k/top-p: the policy's own
    distribution, whose log-probs the policy gradient uses). The model's train/eval mode is kept."""
    import torch

    model = unwrap(model)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p.prompt_ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p.prompt_ids):] = torch.tensor(p.prompt_ids)
        prompt_mask[i, width - len(p.prompt_ids):] = 1
    options = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        # With a KV cache, generate() (transformers 5 + peft 0.21) drops the prefix-tuning prefix,
        # which PEFT passes as past_key_values: decode prefix models without the cache.
        out = model.generate(input_ids=input_ids.to(device), attention_mask=prompt_mask.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id,
                             use_cache=not is_prefix_tuned(model), **options).cpu()
    model.train(was_training)
    generated = out[:, width:]
    response_mask = torch.zeros_like(generated)
    responses = []
    for i, row in enumerate(generated.tolist()):
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        response_mask[i, :n] = 1
        responses.append(row[:n])
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    labels = torch.where(torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1).bool(), out,
                         torch.full_like(out, IGNORE_INDEX))
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return Rollouts(out.to(device), attention.to(device), labels.to(device), position_ids.to(device), responses)


def decode(tokenizer, ids: list[int]) -> str:
    """A response's text, without its eos."""
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def is_prefix_tuned(model) -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return any(str(getattr(c, "peft_type", "")).endswith("PREFIX_TUNING") for c in configs.values())


def has_virtual_tokens(model) -> bool:
    """Prefix, prompt and P-tuning: PEFT prepends learned tokens to every sequence."""
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "num_virtual_tokens", None) for c in configs.values())
