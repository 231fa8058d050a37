"""Our trainer beside a plain Hugging Face `transformers.Trainer` + PEFT LoRA script, one process.

    python benchmarks/trainer_vs_hf.py [--epochs 1] [--repeats 3] [--threads 1] [--memory-steps 6]
    python benchmarks/trainer_vs_hf.py --model-shape smollm2-135m [--json out.json]
    python benchmarks/trainer_vs_hf.py --tiny        # a tiny random model: checks the script

--model-shape smollm2-135m: a random-init model of SmolLM2-135M's exact shape (Llama: hidden 576,
30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings; speed does not depend on
the weights), the first 320 embedded instruction rows, batch 8, max_seq_len 64, 0.6 epoch (24
steps of 8), all of this machine's CPUs as torch threads in every variant, and the baselines a
user would pick beside ours (SHAPE_VARIANTS):

  hf+group    transformers.Trainer grouping by length (train_sampling_strategy="group_by_length",
              transformers 5's spelling of group_by_length=True)
  trl+pack    TRL SFTTrainer, packing=True (best-fit-decreasing rows of max_seq_len, padding-free)
  trl+padfree TRL SFTTrainer, padding_free=True (each batch of examples as one unpadded row;
              TRL turns gradient checkpointing on by default, and this keeps its default)
  trl+padfree-nogc (only with --variants) the same with gradient_checkpointing=False: the control
              that tells padding-free's memory from activation checkpointing's
  ours+padfree data.packing=padding_free: one unpadded row per micro-batch, token budget
              (data.max_tokens_per_batch) ceil(batch x mean length): the tokens of as many
              examples as hf's and trl+padfree's micro-batch, in full rows
  ours+padfree+gc (only with --variants) the same with train.gradient_checkpointing=true: like
              for like with trl+padfree as TRL ships it
  orch        `python -m orchestrator` as a user runs one trial (local Ray, MLflow, checkpoints
              off as in the others): its own time/train_s and tokens, and the whole command's wall
              time, process and Ray start included, reported apart

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
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
LR, WARMUP, CLIP, SEED = 2e-3, 0.06, 1.0, 0
VARIANTS = ("hf", "ours", "ours+group", "ours+pack", "ours+match", "ours+padfree")
SHAPE_VARIANTS = ("hf", "hf+group", "trl+pack", "trl+padfree", "ours", "ours+group", "ours+pack", "ours+padfree",
                  "orch")
OPTIONAL = ("ours+pack16", "ours+peak", "ours+peakall", "trl+padfree-nogc", "ours+padfree+gc")
# ours+peak: `ours` with PeakMemory measuring as a trial does (started, told each step's batch
# shape, so it watches only the steps that can raise the peak); ours+peakall: every step watched
# (what trials did before issue #16). Beside `ours` they give PeakMemory's cost per step.
PEAK_VARIANTS = ("ours+peak", "ours+peakall")
# Llama shapes for --model-shape; "tiny" is what --tiny trains (the script's own check).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=256),
}
# What --model-shape changes (issue #16's setting); explicit flags win.
SHAPE_DEFAULTS = dict(batch_size=8, max_seq_len=64, rows=320, epochs=0.6, threads=os.cpu_count() or 1)
TINY_DEFAULTS = dict(batch_size=4, max_seq_len=64, rows=48, epochs=0.5, threads=1, repeats=1, memory_steps=2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=None, help="training budget of each variant, in epochs "
                                                                   "(default 1; --model-shape 0.6)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads, every variant (default 1; --model-shape all CPUs)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples a step (default 16; --model-shape 8)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="default: the data config's 96; --model-shape 64")
    parser.add_argument("--rows", type=int, default=None, help="first N training rows (default all; --model-shape 320)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=None, help="steps of the peak-memory runs (default 6)")
    parser.add_argument("--model-shape", choices=sorted(set(SHAPES) - {"tiny"}), default=None,
                        help="train a random-init model of this shape (built once under the temp dir)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, 1 repeat: checks the script")
    parser.add_argument("--json", default=None, help="also write the medians and every run to this JSON file")
    parser.add_argument("--multiturn", action="store_true",
                        help="chats of 1-4 consecutive rows as turns (more varied lengths), max_seq_len 256")
    parser.add_argument("--model", default="embedded:base")
    parser.add_argument("--train-file", default="embedded:instruct_train.jsonl")
    parser.add_argument("--eval-file", default="embedded:instruct_eval.jsonl")
    parser.add_argument("--variants", default=None,
                        help=f"default {','.join(VARIANTS)}; with --model-shape/--tiny {','.join(SHAPE_VARIANTS)}; "
                             f"also: {', '.join(OPTIONAL)}")
    args = parser.parse_args(argv)
    shape = "tiny" if args.tiny else args.model_shape
    defaults = dict(batch_size=16, max_seq_len=None, rows=None, epochs=1.0, threads=1, repeats=3, memory_steps=6)
    if shape:
        defaults.update(SHAPE_DEFAULTS)
        defaults.update(TINY_DEFAULTS if args.tiny else {})
        args.model = str(build_shape_model(shape))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape = shape
    if args.variants is None:
        args.variants = ",".join(SHAPE_VARIANTS if shape else VARIANTS)
    return args


def build_shape_model(shape: str) -> Path:
    """A random-init Llama of SHAPES[shape] with the embedded base's tokenizer, saved once (fp32
    safetensors) under the temp dir; later runs reuse it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.model import resolve_model_path

    out = Path(tempfile.gettempdir()) / "finetune-lab-bench" / f"shape-{shape}"
    if (out / "model.safetensors").is_file():
        return out
    tokenizer_dir = Path(resolve_model_path("embedded:base"))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".partial", dir=out.parent))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(partial)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, partial / name)
    try:
        os.replace(partial, out)
    except OSError:  # another run built it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return out


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
        data.max_seq_len = args.max_seq_len or data.max_seq_len
        self.cfg = ExperimentConfig(model=ModelConfig(name_or_path=args.model), data=data,
                                    method=LoraConfig(r=args.rank, alpha=2.0 * args.rank), stage=SftConfig())
        self.tokenizer = load_tokenizer(self.cfg.model)
        splits = []
        for uri, limit in ((data.train_file, args.rows), (data.eval_file, None)):
            fmt, rows, sources = load_rows(uri, data.format, limit)
            if args.multiturn:
                fmt, rows, sources = "chat", *as_chats(rows, sources)
            splits.append(tokenize_split(self.tokenizer, rows, sources, fmt, data.max_seq_len,
                                         data.overlength).examples)
        self.train, self.eval = splits
        self.mean_len = sum(len(e.input_ids) for e in self.train) / len(self.train)
        self.max_seq_len = data.max_seq_len
        self.per_row = len(self.train) / len(pack_examples(self.train, self.max_seq_len, SEED))  # examples
        # ours+padfree: the tokens of batch_size mean examples per micro-batch, as one row
        self.token_budget = math.ceil(args.batch_size * self.mean_len)
        self.per_budget = len(self.train) / len(self.padding_free_rows(SEED))

    def padding_free_rows(self, seed: int):
        from trainers.data import DatasetStats, padding_free_rows

        return padding_free_rows(self.train, self.token_budget, "error", seed, DatasetStats())

    def fresh_model(self, variant: str):
        """The base with LoRA, initialised identically for every variant (checkpointed: +gc)."""
        import dataclasses

        import torch

        from trainers.methods import METHODS
        from trainers.model import load_base_model

        torch.manual_seed(SEED)
        train = dataclasses.replace(self.cfg.train, gradient_checkpointing=variant.endswith("+gc"))
        cfg = dataclasses.replace(self.cfg, train=train)
        return METHODS["lora"].prepare(load_base_model(cfg, torch.device("cpu")), cfg)

    def micro_batch(self, variant: str) -> tuple[int, bool]:
        """(size, packed) of the variant's micro-batch: rows of max_seq_len, or examples."""
        rows = math.ceil(self.args.batch_size * self.mean_len / self.max_seq_len)  # >= batch_size examples
        if variant in ("ours+pack", "trl+pack"):
            return rows, True
        if variant == "ours+pack16":
            return self.args.batch_size, True
        if variant == "ours+match":
            return round(rows * self.per_row), False
        if is_padfree(variant):
            return 1, True
        return self.args.batch_size, False

    def steps(self, variant: str, epochs: float) -> int:
        """Optimizer steps that train on about `epochs` epochs of examples."""
        size, packed = self.micro_batch(variant)
        per_row = self.per_budget if is_padfree(variant) else self.per_row
        return max(2, math.ceil(len(self.train) * epochs / (size * per_row if packed else size)))

    def shape(self, variant: str) -> str:
        """The variant's micro-batch, in words."""
        size, packed = self.micro_batch(variant)
        if is_padfree(variant):
            return f"1 row of <= {self.token_budget}"
        return f"{size} rows x {self.max_seq_len}" if packed else f"{size} examples"


