"""Run one trial in a plain process, no Ray, no MLflow:

    python -m trainers --config trial.yaml [--output-dir DIR] [KEY=VALUE ...]

trial.yaml is a resolved config (e.g. the config.yaml logged with every MLflow child run, or a
dry run's plan); KEY=VALUE pairs override it (`method.r=4 train.max_steps=50`).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    from trainers.config import ConfigError
    from trainers.validate import from_container
    from trainers.data import DataError
    from trainers.tracking import ConsoleTracker
    from trainers.trial import run_trial

    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="resolved trial config (YAML)")
    parser.add_argument("--output-dir", default="trial_output", help="where the adapter/model and metrics go")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides")
    args = parser.parse_args(argv)
    try:
        raw = OmegaConf.merge(OmegaConf.load(args.config), OmegaConf.from_dotlist(args.overrides))
        cfg = from_container(raw)
        metrics = run_trial(cfg, args.output_dir, tracker=ConsoleTracker())
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
