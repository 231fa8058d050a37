"""Our trainer beside a plain Hugging Face `transformers.Trainer` + PEFT LoRA script, one process.

    python benchmarks/trainer_vs_hf.py [--epochs 1] [--repeats 3] [--threads 1] [--memory-steps 6]

Same model (embedded:base, fp32), data (the embedded instruction split, 16-31 tokens a row),
LoRA (r=8, alpha=16, all linear layers), optimizer (fused AdamW, lr 2e-3, cosine, 6% warmup,
clip 1.0; fused is the Trainer's default and ours where the parameters allow),
micro-batch (16 examples) and max_seq_len (96). Variants:

  hf          transformers.Trainer, DataCollatorForSeq2Seq (pads to the longest row of a batch)
  ours        trainers.training.train_loop, unpacked (pads to the longest row of a batch)
  ours+group  data.group_by_length=true
  ours+pack   data.packing=true, ceil(16 x 20.7 / 96) = 4 rows of 96 per micro-batch: at least as
              many examples a step as 16 unpacked (18.5 on average), so steps and eval loss compare
              at an equal budget of examples
  ours+match  unpacked, as many examples a step as ours+pack (so about as many steps): the
              control that tells packing's effect on eval loss from that of the step count
  ours+pack16 (only with --variants) data.packing=true, 16 rows of 96: the same train.batch_size,
              4.6x the examples a step, so few steps that its eval loss is not comparable

Each variant trains --epochs epochs of the split from the same LoRA initialisation; variants run
interleaved (hf, ours, ... then again) --repeats times, repeat i shuffling the data with seed i
(so the eval-loss range over repeats is the seed noise packing must stay within), and the table
shows medians. Useful
tokens = the examples' own tokens (prompt and response): the tokens that are attended to or carry
loss; pad positions are computed but are neither. Non-pad % = useful tokens / positions computed.
Peak memory: trainers.runtime.PeakMemory (bytes of live tensors created from the start of
training: gradients, optimizer state, activations, transients; the weights are loaded before)
over separate --memory-steps runs, because its CPU tracking slows every op. Eval loss: the
token cross-entropy of the embedded eval split after training (trainers.evaluate.eval_loss).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LR, WARMUP, CLIP, SEED = 2e-3, 0.06, 1.0, 0
VARIANTS = ("hf", "ours", "ours+group", "ours+pack", "ours+match")
OPTIONAL = ("ours+pack16",)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=1.0, help="training budget of each variant, in epochs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both trainers)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=6)
    parser.add_argument("--multiturn", action="store_true",
                        help="chats of 1-4 consecutive rows as turns (more varied lengths), max_seq_len 256")
    parser.add_argument("--model", default="embedded:base")
    parser.add_argument("--train-file", default="embedded:instruct_train.jsonl")
    parser.add_argument("--eval-file", default="embedded:instruct_eval.jsonl")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"also: {', '.join(OPTIONAL)}")
    return parser.parse_args(argv)


class Setup:
    """Tokenizer, examples and configs shared by every variant."""

    def __init__(self, args):
        from trainers.config import DataConfig, ExperimentConfig, ModelConfig
        from trainers.data import load_rows, pack_examples, tokenize_split
        from trainers.methods.lora import LoraConfig
        from trainers.model import load_tokenizer
        from trainers.recipes.sft import SftConfig

        self.args = args
        data = DataConfig(train_file=args.train_file, eval_file=args.eval_file)
        if args.multiturn:
            data.max_seq_len = 256
        self.cfg = ExperimentConfig(model=ModelConfig(name_or_path=args.model), data=data,
                                    method=LoraConfig(r=args.rank, alpha=2.0 * args.rank), stage=SftConfig())
        self.tokenizer = load_tokenizer(self.cfg.model)
        splits = []
        for uri in (data.train_file, data.eval_file):
            fmt, rows, sources = load_rows(uri, data.format)
            if args.multiturn:
                fmt, rows, sources = "chat", *as_chats(rows, sources)
            splits.append(tokenize_split(self.tokenizer, rows, sources, fmt, data.max_seq_len,
                                         data.overlength).examples)
        self.train, self.eval = splits
        self.mean_len = sum(len(e.input_ids) for e in self.train) / len(self.train)
        self.max_seq_len = data.max_seq_len
        self.per_row = len(self.train) / len(pack_examples(self.train, self.max_seq_len, SEED))  # examples

    def fresh_model(self):
        """The base with LoRA, initialised identically for every variant."""
        import torch

        from trainers.methods import METHODS
        from trainers.model import load_base_model

        torch.manual_seed(SEED)
        return METHODS["lora"].apply(load_base_model(self.cfg, torch.device("cpu")), self.cfg)

    def micro_batch(self, variant: str) -> tuple[int, bool]:
        """(size, packed) of the variant's micro-batch: rows of max_seq_len, or examples."""
        rows = math.ceil(self.args.batch_size * self.mean_len / self.max_seq_len)  # >= batch_size examples
        if variant == "ours+pack":
            return rows, True
        if variant == "ours+pack16":
            return self.args.batch_size, True
        if variant == "ours+match":
            return round(rows * self.per_row), False
        return self.args.batch_size, False

    def steps(self, variant: str, epochs: float) -> int:
        """Optimizer steps that train on about `epochs` epochs of examples."""
        size, packed = self.micro_batch(variant)
        return max(2, math.ceil(len(self.train) * epochs / (size * self.per_row if packed else size)))


