"""Predicted vs measured peak memory of real trials, for every method x base precision.

    python benchmarks/estimator_accuracy.py [--steps 4] [--overhead-steps 60]

Each trial is `run_trial` on the default model (`embedded:base`; a quickly built stand-in of the
same shape and tokenizer while the real one is missing) with the default data, batch and eval
settings, `--steps` optimizer steps, then the recipe's evaluation. Measured: `mem/peak_bytes`
(PeakMemory: peak bytes of live tensors over load, training and evaluation). Predicted:
`trainers.memory.estimate(cfg, seq_len=..., eval_seq_len=...)` with the longest padded batch the
trial trains on and the longest eval row (the estimate's defaults use data.max_seq_len, the
worst case). Also: trainable parameters, closed form vs counted in the model, and the overhead
of PeakMemory's CPU tracking on a longer default trial (tracking on vs off, interleaved).
Prints tables; writes nothing but temporary trial directories.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRECISIONS = ("fp32", "bf16", "int8", "nf4", "fp4")
TARGET = 0.15  # |predicted / measured - 1| the estimator must stay within


def default_paths() -> tuple[str, str, str]:
    """(model, train file, eval file): the embedded defaults, or a stand-in built in /tmp."""
    from trainers.embedded import ASSETS_DIR, build

    if build.base_complete(ASSETS_DIR) and build.data_complete(ASSETS_DIR):
        return "embedded:base", "embedded:instruct_train.jsonl", "embedded:instruct_eval.jsonl"
    stand_in = Path("/tmp/finetune-lab-bench/assets")
    if not (build.base_complete(stand_in) and build.data_complete(stand_in)):
        print("embedded:base is not built yet: building a stand-in (same shape and tokenizer, 20 steps)",
              file=sys.stderr)
        build.build(stand_in, steps=20)
    return (str(stand_in / "base"), str(stand_in / "data" / "instruct_train.jsonl"),
            str(stand_in / "data" / "instruct_eval.jsonl"))


def trial_config(paths, method: str, precision: str, steps: int):
    """The default trial (conf/ defaults) with this method, precision and step count; None if the
    combination is refused by validation."""
    from trainers.config import ConfigError, default_choice
    from trainers.validate import from_container

    model, train_file, eval_file = paths
    compute = "bf16" if precision == "bf16" else "fp32"
    raw = {"model": {"name_or_path": model}, "data": {"train_file": train_file, "eval_file": eval_file},
           "method": {"name": method}, "stage": {"name": default_choice("stage")},
           "precision": {"name": precision, "compute_dtype": compute},
           "train": {"max_steps": steps, "log_every": steps, "checkpoint_every": 0}}
    try:
        return from_container(raw)
    except ConfigError:
        return None


def sequence_lengths(cfg) -> tuple[int, int]:
    """(longest padded training batch over the trial's steps, longest eval row)."""
    from trainers.data import load_rows, tokenize_split
    from trainers.model import load_tokenizer
    from trainers.runtime import DistInfo
    from trainers.training import micro_batches

    tokenizer = load_tokenizer(cfg.model)
    fmt, rows, sources = load_rows(cfg.data.train_file, cfg.data.format)
    examples = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, cfg.data.overlength).examples
    stream = micro_batches(examples, cfg.train.batch_size, cfg.train.seed, DistInfo())
    longest = max(max(len(e.input_ids) for e in next(stream))
                  for _ in range(cfg.train.max_steps * cfg.train.grad_accum))
    fmt, rows, sources = load_rows(cfg.data.eval_file, fmt)
    evals = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, cfg.data.overlength).examples
    return longest, max(len(e.input_ids) for e in evals)


def accuracy_table(paths, steps: int) -> tuple[list[str], list[float]]:
    from trainers.memory import estimate, load_shape, trainable_params
    from trainers.methods import METHODS
    from trainers.trial import run_trial

    lines = ["| method | precision | trainable (formula / model) | predicted MiB | measured MiB | "
             "predicted / measured | predicted peak in |", "|---|---|---|---:|---:|---:|---|"]
    ratios, lengths = [], None
    for method in METHODS:
        for precision in PRECISIONS:
            cfg = trial_config(paths, method, precision, steps)
            if cfg is None:
                continue
            lengths = lengths or sequence_lengths(cfg)
            est = estimate(cfg, seq_len=lengths[0], eval_seq_len=lengths[1])
            with tempfile.TemporaryDirectory() as out:
                metrics = run_trial(cfg, out)
            measured = metrics["mem/peak_bytes"]
            ratio = est.peak_bytes / measured
            ratios.append(ratio)
            closed = trainable_params(load_shape(cfg.model.name_or_path), cfg)
            counted = int(metrics["model/trainable_params"])
            phase = "train" if est.train_peak_bytes >= est.eval_peak_bytes else "eval"
            lines.append(f"| {method} | {precision} | {closed:,} / {counted:,}{'' if closed == counted else ' (!)'} | "
                         f"{est.peak_bytes / 2**20:.2f} | {measured / 2**20:.2f} | {ratio:.3f} | {phase} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines.insert(0, f"batch {cfg.train.batch_size}, longest training batch {lengths[0]} tokens, eval batch "
                    f"{cfg.train.eval_batch_size}, longest eval row {lengths[1]} tokens, {steps} steps\n")
    return lines, ratios


def overhead_table(paths, steps: int, repeats: int = 3) -> list[str]:
    """A default LoRA trial with PeakMemory's CPU tracking on vs off (start() made a no-op)."""
    from trainers import runtime
    from trainers.trial import run_trial

    cfg = trial_config(paths, "lora", "fp32", steps)
    start = runtime.PeakMemory.start
    times: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
    for _ in range(repeats):
        for tracked in (True, False):
            runtime.PeakMemory.start = start if tracked else (lambda self: None)
            try:
                with tempfile.TemporaryDirectory() as out:
                    wall, cpu = time.perf_counter(), time.process_time()
                    metrics = run_trial(cfg, out)
                    times[tracked].append((time.perf_counter() - wall, time.process_time() - cpu,
                                           metrics["time/train_s"]))
            finally:
                runtime.PeakMemory.start = start
    best = {k: [min(run[i] for run in v) for i in range(3)] for k, v in times.items()}
    lines = [f"PeakMemory overhead: default LoRA trial, {steps} steps + eval, best of {repeats} (interleaved)\n",
             "| | tracking off | tracking on | on / off |", "|---|---:|---:|---:|"]
    for i, label in enumerate(("trial wall s", "trial CPU s", "train loop wall s (time/train_s)")):
        lines.append(f"| {label} | {best[False][i]:.2f} | {best[True][i]:.2f} | {best[True][i] / best[False][i]:.2f} |")
    return lines


def main(argv=None) -> int:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per accuracy trial")
    parser.add_argument("--overhead-steps", type=int, default=60, help="steps of the overhead trial (0: skip)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    paths = default_paths()
    print(f"model {paths[0]}\n")
    lines, ratios = accuracy_table(paths, args.steps)
    print("\n".join(lines))
    worst = max(abs(r - 1) for r in ratios)
    print(f"\n{len(ratios)} trials; worst |predicted / measured - 1| = {worst:.1%} "
          f"({'within' if worst <= TARGET else 'OUTSIDE'} the {TARGET:.0%} target)")
    if args.overhead_steps:
        print()
        print("\n".join(overhead_table(paths, args.overhead_steps)))
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