def is_padfree(variant: str) -> bool:
    return variant.startswith("ours+padfree")


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


# ----------------------------------------------------------------------------- the HF scripts


def hf_model(setup: Setup):
    """The usual hand-written start: AutoModelForCausalLM + get_peft_model (same LoRA as ours)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.model import resolve_model_path

    args = setup.args
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32)
    model.config.use_cache = False
    return peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))


def count_tokens(model, steps: int) -> list[tuple[int, int]]:
    """(useful, computed) positions of each of the first `steps` forward passes: a pre-hook reads
    the batch the trainer really feeds (padded, grouped, packed or padding-free alike)."""
    seen: list[tuple[int, int]] = []

    def hook(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        if len(seen) < steps:
            seen.append((int(mask.sum()) if mask is not None else ids.numel(), ids.numel()))

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def hf_common(out: str, steps: int, seed: int, batch_size: int) -> dict:
    """TrainingArguments every HF-side variant shares (the same optimizer and schedule as ours)."""
    return dict(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=LR,
                lr_scheduler_type="cosine", warmup_steps=WARMUP, weight_decay=0.0, max_grad_norm=CLIP,
                logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[],
                use_cpu=True, dataloader_num_workers=0, seed=seed, data_seed=seed, disable_tqdm=True)


def train_timed(trainer, model, steps: int, memory: bool) -> dict:
    """trainer.train() with wall and CPU time from on_train_begin to on_train_end, and peak memory."""
    import torch
    from transformers import PrinterCallback, TrainerCallback

    from trainers.runtime import PeakMemory

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["start"], clock["cpu_start"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            clock["end"], clock["cpu_end"] = time.perf_counter(), time.process_time()

    trainer.add_callback(Clock())
    trainer.remove_callback(PrinterCallback)  # its log lines to stdout are not training
    tokens = count_tokens(model, steps)
    peak = PeakMemory(torch.device("cpu"))
    if memory:
        peak.start()
    trainer.train()
    peak_bytes = peak.peak_bytes() if memory else 0
    return {"train_s": clock["end"] - clock["start"], "cpu_s": clock["cpu_end"] - clock["cpu_start"],
            "useful": sum(u for u, _ in tokens), "computed": sum(c for _, c in tokens), "peak": peak_bytes,
            "model": model}


def hf_run(setup: Setup, steps: int, seed: int, memory: bool = False, group: bool = False) -> dict:
    """transformers.Trainer + DataCollatorForSeq2Seq (pads to the longest row of a batch)."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model = hf_model(setup)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in setup.train]
    collate = DataCollatorForSeq2Seq(setup.tokenizer, padding=True, label_pad_token_id=-100)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(**hf_common(out, steps, seed, setup.args.batch_size),
                                 train_sampling_strategy="group_by_length" if group else "random",
                                 remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate)
        return train_timed(trainer, model, steps, memory)