def as_chats(rows: list[dict], sources: list[str]) -> tuple[list[dict], list[str]]:
    """Instruction rows regrouped as conversations of 1-4 consecutive rows (user asks, assistant
    answers, every answer trained): the same facts, in rows of widely varying length."""
    import random

    rng, chats, chat_sources, start = random.Random(SEED), [], [], 0
    while start < len(rows):
        turns = rows[start:start + rng.randint(1, 4)]
        messages = []
        for row in turns:
            question = row["instruction"] + (f"\n{row['input']}" if row["input"].strip() else "")
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
        chats.append({"messages": messages})
        chat_sources.append(f"{sources[start]}+{len(turns) - 1}")
        start += len(turns)
    return chats, chat_sources


# ----------------------------------------------------------------------------- the HF script


def hf_run(setup: Setup, steps: int, seed: int, memory: bool = False) -> dict:
    """The usual hand-written script: AutoModel + get_peft_model + Trainer + DataCollatorForSeq2Seq."""
    import peft
    import torch
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, PrinterCallback, Trainer,
                              TrainerCallback, TrainingArguments)

    from trainers.model import resolve_model_path
    from trainers.runtime import PeakMemory

    args = setup.args
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in setup.train]
    pad = DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=-100)
    batch_tokens: list[tuple[int, int]] = []  # (useful, computed) tokens of each batch the loader made

    def collate(features):
        batch = pad(features)
        batch_tokens.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=steps, learning_rate=LR,
            lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=CLIP,
            logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=seed, data_seed=seed, disable_tqdm=True,
            remove_unused_columns=False)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate,
                          callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # its log lines to stdout are not training
        peak = PeakMemory(torch.device("cpu"))
        if memory:
            peak.start()
        trainer.train()
        peak_bytes = peak.peak_bytes() if memory else 0
    used = batch_tokens[:steps]  # the loader may have made a batch ahead
    return {"train_s": clock["end"] - clock["start"], "cpu_s": clock["cpu_end"] - clock["cpu_start"],
            "useful": sum(u for u, _ in used),
            "computed": sum(c for _, c in used), "peak": peak_bytes, "model": model}


# ----------------------------------------------------------------------------- our trainer


def ours_run(setup: Setup, variant: str, steps: int, seed: int, memory: bool = False) -> dict:
    import torch

    from trainers.config import TrainConfig
    from trainers.data import pack_examples
    from trainers.runtime import DistInfo, PeakMemory
    from trainers.tracking import Tracker
    from trainers.training import causal_lm_loss, train_loop

    model = setup.fresh_model()
    batch_size, packed = setup.micro_batch(variant)
    items = pack_examples(setup.train, setup.max_seq_len, seed) if packed else setup.train
    train = TrainConfig(max_steps=steps, batch_size=batch_size, lr=LR, warmup_ratio=WARMUP, max_grad_norm=CLIP,
                        log_every=10, seed=seed, checkpoint_every=0)
    inner = causal_lm_loss(setup.tokenizer.pad_token_id, torch.device("cpu"))
    computed, cpu_start = [0], []

    def loss_fn(m, batch):  # counts the positions computed (useful + pad) beside the loss
        if not cpu_start:
            cpu_start.append(time.process_time())
        computed[0] += len(batch) * max(len(e.input_ids) for e in batch)
        return inner(m, batch)

    peak = PeakMemory(torch.device("cpu"))
    if memory:
        peak.start()
    stats = train_loop(model, items, train, setup.tokenizer.pad_token_id, torch.device("cpu"), DistInfo(),
                       Tracker(), loss_fn=loss_fn, group_by_length=variant == "ours+group")
    cpu_s = time.process_time() - cpu_start[0]
    peak_bytes = peak.peak_bytes() if memory else 0
    return {"train_s": stats.train_s, "cpu_s": cpu_s, "useful": stats.tokens, "computed": computed[0],
            "peak": peak_bytes, "model": model}


