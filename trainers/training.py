"""The pieces every gradient-based recipe shares: optimizer, schedule, batches, the step loop."""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from trainers.checkpoint import CheckpointManager
from trainers.config import TrainConfig
from trainers.data import Example, pad_batch
from trainers.faults import FaultPlan
from trainers.runtime import DistInfo
from trainers.tracking import Tracker


class NonFiniteLossError(RuntimeError):
    pass


class TrialTimeLimitError(RuntimeError):
    pass


def build_optimizer(params, train: TrainConfig):
    import torch

    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the method left no trainable parameters")
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=0.9, weight_decay=train.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[train.optimizer]
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def lr_lambda(train: TrainConfig) -> Callable[[int], float]:
    warmup = int(train.warmup_ratio * train.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, train.max_steps - warmup)
        if train.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if train.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def micro_batches(examples: list[Example], batch_size: int, seed: int, dist: DistInfo) -> Iterator[list[Example]]:
    """Endless stream of shuffled micro-batches; rank r takes every world_size-th example."""
    epoch = 0
    while True:
        order = list(range(len(examples)))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        shard = order[dist.rank::dist.world_size]
        usable = len(shard) - len(shard) % batch_size or len(shard)
        for start in range(0, usable, batch_size):
            yield [examples[i] for i in shard[start:start + batch_size]]
        epoch += 1


@dataclass
class LoopStats:
    steps: int = 0
    tokens: int = 0  # trained-on (non-pad) tokens across all ranks
    train_s: float = 0.0
    last_loss: float = float("nan")
    resumed_from: int = 0  # step of the checkpoint this run continued from (0: fresh start)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s > 0 else 0.0


def train_loop(model, examples: list[Example], train: TrainConfig, pad_id: int, device, dist: DistInfo,
               tracker: Tracker, checkpoints: CheckpointManager | None = None,
               faults: FaultPlan | None = None) -> LoopStats:
    """Runs train.max_steps optimizer steps; logs train/loss, train/lr, train/tokens_per_s.

    With `checkpoints`, it resumes from the newest verified checkpoint (weights, optimizer,
    schedule, RNG and data position) and writes one every train.checkpoint_every steps.
    """
    import torch
    import torch.distributed as torch_dist

    optimizer = build_optimizer(model.parameters(), train)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    stats = LoopStats()
    restored = checkpoints.restore(model, optimizer, scheduler) if checkpoints else None
    start = restored.step if restored else 0
    stats.resumed_from = start
    stream = micro_batches(examples, train.batch_size, train.seed, dist)
    for _ in range(start * train.grad_accum):  # the data position: batches already trained on
        next(stream)
    trainable = [p for p in model.parameters() if p.requires_grad]
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    started, tracking_s = time.perf_counter(), 0.0
    model.train()
    for step in range(start + 1, train.max_steps + 1):
        if faults:
            faults.before_step(step)
        step_loss = 0.0
        for _ in range(train.grad_accum):
            batch = {k: v.to(device) for k, v in pad_batch(next(stream), pad_id).items()}
            out = model(**batch)
            loss = out.loss / train.grad_accum
            if faults:
                loss = faults.poison_loss(step, loss)
            loss.backward()
            step_loss += loss.item()
            window_tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            raise NonFiniteLossError(f"non-finite loss at step {step}")
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += step_loss
        stats.steps, stats.last_loss = step, step_loss
        if checkpoints and train.checkpoint_every and step % train.checkpoint_every == 0 and step < train.max_steps:
            if dist.is_main:
                checkpoints.save(step, model, optimizer, scheduler)
            if dist.world_size > 1:
                torch_dist.barrier()
        if train.time_limit_s is not None and time.perf_counter() - started > train.time_limit_s:
            raise TrialTimeLimitError(f"train.time_limit_s={train.time_limit_s} reached at step {step}")
        if step % train.log_every == 0 or step == train.max_steps:
            elapsed = time.perf_counter() - window_start
            n_steps = min(step - start, train.log_every if step % train.log_every == 0 else step % train.log_every)
            tokens = torch.tensor([window_tokens, window_loss], dtype=torch.float64)
            if dist.world_size > 1:
                torch_dist.all_reduce(tokens)
                tokens[1] /= dist.world_size
            stats.tokens += int(tokens[0])
            logging_started = time.perf_counter()
            tracker.log_metrics({
                "train/loss": float(tokens[1]) / n_steps,
                "train/lr": scheduler.get_last_lr()[0],
                "train/tokens_per_s": float(tokens[0]) / max(elapsed, 1e-9),
            }, step=step)
            window_start = time.perf_counter()
            tracking_s += window_start - logging_started
            window_loss, window_tokens = 0.0, 0
    # Throughput is the trainer's: time spent handing metrics to the tracker is not training.
    stats.train_s = time.perf_counter() - started - tracking_s
    return stats
