"""Command line for the embedded default.

    python -m trainers.embedded build [--out DIR] [--force] [--steps N] [--rounds N]
    python -m trainers.embedded check [--dir DIR] [--steps N] [--ranks 1 8 16] [--skip-full]

`build` regenerates what is missing (everything with --force); `check` measures that the task does
its job: low base accuracy, higher after LoRA, a rank trend, and working full fine-tuning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trainers.embedded import ASSETS_DIR


def main(argv: list[str] | None = None) -> None:
    from trainers.embedded import build as B

    parser = argparse.ArgumentParser(prog="python -m trainers.embedded")
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="generate the data files and pretrain the base model")
    p_build.add_argument("--out", type=Path, default=ASSETS_DIR, help="assets root (default: %(default)s)")
    p_build.add_argument("--force", action="store_true", help="rebuild even what exists")
    p_build.add_argument("--steps", type=int, default=B.DEFAULT_STEPS,
                         help="pretraining steps (default: %(default)s; fewer = faster, weaker base)")
    p_build.add_argument("--rounds", type=int, default=B.DEFAULT_ROUNDS,
                         help="times each fact is stated in the corpus (default: %(default)s)")
    p_check = sub.add_parser("check", help="measure base / LoRA / full fine-tuning accuracy")
    p_check.add_argument("--dir", type=Path, default=ASSETS_DIR, help="assets root (default: %(default)s)")
    p_check.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run")
    p_check.add_argument("--ranks", type=int, nargs="+", default=[1, 8, 16])
    p_check.add_argument("--skip-full", action="store_true", help="skip full fine-tuning")
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.steps < 1 or args.rounds < 1:
            parser.error("--steps and --rounds must be >= 1")
        B.build(args.out, force=args.force, steps=args.steps, rounds=args.rounds)
    else:
        from trainers.embedded import check

        check.main(args.dir, steps=args.steps, ranks=args.ranks, full=not args.skip_full)


if __name__ == "__main__":
    main()
