"""python -m trainers.memory MODEL: estimated peak memory per method and base precision.
python -m trainers.memory fit MODEL --memory 24GiB: the largest micro-batch that fits (fit.py)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional

from trainers.memory.counts import FLOAT_BYTES, GIB
from trainers.memory.estimate import RUNTIME_OVERHEAD, estimate
from trainers.memory.fit import MAX_BATCH, fit_batch
from trainers.memory.shapes import KNOWN_MODELS, UnknownModelError, load_shape
from trainers.memory.sizes import format_size, parse_size

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig


def experiment(model: str, method: str, precision: str, args) -> "ExperimentConfig":
    from trainers.config import DataConfig, ExperimentConfig, ModelConfig, PrecisionConfig, TrainConfig
    from trainers.methods import METHODS
    from trainers.recipes import RECIPES

    method_cfg = METHODS[method].config_cls()
    if hasattr(method_cfg, "r"):
        method_cfg.r = args.rank
    compute = precision if precision in FLOAT_BYTES else "bf16"
    return ExperimentConfig(
        model=ModelConfig(name_or_path=model),
        data=DataConfig(train_file="-", eval_file="-" if args.eval_batch_size else None, max_seq_len=args.seq_len),
        method=method_cfg,
        stage=RECIPES[args.stage].config_cls(),
        precision=PrecisionConfig(name=precision, compute_dtype=compute,
                                  double_quant=args.double_quant and precision in ("nf4", "fp4")),
        train=TrainConfig(batch_size=args.batch_size, optimizer=args.optimizer,
                          eval_batch_size=args.eval_batch_size or 1, use_gpu=args.device == "cuda",
                          gradient_checkpointing=args.gradient_checkpointing),
    )


def _parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trainers.memory",
        description="Estimated peak memory (GiB) of fine-tuning MODEL, per method and base precision. "
                    "`python -m trainers.memory fit MODEL --memory SIZE`: the largest micro-batch that fits.")
    parser.add_argument("model", metavar="MODEL",
                        help=f"config.json, model directory, embedded:base or a known name ({', '.join(KNOWN_MODELS)})")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (default 1)")
    add_common_arguments(parser)
    parser.add_argument("--breakdown", action="store_true", help="print every estimate's components")
    return parser


def add_common_arguments(parser) -> None:
    """The options of both commands: what the trial is, apart from its batch."""
    from trainers.config import OPTIMIZERS, PRECISIONS, default_choice
    from trainers.recipes import RECIPES

    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--methods", default="full,lora,qlora", help="comma-separated (default full,lora,qlora)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated (default all)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--stage", default=default_choice("stage"), choices=sorted(RECIPES),
                        help="the training stage, with its config's defaults (default: conf/config.yaml's)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="train.gradient_checkpointing: layers keep only their inputs, recomputed in backward")
    parser.add_argument("--double-quant", action="store_true", help="4-bit bases quantize their scales too")
    parser.add_argument("--eval-batch-size", type=int, default=0,
                        help="also count the eval pass at this batch size (default 0: training only)")
    parser.add_argument("--device", default="cuda", choices=sorted(RUNTIME_OVERHEAD),
                        help="whose runtime overhead to add (default cuda)")


def check_common(args):
    """(shape, methods, precisions) of valid arguments, the model printed; or the exit code 2
    after saying what is wrong."""
    from trainers.config import PRECISIONS
    from trainers.methods import METHODS

    methods = [m for m in args.methods.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [m for m in methods if m not in METHODS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        print(f"error: unknown method/precision {', '.join(unknown)}; methods: {', '.join(sorted(METHODS))}; "
              f"precisions: {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if args.seq_len < 1 or args.batch_size < 1 or args.rank < 1:
        print("error: --seq-len, --batch-size and --rank must be >= 1", file=sys.stderr)
        return 2
    try:
        shape = load_shape(args.model)
    except UnknownModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_model(shape)
    return shape, methods, precisions


def print_model(shape) -> None:
    print(f"{shape.name}: {shape.total_params() / 1e9:.3g}B params (hidden {shape.hidden}, {shape.layers} layers, "
          f"{shape.heads} heads / {shape.kv_heads} kv, vocab {shape.vocab})")


def main(argv: Optional[list[str]] = None) -> int:
    from trainers.methods import METHODS

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        return fit_main(argv[1:])
    args = _parser().parse_args(argv)
    checked = check_common(args)
    if isinstance(checked, int):
        return checked
    shape, methods, precisions = checked
    print(f"batch {args.batch_size} x seq {args.seq_len}, {args.optimizer}, LoRA r={args.rank}"
          f"{', eval batch ' + str(args.eval_batch_size) if args.eval_batch_size else ''}; "
          f"GiB including {RUNTIME_OVERHEAD[args.device] / GIB:g} GiB {args.device} runtime overhead\n")
    estimates, cells, refusals = [], {}, {}
    for method in methods:
        for precision in precisions:
            cfg = experiment(args.model, method, precision, args)
            problems = METHODS[method].combination_problems(cfg)
            if problems:
                cells[method, precision] = "n/a"
                refusals[method, precision] = problems[0][1]
                continue
            est = estimate(cfg, shape, device=args.device)
            estimates.append(est)
            gib = est.total_bytes / GIB
            cells[method, precision] = f"{gib:.1f}" if gib >= 10 else f"{gib:.2f}" if gib >= 1 else f"{gib:.3f}"
    width = max(len(m) for m in methods + ["method"])
    print(f"{'method':<{width}}  " + "  ".join(f"{p:>8}" for p in precisions))
    for method in methods:
        print(f"{method:<{width}}  " + "  ".join(f"{cells[method, p]:>8}" for p in precisions))
    print("\nbf16/fp16 train in that dtype throughout (full fine-tuning: weights, grads and AdamW states "
          "8 B/param; fp32: 16 B/param).")
    for method in methods:
        refused = [p for p in precisions if (method, p) in refusals]
        if refused:
            print(f"n/a {method}: {', '.join(refused)} (the method's own checks refuse it; --breakdown says why)")
    if args.breakdown:
        for (method, precision), reason in refusals.items():
            print(f"\n{method} on {precision}: {reason}")
        for est in estimates:
            print()
            print(est.table())
    return 0


def _fit_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m trainers.memory fit",
        description="Per method and base precision: the largest micro-batch whose estimated memory (peak + "
                    "runtime overhead) fits --memory, and the gradient accumulation reaching --global-batch.")
    parser.add_argument("model", metavar="MODEL", help="as for python -m trainers.memory MODEL")
    parser.add_argument("--memory", required=True, help="per device: 24GiB, 512MiB, 8GB (decimal) or bytes")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="rows per optimizer step (per worker); default: no accumulation")
    add_common_arguments(parser)
    return parser


def fit_main(argv: list[str]) -> int:
    """python -m trainers.memory fit MODEL --memory SIZE: see trainers/memory/fit.py."""
    from trainers.methods import METHODS

    args = _fit_parser().parse_args(argv)
    try:
        limit = parse_size(args.memory)
    except ValueError as err:
        print(f"error: --memory: {err}", file=sys.stderr)
        return 2
    if args.global_batch is not None and args.global_batch < 1:
        print(f"error: --global-batch must be >= 1, got {args.global_batch}", file=sys.stderr)
        return 2
    args.batch_size = 1
    checked = check_common(args)
    if isinstance(checked, int):
        return checked
    shape, methods, precisions = checked
    print(f"memory limit {format_size(limit)} per device (estimate: peak + runtime overhead)"
          + (f", global batch {args.global_batch} rows" if args.global_batch else "") + "\n")
    rows = [("method", "precision", "micro-batch", "grad accum", "global", "estimate")]
    refusals = []
    for method in methods:
        for precision in precisions:
            cfg = experiment(args.model, method, precision, args)
            problems = METHODS[method].combination_problems(cfg)
            if problems:
                rows.append((method, precision, "n/a", "", "", ""))
                refusals.append(f"n/a {method} on {precision}: {problems[0][1]}")
                continue
            fit = fit_batch(cfg, limit, args.global_batch, shape, args.device)
            if not fit.fits:
                rows.append((method, precision, "does not fit", "", "", f"{format_size(fit.total_bytes)} at batch 1"))
                continue
            capped = "+" if not args.global_batch and fit.micro_batch == MAX_BATCH else ""
            rows.append((method, precision, f"{fit.micro_batch}{capped}", str(fit.grad_accum),
                         str(fit.micro_batch * fit.grad_accum), format_size(fit.total_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(text.ljust(w) if i < 2 else text.rjust(w) if i < 5 else text
                        for i, (text, w) in enumerate(zip(row, widths))).rstrip())
    for line in refusals:
        print(line)
    return 0
