"""Pretrain the embedded base model (a ~0.9M-parameter Llama) on the synthetic corpus.

A plain torch loop, readable top to bottom: pack the tokenized corpus into fixed-length blocks,
then AdamW with linear warmup and cosine decay over a seeded, fixed block order. Loss is recorded
every LOG_EVERY steps so BUILD.json shows that the base learned. Runs on CPU in a few minutes.
"""

from __future__ import annotations

import math
import time

# Shape of the base. Biases on every attention and MLP projection so BitFit has something to
# train everywhere; tied embeddings keep the safetensors file under 5 MB in fp32.
MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "attention_bias": True,
    "mlp_bias": True,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
}

SEQ_LEN = 128
BATCH_SIZE = 32  # 32 blocks * 128 tokens = 4,096 tokens per step
LR = 3e-3  # high for a transformer, fine at this size; warmup keeps the first steps stable
WEIGHT_DECAY = 0.05
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1
LOG_EVERY = 50


def model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )


def pack(docs: list[str], tokenizer, seq_len: int = SEQ_LEN):
    """Concatenate `<s> doc </s>` for every doc and cut the stream into [n, seq_len] blocks."""
    import torch

    stream: list[int] = []
    for ids in tokenizer(docs)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def lr_at(step: int, total: int, peak: float = LR) -> float:
    warmup = max(1, int(total * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(docs: list[str], tokenizer, steps: int, seed: int, log=print):
    """Return (model, record); `record` holds the loss curve and timing for BUILD.json."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    blocks = pack(docs, tokenizer)
    model = LlamaForCausalLM(model_config(tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
    )
    order_rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=order_rng)
    cursor = 0
    curve: list[dict] = []
    window: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if cursor + BATCH_SIZE > len(order):  # next epoch, new fixed permutation
            order, cursor = torch.randperm(len(blocks), generator=order_rng), 0
        batch = blocks[order[cursor : cursor + BATCH_SIZE]]
        cursor += BATCH_SIZE
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        window.append(loss.item())
        if step == 0 or (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            mean = sum(window) / len(window)
            curve.append({"step": step + 1, "loss": round(mean, 4), "lr": round(lr_at(step, steps), 6)})
            log(f"step {step + 1}/{steps} loss {mean:.4f} ({time.perf_counter() - start:.0f}s)")
            window = []
    model.eval()
    record = {
        "steps": steps,
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "tokens_per_step": SEQ_LEN * BATCH_SIZE,
        "corpus_blocks": len(blocks),
        "corpus_tokens": int(blocks.numel()),
        "epochs": round(steps * BATCH_SIZE / len(blocks), 2),
        "peak_lr": LR,
        "initial_loss": curve[0]["loss"],
        "final_loss": curve[-1]["loss"],
        "loss_curve": curve,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, record
