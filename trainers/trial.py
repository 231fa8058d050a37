"""One trial, start to finish, in the current process: `run_trial(cfg, output_dir)`.

This is what a Ray Train worker runs, what `python -m trainers` runs, and what tests call.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainers.config import ExperimentConfig
from trainers.context import TrialContext
from trainers.runtime import dist_info, pick_device, seed_everything
from trainers.tracking import Tracker


def run_trial(cfg: ExperimentConfig, output_dir: str | Path, tracker: Tracker | None = None,
              device=None) -> dict[str, float]:
    """Train, evaluate and save one configured trial; returns its final metrics (rank 0's)."""
    import torch

    from trainers.recipes import RECIPES

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.train.seed)
    dist = dist_info()
    device = device if device is not None else pick_device(cfg.train.use_gpu, dist.local_rank)
    ctx = TrialContext(cfg=cfg, output_dir=output_dir, device=device, dist=dist, tracker=tracker or Tracker())
    metrics = RECIPES[cfg.stage.name].run(ctx)
    if dist.is_main:
        ctx.tracker.log_metrics(metrics)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def check_inputs(cfg: ExperimentConfig) -> dict[str, int]:
    """Validate a trial's data against its tokenizer before any compute: every row's rules, and
    `data.overlength`. Raises DataError (file:line) or ConfigError (model key); returns row counts."""
    from trainers.config import ConfigError
    from trainers.data import load_rows, tokenize_split
    from trainers.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.model)
    except (OSError, ValueError) as err:
        raise ConfigError([("model.name_or_path", f"cannot load tokenizer of {cfg.model.name_or_path!r}: "
                                                  f"{str(err).splitlines()[0]}")]) from None
    counts = {}
    files = [("train", cfg.data.train_file, cfg.data.max_train_rows)]
    if cfg.data.eval_file:
        files.append(("eval", cfg.data.eval_file, cfg.data.max_eval_rows))
    fmt = cfg.data.format
    for split, uri, limit in files:
        fmt, rows, sources = load_rows(uri, fmt, limit)
        if fmt in ("instruction", "chat"):
            stats = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, cfg.data.overlength).stats
            counts.update(stats.as_metrics(split))
        else:
            counts[f"data/{split}_rows"] = len(rows)
    return counts