def run(setup: Setup, variant: str, steps: int, seed: int, memory: bool = False) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "hf":
            return hf_run(setup, steps, seed, memory)
        return ours_run(setup, variant, steps, seed, memory)


def main(argv=None) -> int:
    import torch

    from trainers.evaluate import eval_loss

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    setup = Setup(args)
    unknown = sorted(set(variants) - set(VARIANTS + OPTIONAL))
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS + OPTIONAL)}", file=sys.stderr)
        return 2
    steps = {v: setup.steps(v, args.epochs) for v in variants}
    print(f"data: {len(setup.train)} train rows ({setup.mean_len:.1f} tokens mean, "
          f"{min(len(e.input_ids) for e in setup.train)}-{max(len(e.input_ids) for e in setup.train)}), "
          f"{len(setup.eval)} eval rows; max_seq_len {setup.max_seq_len}; LoRA r={args.rank}; "
          f"{args.threads} thread(s); {args.epochs:g} epoch(s) per run, {args.repeats} interleaved repeats",
          flush=True)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            out = run(setup, variant, steps[variant], seed=repeat)
            out["eval_loss"] = eval_loss(out.pop("model"), setup.eval, 64, setup.tokenizer.pad_token_id,
                                         torch.device("cpu"))
            out["tokens_per_s"] = out["useful"] / out["train_s"]
            out["tokens_per_cpu_s"] = out["useful"] / out["cpu_s"]
            results[variant].append(out)
            print(f"  repeat {repeat + 1} {variant:<12} {steps[variant]:>4} steps  {out['train_s']:6.2f} s  "
                  f"{out['tokens_per_s']:6.0f} useful tok/s  {out['tokens_per_cpu_s']:6.0f} per CPU-s  "
                  f"eval loss {out['eval_loss']:.4f}", flush=True)
    peaks = {}
    for variant in variants:
        peaks[variant] = run(setup, variant, args.memory_steps, seed=0, memory=True)["peak"]

    base = "hf" if "hf" in variants else variants[0]
    med = {v: {k: statistics.median(r[k] for r in results[v])
               for k in ("tokens_per_s", "tokens_per_cpu_s", "eval_loss")} for v in variants}
    fill = {v: statistics.median(r["useful"] / r["computed"] for r in results[v]) for v in variants}
    print()
    print(f"| variant | micro-batch | steps | useful tok/s | vs {base} | per CPU-s | vs {base} | non-pad % | "
          f"peak MiB ({args.memory_steps} steps) | vs {base} | eval loss |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        size, packed = setup.micro_batch(v)
        shape = f"{size} rows x {setup.max_seq_len}" if packed else f"{size} examples"
        print(f"| {v} | {shape} | {steps[v]} | {med[v]['tokens_per_s']:.0f} | "
              f"{med[v]['tokens_per_s'] / med[base]['tokens_per_s']:.2f}x | {med[v]['tokens_per_cpu_s']:.0f} | "
              f"{med[v]['tokens_per_cpu_s'] / med[base]['tokens_per_cpu_s']:.2f}x | {100 * fill[v]:.1f} | "
              f"{peaks[v] / 2**20:.2f} | {peaks[v] / max(peaks[base], 1):.2f}x | {med[v]['eval_loss']:.4f} |")
    print("(medians over the repeats; useful tok/s is per wall-clock second of the training loop, per "
          "CPU-s per second of this process's CPU time, which other jobs on shared CPUs disturb less)")
    for key, label, fmt in (("tokens_per_s", "useful tok/s", ".0f"), ("tokens_per_cpu_s", "per CPU-s", ".0f"),
                            ("eval_loss", "eval loss", ".4f")):
        ranges = "; ".join(f"{v} {min(r[key] for r in results[v]):{fmt}}-{max(r[key] for r in results[v]):{fmt}}"
                           for v in variants)
        print(f"{label} range over repeats (seeds 0-{args.repeats - 1}): {ranges}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