def trl_run(setup: Setup, variant: str, steps: int, seed: int, memory: bool = False) -> dict:
    """TRL's SFTTrainer on the same tokenized examples (labels -100 on the prompt, as ours), with
    packing=True (rows of max_seq_len, as many rows a step as ours+pack) or padding_free=True."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = hf_model(setup)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in setup.train])
    batch_size, packed = setup.micro_batch(variant)
    with tempfile.TemporaryDirectory() as out:
        # padding-free without packing does not enforce max_length (TRL refuses it); rows are within it already
        args = SFTConfig(**hf_common(out, steps, seed, batch_size), max_length=setup.max_seq_len if packed else None,
                         packing=packed, padding_free=not packed,
                         gradient_checkpointing=variant != "trl+padfree-nogc")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=setup.tokenizer)
        return train_timed(trainer, model, steps, memory)


def orch_run(setup: Setup, steps: int, seed: int) -> dict:
    """One trial through `python -m orchestrator`, as a user types it, in a fresh process with a
    fresh MLflow store and storage: the trial's own time/train_s and tokens (metrics.json) and
    the command's wall time."""
    args = setup.args
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "orchestrator", f"model.name_or_path={args.model}",
                   f"data.train_file={args.train_file}", "data.eval_file=null", f"data.max_train_rows={args.rows}",
                   f"data.max_seq_len={setup.max_seq_len}", f"method.r={args.rank}", f"method.alpha={2 * args.rank}",
                   f"train.batch_size={args.batch_size}", f"train.max_steps={steps}", f"train.seed={seed}",
                   f"train.lr={LR}", f"train.warmup_ratio={WARMUP}", f"train.max_grad_norm={CLIP}",
                   "train.checkpoint_every=0", f"cluster.num_cpus={args.threads}",
                   f"tracking.uri=sqlite:///{out}/mlflow.db", f"storage.path={out}/storage"]
        started = time.perf_counter()
        proc = subprocess.run(command, cwd=out, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - started
        wait_for_ray_to_exit()  # its processes wind down after the command returns: not in the next run
        found = sorted(Path(out, "storage").glob("*/*/metrics.json"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(f"orchestrator exited {proc.returncode}: {(proc.stdout + proc.stderr)[-3000:]}")
        metrics = json.loads(found[0].read_text())
        plan = next((line.strip() for line in proc.stdout.splitlines() if "CPU=" in line), "")
    train_s = metrics["time/train_s"]
    useful = round(metrics["perf/tokens_per_s"] * train_s)
    return {"train_s": train_s, "cpu_s": float("nan"), "useful": useful, "computed": float("nan"),
            "peak": metrics.get("mem/peak_bytes", 0), "model": None, "wall_s": wall, "plan": plan}


# ----------------------------------------------------------------------------- our trainer


def ours_run(setup: Setup, variant: str, steps: int, seed: int, memory: bool = False) -> dict:
    import torch

    from trainers.config import TrainConfig
    from trainers.data import pack_examples
    from trainers.runtime import DistInfo, PeakMemory
    from trainers.tracking import Tracker
    from trainers.training import causal_lm_loss, train_loop

    model = setup.fresh_model(variant)
    batch_size, packed = setup.micro_batch(variant)
    if is_padfree(variant):
        items = setup.padding_free_rows(seed)
    else:
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
    tracked = memory or variant in PEAK_VARIANTS
    if tracked:
        peak.start()
    stats = train_loop(model, items, train, setup.tokenizer.pad_token_id, torch.device("cpu"), DistInfo(),
                       Tracker(), loss_fn=loss_fn, group_by_length=variant == "ours+group",
                       memory=peak if variant == "ours+peak" else None)
    cpu_s = time.process_time() - cpu_start[0]
    peak_bytes = peak.peak_bytes() if tracked else 0
    watched = peak.steps_watched if variant == "ours+peak" else steps if tracked else 0
    return {"train_s": stats.train_s, "cpu_s": cpu_s, "useful": stats.tokens, "computed": computed[0],
            "peak": peak_bytes, "steps_watched": watched, "model": model}


def run(setup: Setup, variant: str, steps: int, seed: int, memory: bool = False) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant in ("hf", "hf+group"):
            return hf_run(setup, steps, seed, memory, group=variant == "hf+group")
        if variant.startswith("trl+"):
            return trl_run(setup, variant, steps, seed, memory)
        if variant == "orch":
            return orch_run(setup, steps, seed)
        return ours_run(setup, variant, steps, seed, memory)


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = VARIANTS + SHAPE_VARIANTS + OPTIONAL
    unknown = sorted(set(variants) - set(known))
    if unknown:
        print(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(dict.fromkeys(known))}", file=sys.stderr)
        return 2
    setup = Setup(args)
    steps = {v: setup.steps(v, args.epochs) for v in variants}
    load_before = os.getloadavg()[0]
    print(f"model {args.shape or args.model} ({model_params(args.model):,} params); data: "
          f"{len(setup.train)} train rows ({setup.mean_len:.1f} tokens mean, "
          f"{min(len(e.input_ids) for e in setup.train)}-{max(len(e.input_ids) for e in setup.train)}), "
          f"{len(setup.eval)} eval rows; max_seq_len {setup.max_seq_len}; LoRA r={args.rank}; "
          f"{args.threads} thread(s) of {os.cpu_count()} CPUs; {args.epochs:g} epoch(s) per run, "
          f"{args.repeats} interleaved repeats; load average {load_before:.1f}", flush=True)
    results = run_interleaved(setup, variants, steps)
    peaks = {v: run(setup, v, args.memory_steps, seed=0, memory=True)["peak"] for v in variants if v != "orch"}
    if "orch" in variants:  # the trial's own mem/peak_bytes, over its whole run
        peaks["orch"] = statistics.median(r["peak"] for r in results["orch"])
    print_table(setup, variants, steps, results, peaks)
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before {load_before:.1f}, after {load_after:.1f}")
    if args.json:
        record = {"args": {k: v for k, v in vars(args).items() if k != "json"}, "steps": steps, "peaks": peaks,
                  "load_average": [load_before, load_after], "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "torch": torch.__version__, "results": results}
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    return 0


def model_params(path: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.model import resolve_model_path

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(path)))
    return sum(p.numel() for p in model.parameters())


def wait_for_ray_to_exit(limit_s: float = 60.0) -> None:
    """Until no Ray process of this user is left (raylet, gcs_server, workers), at most limit_s: a
    local Ray started by `python -m orchestrator` spends CPU on its way down after the command has
    returned, which the next variant in this process would pay for."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            found = subprocess.run(["pgrep", "-u", str(os.getuid()), "-f", "raylet|gcs_server|ray::"],
                                   capture_output=True, text=True).stdout.split()
        except FileNotFoundError:  # no pgrep here: a fixed pause instead
            time.sleep(10)
            return
        if not found:
            return
        time.sleep(0.5)


def trim_heap() -> None:
    """Hand the C heap's free pages back (glibc malloc_trim), so that what a previous run freed does
    not shape the next one's allocations; a no-op where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def run_interleaved(setup: Setup, variants: list[str], steps: dict[str, int]) -> dict[str, list[dict]]:
    """Every variant once per repeat, in turn, repeat i shuffling with seed i and starting one
    variant later (A B C, B C A, C A B...): a variant that runs right after another in the same
    process inherits its heap and caches, so no variant always takes the same place. Each run
    starts from a collected, trimmed heap."""
    import gc

    import torch

    from trainers.evaluate import eval_loss

    results: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(setup.args.repeats):
        shift = repeat % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            gc.collect()
            trim_heap()
            out = run(setup, variant, steps[variant], seed=repeat)
            model = out.pop("model")
            out["eval_loss"] = (eval_loss(model, setup.eval, 64, setup.tokenizer.pad_token_id, torch.device("cpu"))
                                if model is not None else float("nan"))
            out["tokens_per_s"] = out["useful"] / out["train_s"]
            out["tokens_per_cpu_s"] = out["useful"] / out["cpu_s"]
            results[variant].append(out)
            extra = f"  command {out['wall_s']:.1f} s wall" if "wall_s" in out else ""
            print(f"  repeat {repeat + 1} {variant:<12} {steps[variant]:>4} steps  {out['train_s']:6.2f} s  "
                  f"{out['tokens_per_s']:6.0f} useful tok/s  {out['tokens_per_cpu_s']:6.0f} per CPU-s  "
                  f"eval loss {out['eval_loss']:.4f}{extra}", flush=True)
    return results


def print_table(setup: Setup, variants: list[str], steps: dict, results: dict, peaks: dict) -> None:
    args = setup.args
    base = "hf" if "hf" in variants else variants[0]
    med = {v: {k: statistics.median(r[k] for r in results[v])
               for k in ("tokens_per_s", "tokens_per_cpu_s", "eval_loss")} for v in variants}
    fill = {v: statistics.median(r["useful"] / r["computed"] for r in results[v]) for v in variants}
    print()
    print(f"| variant | micro-batch | steps | useful tok/s | vs {base} | per CPU-s | vs {base} | non-pad % | "
          f"peak MiB ({args.memory_steps} steps) | vs {base} | eval loss |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        print(f"| {v} | {setup.shape(v)} | {steps[v]} | {med[v]['tokens_per_s']:.0f} | "
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
    theirs = [v for v in variants if v.startswith(("hf", "trl"))]
    ours = [v for v in variants if v.startswith("ours") and v not in PEAK_VARIANTS]
    if theirs and ours:
        best_theirs = max(theirs, key=lambda v: med[v]["tokens_per_s"])
        best_ours = max(ours, key=lambda v: med[v]["tokens_per_s"])
        print(f"best of ours ({best_ours}) vs best baseline ({best_theirs}): "
              f"{med[best_ours]['tokens_per_s'] / med[best_theirs]['tokens_per_s']:.2f}x useful tok/s")
    if "orch" in variants and "ours" in variants:
        walls = [r["wall_s"] for r in results["orch"]]
        outside = statistics.median(r["wall_s"] - r["train_s"] for r in results["orch"])
        print(f"orchestrated trial vs train_loop (ours), steady state (its time/train_s): "
              f"{med['orch']['tokens_per_s'] / med['ours']['tokens_per_s']:.2f}x useful tok/s; the whole command "
              f"{statistics.median(walls):.1f} s wall, of which {outside:.1f} s "
              f"is process/Ray start, planning, MLflow and saving")
        print(f"orchestrator plan: {results['orch'][0]['plan']}")
    if "ours" in variants:
        for variant in (v for v in PEAK_VARIANTS if v in variants):
            print(peak_cost_line(variant, results, steps))


def peak_cost_line(variant: str, results: dict[str, list[dict]], steps: dict[str, int]) -> str:
    """PeakMemory's cost per training step: `variant`'s loop time over the untracked `ours` of the
    same repeat (interleaved, same seed and batches), median over repeats; CPU time beside it."""
    wall = statistics.median(t["train_s"] / o["train_s"] - 1 for t, o in zip(results[variant], results["ours"]))
    cpu = statistics.median(t["cpu_s"] / o["cpu_s"] - 1 for t, o in zip(results[variant], results["ours"]))
    watched = sorted({r["steps_watched"] for r in results[variant]})
    peaks = sorted({r["peak"] for r in results[variant]})
    return (f"PeakMemory cost, {variant} vs ours: {wall:+.1%} training-loop wall time, {cpu:+.1%} CPU time "
            f"(median of per-repeat ratios); steps watched {'/'.join(map(str, watched))} of {steps[variant]}; "
            f"peak {'/'.join(f'{p:,}' for p in peaks)} bytes")


if __name__ == "__main__":
    sys.exit(main())
