"""Evaluation of a causal LM on held-out data: token loss, perplexity, exact-match accuracy.

Exact match: greedy generation from the prompt, cut at the first eos or newline, stripped,
compared with the expected answer. This is the task accuracy that fine-tuning should raise.
"""

from __future__ import annotations

import math

from trainers.data import IGNORE_INDEX, EvalPrompt, Example, pad_batch
from trainers.generation import decode, generate, has_virtual_tokens
from trainers.parallel import unwrap


def score_in_batches(model, items: list, batch_size: int, score) -> list:
    """`score(model, chunk)` -> one value per item of the chunk, over `items` in chunks of
    `batch_size`, with the (unwrapped) model in eval mode and no gradients; its mode after is the
    one it had before (a frozen reference stays in eval mode)."""
    import torch

    model = unwrap(model)
    was_training = model.training
    model.eval()
    values: list = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            values += score(model, items[start:start + batch_size])
    model.train(was_training)
    return values


def margin_metrics(margins: list[float]) -> dict[str, float]:
    """Held-out preference pairs ranked by a (reward model's or implicit) score margin
    chosen - rejected: the share ranked right and the mean margin."""
    return {"eval/pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
            "eval/reward_margin": sum(margins) / len(margins)}


def eval_loss(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Mean cross-entropy over all trained (response) tokens of the split."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(examples[start:start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            # Prefix/prompt tuning prepend virtual tokens to the logits: keep the last positions.
            logits = logits[:, -labels.shape[1]:, :]
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
            shift_labels = labels[:, 1:].reshape(-1)
            total += F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def normalise_answer(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def generate_answers(model, tokenizer, prompts: list[EvalPrompt], batch_size: int, max_new_tokens: int,
                     device) -> list[str]:
    """Greedy completions of the prompts (in their order), decoded up to eos.

    A model with virtual tokens (prefix/prompt/P-tuning) gets batches of prompts of one length, so
    no row is padded: its virtual tokens would sit before the left padding, away from the prompt,
    and change the output (prefix tuning's logits by ~0.4 on a tiny model).
    """
    answers: list[str] = [""] * len(prompts)
    batches: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        batches.setdefault(len(prompt.prompt_ids) if has_virtual_tokens(model) else 0, []).append(index)
    for _, indices in sorted(batches.items()):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            rollouts = generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, device)
            for i, response in zip(chunk, rollouts.responses):
                answers[i] = decode(tokenizer, response)
    return answers


def exact_match(predictions: list[str], prompts: list[EvalPrompt]) -> float:
    hits = sum(normalise_answer(p) == normalise_answer(q.answer) for p, q in zip(predictions, prompts))
    return hits / max(len(prompts), 1)


def evaluate(model, tokenizer, examples: list[Example], prompts: list[EvalPrompt], batch_size: int,
             max_new_tokens: int, device) -> dict[str, float]:
    model = unwrap(model)
    loss = eval_loss(model, examples, batch_size, tokenizer.pad_token_id, device)
    predictions = generate_answers(model, tokenizer, prompts, batch_size, max_new_tokens, device)
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/accuracy": exact_match(predictions, prompts),
    }
