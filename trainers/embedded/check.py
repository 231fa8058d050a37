"""Measure that the embedded task does its job (not a unit test: it trains, ~5 min on one core).

    python -m trainers.embedded check [--dir DIR] [--steps N] [--ranks 1 8 16] [--skip-full]

It reports, on instruct_eval (facts held out of instruct_train):
- the base's knowledge probe: completing a corpus-style sentence ("mira lives in the city of"),
  which shows the held-out facts are in the base;
- the base's exact match with the instruction template (should be low: the format is new);
- exact match and response-only eval loss after LoRA at each rank and after full fine-tuning,
  all with the same budget (steps, batch, one CPU thread) and seconds per step.
Exact match: greedy decoding of up to 8 tokens, cut at eos or newline, stripped, compared to output.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from trainers.embedded import world as W

BATCH_SIZE = 16
STEPS = 250
LORA_LR = 2e-3
FULL_LR = 5e-4
MAX_NEW_TOKENS = 8

PROBES = {
    "city": "{p} lives in the city of",
    "color": "{p} likes the color",
    "pet": "{p} has a pet",
    "job": "{p} works as a",
    "after": "the number after {a} is",
    "before": "the number before {a} is",
    "plus": "{a} plus {b} is",
}


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row; labels are -100 on the prompt so only the response is learned."""
    out = []
    for row in rows:
        prompt = tokenizer(W.format_prompt(row["instruction"], row.get("input", "")))["input_ids"]
        response = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + response, [-100] * len(prompt) + response))
    return out


def collate(examples, pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return ids, labels, mask


def eval_loss(model, examples, pad_id: int) -> float:
    """Mean cross-entropy per response token."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            ids, labels, mask = collate(examples[i : i + 64], pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += loss.item()
            count += int((target != -100).sum())
    return total / count


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    texts = []
    with torch.no_grad():
        for i in range(0, len(prompts), 64):
            batch = tokenizer(prompts[i : i + 64], return_tensors="pt", padding=True)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, batch["input_ids"].shape[1]:]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return texts


def exact_match(model, tokenizer, rows: list[dict]) -> float:
    prompts = [W.format_prompt(r["instruction"], r.get("input", "")) for r in rows]
    answers = [t.split("\n")[0].strip() for t in greedy(model, tokenizer, prompts)]
    return sum(a == r["output"] for a, r in zip(answers, rows)) / len(rows)


def knowledge_probe(model, tokenizer, world: W.World) -> dict[str, float]:
    """Per kind: does the base complete a corpus-style sentence about a held-out fact correctly?"""
    _, eval_facts = W.split_facts(world)
    prompts, answers, kinds = [], [], []
    for f in eval_facts:
        a, b = (f.key + ("",))[:2]
        prompts.append(PROBES[f.kind].format(p=a, a=a, b=b))
        answers.append(f.answer)
        kinds.append(f.kind)
    outs = greedy(model, tokenizer, prompts, max_new_tokens=4)
    result: dict[str, list[bool]] = {}
    for kind, out, answer in zip(kinds, outs, answers):
        words = out.split()
        result.setdefault(kind, []).append(bool(words) and words[0] == answer)
    return {k: round(sum(v) / len(v), 3) for k, v in result.items()}


def finetune(base_dir: Path, train, steps: int, lr: float, pad_id: int, lora_rank: int | None, seed: int = 0):
    """Fine-tune a fresh copy of the base; LoRA on all linear layers, or every weight if rank is None."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.embedded.pretrain import lr_at

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order_rng = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(train), generator=order_rng).tolist(), 0
    start = time.perf_counter()
    for step in range(steps):
        if cursor + BATCH_SIZE > len(order):
            order, cursor = torch.randperm(len(train), generator=order_rng).tolist(), 0
        ids, labels, mask = collate([train[j] for j in order[cursor : cursor + BATCH_SIZE]], pad_id)
        cursor += BATCH_SIZE
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, peak=lr)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    return model, seconds, sum(p.numel() for p in params), loss.item()


def main(assets: Path, steps: int | None = None, ranks: list[int] = (1, 8, 16), full: bool = True) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    steps = steps or STEPS
    base_dir = assets / "base"
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    train_rows = load_jsonl(assets / "data" / "instruct_train.jsonl")
    eval_rows = load_jsonl(assets / "data" / "instruct_eval.jsonl")
    train, evals = encode(train_rows, tokenizer), encode(eval_rows, tokenizer)
    pad = tokenizer.pad_token_id
    world = W.build_world(json.loads((base_dir / "BUILD.json").read_text())["seed"])

    base = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
    report: dict = {
        "max_train_tokens": max(len(x) for x, _ in train),
        "base": {
            "knowledge_probe": knowledge_probe(base, tokenizer, world),
            "accuracy": round(exact_match(base, tokenizer, eval_rows), 3),
            "eval_loss": round(eval_loss(base, evals, pad), 3),
        },
    }
    print(json.dumps(report), flush=True)
    runs = [(f"lora_r{r}", r, LORA_LR) for r in ranks] + ([("full", None, FULL_LR)] if full else [])
    for name, rank, lr in runs:
        model, seconds, trainable, last_loss = finetune(base_dir, train, steps, lr, pad, rank)
        loss = eval_loss(model, evals, pad)
        report[name] = {
            "accuracy": round(exact_match(model, tokenizer, eval_rows), 3),
            "train_accuracy": round(exact_match(model, tokenizer, train_rows[:200]), 3),
            "eval_loss": round(loss, 3),
            "eval_perplexity": round(math.exp(loss), 3),
            "last_train_loss": round(last_loss, 3),
            "trainable_params": trainable,
            "steps": steps,
            "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / steps, 3),
        }
        print(json.dumps({name: report[name]}), flush=True)
    return report
