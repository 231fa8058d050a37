"""Supervised fine-tuning: setup -> train -> evaluate -> save.

Loss only on response tokens; eval reports loss, perplexity and exact-match accuracy by greedy
generation; the method's artifact (adapter or full model) is saved as safetensors.
data.packing=true trains on rows of several examples (data.pack_examples), data.packing=padding_free
on one row of up to data.max_tokens_per_batch tokens per micro-batch (data.padding_free_rows: no
pad at all), data.group_by_length on batches of similar length (training.micro_batches);
evaluation always runs on unpacked examples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainers.context import TrialContext
from trainers.config import VARLEN_ATTENTION, ExperimentConfig, TrainConfig
from trainers.data import example_lengths, non_pad_fraction, pack_examples, padding_free_rows
from trainers.evaluate import eval_loss, evaluate
from trainers.methods import METHODS
from trainers.model import check_packed_attention, count_parameters
from trainers.recipes.base import register
from trainers.recipes.base import RecipeSpec, StageConfig
from trainers.recipes.inputs import load_start
from trainers.templates import load_chat_tokenizer
from trainers.training import causal_lm_loss, train_loop


@dataclass
class SftConfig(StageConfig):
    name: str = "sft"


def run(ctx: TrialContext) -> dict[str, float]:
    cfg, device = ctx.cfg, ctx.device

    # --- setup: data first, so a bad row fails before the model costs anything
    tokenizer = load_chat_tokenizer(cfg)
    data = ctx.stage_data(tokenizer)  # tokenized once per distinct input (trainers/prepared), memory-mapped
    train = data.train.examples()
    evaluation = data.eval.get("examples+prompts")
    eval_examples, eval_prompts = (evaluation.examples(), evaluation.prompts()) if evaluation else (None, None)
    batches, loop_cfg = batching(cfg, train, data.train.stats)
    data_metrics = data.train.stats.as_metrics("train")
    if cfg.data.packing:
        slots = cfg.data.token_budget(cfg.train.batch_size) if cfg.data.padding_free else cfg.data.max_seq_len
        data_metrics.update({"data/packed_rows": len(batches),
                             "data/packed_fill": non_pad_fraction(batches, loop_cfg.batch_size, slots)})
    data_metrics.update(data.ready(lambda: batches[0]))

    ctx.memory.start()
    spec = METHODS[cfg.method.name]
    start = load_start(cfg, device)  # the base, or stage.init_from merged
    if cfg.data.packing:
        check_packed_attention(start)
    model = spec.prepare(start, cfg)
    trainable, total = count_parameters(model)
    ctx.tracker.log_metrics({"model/trainable_params": trainable, "model/total_params": total, **data_metrics})

    # --- train (eval/loss every train.eval_every steps, if asked and there is an eval split)
    def periodic_eval(model) -> dict[str, float]:
        return {"eval/loss": eval_loss(model, eval_examples, cfg.train.eval_batch_size, tokenizer.pad_token_id,
                                       device)}

    varlen = cfg.data.padding_free and cfg.model.attn_implementation in VARLEN_ATTENTION
    stats = train_loop(ctx.wrap_parallel(model), batches, loop_cfg, tokenizer.pad_token_id, device, ctx.dist,
                       ctx.tracker, checkpoints=ctx.checkpoints, faults=ctx.faults,
                       loss_fn=causal_lm_loss(tokenizer.pad_token_id, device, varlen=varlen),
                       group_by_length=cfg.data.group_by_length, memory=ctx.memory, step_cost=ctx.step_cost(model),
                       evaluate=periodic_eval if evaluation is not None and cfg.train.eval_every else None)
    metrics = stats.as_metrics(trainable, total)

    # --- evaluate and save (rank 0; the others wait at the barrier)
    def evaluate_trained(model) -> dict[str, float]:
        results = {}
        if evaluation is not None:
            results = evaluate(model, tokenizer, eval_examples, eval_prompts, cfg.train.eval_batch_size,
                               cfg.data.max_new_tokens, device)
        # Predicted for the batch shapes this trial really had, so it compares with the measurement.
        longest = int(max(example_lengths(batches))) if not cfg.data.packed_rows else cfg.data.max_seq_len
        eval_longest = int(max(example_lengths(eval_examples))) if evaluation else None
        estimate = ctx.estimated_peak_bytes(seq_len=longest, eval_seq_len=eval_longest)
        return results if estimate is None else {**results, "mem/estimated_peak_bytes": estimate}

    model = ctx.gather_model(model, lambda: spec.prepare(load_start(cfg, device), cfg))  # FSDP: gathers shards
    return ctx.finish(spec, model, tokenizer, metrics, evaluate_trained)


def batching(cfg: ExperimentConfig, examples, stats) -> tuple[list, TrainConfig]:
    """What the loop's micro-batches are drawn from, and the train config it runs with: examples
    (train.batch_size of them a micro-batch), packed rows (as many), or padding-free rows (one a
    micro-batch: the loop's batch_size is 1, its size is the token budget)."""
    data = cfg.data
    if data.padding_free:
        rows = padding_free_rows(examples, data.token_budget(cfg.train.batch_size), data.overlength,
                                 cfg.train.seed, stats)
        return rows, dataclasses.replace(cfg.train, batch_size=1)
    if data.packing:
        return pack_examples(examples, data.max_seq_len, cfg.train.seed), cfg.train
    return examples, cfg.train


register(RecipeSpec(name="sft", config_cls=SftConfig, run=run, data_kind="instruction",
                    periodic_metrics=("eval/loss",), batching=("packing", "padding_free", "group_by_length"),
                    shards=True,
                    summary="supervised fine-tuning on instruction or chat data"))
