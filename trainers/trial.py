"""One trial, start to finish, in the current process: `run_trial(cfg, output_dir)`.

This is what a Ray Train worker runs, what `python -m trainers` runs, and what tests call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

from trainers import timeline
from trainers.checkpoint import file_sha256
from trainers.config import ExperimentConfig
from trainers.context import TrialContext
from trainers.runtime import dist_info, pick_device, seed_everything, set_threads
from trainers.storage import TrialStorage
from trainers.tracking import Tracker

log = logging.getLogger("trainers")


def run_trial(cfg: ExperimentConfig, output_dir: str | Path, tracker: Tracker | None = None,
              device=None, prepared_dir: str | None = None) -> dict[str, float]:
    """Train, evaluate and save one configured trial; returns its final metrics (rank 0's) once the
    tracker has recorded them (TrackingError if it cannot). `prepared_dir`: where its prepared data
    is (default `<storage.path>/prepared`)."""
    from trainers.recipes import RECIPES

    timeline.mark("running")  # a Ray worker marked it already: when the sweep started the trial
    timeline.mark("trial_started")
    set_threads(cfg.train.cpus_per_worker)
    seed_everything(cfg.train.seed)
    dist = dist_info()
    # output_dir may be remote (s3://...): the trial then writes to a local staging dir and uploads.
    storage = TrialStorage(output_dir, dist.rank)
    output_dir = storage.local
    device = device if device is not None else pick_device(cfg.train.use_gpu, dist.local_rank)
    ctx = TrialContext(cfg=cfg, output_dir=output_dir, device=device, dist=dist, tracker=tracker or Tracker(),
                       storage=storage, prepared_dir=prepared_dir)
    recipe = RECIPES[cfg.stage.name]
    try:
        metrics = recipe.run(ctx)
    except Exception as err:
        _flush_after_failure(ctx.tracker)
        if out_of_memory(err):
            raise TrialOutOfMemoryError(out_of_memory_reason(cfg, device, err)) from err
        raise
    finally:
        ctx.memory.stop()  # a failed trial must not leave the CPU tensor tracker installed
        times = timeline.metrics()
        timeline.clear()  # the next trial in this process starts its own
    if dist.is_main:
        if "mem/estimated_peak_bytes" not in metrics:  # recipes that know their batch shapes set it
            estimate = ctx.estimated_peak_bytes()
            if estimate is not None:
                metrics["mem/estimated_peak_bytes"] = estimate
        from trainers.recipes.inputs import LINEAGE_FILE, write_lineage

        metrics.update(times)
        ctx.tracker.log_metrics(metrics)
        ctx.tracker.flush()  # the curves too, before the output is marked usable
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        write_lineage(output_dir, cfg, recipe.produces)  # last: marks the output usable by later stages
        storage.publish(last=("metrics.json", LINEAGE_FILE))
    storage.cleanup()
    return metrics


def _flush_after_failure(tracker: Tracker) -> None:
    """Keeps what a failed trial logged before it failed; the failure, not the tracker's, is raised."""
    try:
        tracker.flush()
    except Exception as err:
        log.warning("metrics of the failed trial not all recorded: %s", err)


class TrialOutOfMemoryError(RuntimeError):
    """An allocation of the trial really failed: its batch, sequence length or model does not fit."""


def out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's,
    which torch raises as a plain RuntimeError."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(err)


def out_of_memory_reason(cfg: ExperimentConfig, device, err: BaseException) -> str:
    """The failure reason a sweep shows: which settings decide the memory, and the allocator's words."""
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return (f"out of memory on {device} (stage={cfg.stage.name}, method={cfg.method.name}, "
            f"train.batch_size={cfg.train.batch_size}, data.max_seq_len={cfg.data.max_seq_len}): lower "
            f"train.batch_size (raise train.grad_accum to keep the effective batch) or data.max_seq_len; "
            f"`python -m trainers.memory` estimates the peak. {detail}")


# What a result depends on besides its config (and the code: the orchestrator adds the git state).
ENV_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "ray", "mlflow", "datasets")
MODEL_HASH_LIMIT = 2**30  # hashing a multi-GB local checkpoint per trial costs more than it tells


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cfg: ExperimentConfig, device=None, inputs: dict[str, str] | None = None) -> dict[str, str]:
    """Short strings (MLflow tags `env.*`): package versions, python, device, and `inputs`
    (default: inputs_environment(cfg), which a sweep computes once on its driver for every trial)."""
    from importlib import metadata

    import torch

    env = {"python": platform.python_version(), "torch_threads": str(torch.get_num_threads())}
    for name in ENV_PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "not installed"
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = f"{device.type} ({_cpu_model()})"  # CPU kernels, hence float sums, differ by ISA
    env.update(inputs_environment(cfg) if inputs is None else inputs)
    return env


def inputs_environment(cfg: ExperimentConfig) -> dict[str, str]:
    """sha256 of the data sources, of the chat template and of a local base model (the embedded
    one is rebuilt per machine). It reads every data file, loads the tokenizer and reads the
    weights: the same for every trial on the same inputs, hence computed once per sweep."""
    from trainers.data import data_fingerprint, resolve_path
    from trainers.model import load_tokenizer
    from trainers.templates import chat_template

    env = {f"data.{split}_sha256": digest for split, digest in data_fingerprint(cfg.data).items()}
    # Which template the rows were rendered with (param data.template says model or plain; a
    # model's template text changes between revisions, its hash tells the runs apart).
    env["data.template_sha256"] = chat_template(load_tokenizer(cfg.model), cfg.data.template).sha256
    model_dir = resolve_path(cfg.model.name_or_path)
    if model_dir.is_dir():
        weights = sorted(model_dir.glob("*.safetensors"))
        if sum(w.stat().st_size for w in weights) <= MODEL_HASH_LIMIT:
            digest = hashlib.sha256("".join(f"{w.name}:{file_sha256(w)}\n" for w in weights).encode())
            env["model_sha256"] = digest.hexdigest()
    return env


def check_inputs(cfg: ExperimentConfig, root: str | None = None) -> dict[str, int]:
    """Validate a trial's data against its tokenizer before any compute (prepare_inputs); returns
    row counts."""
    return prepare_inputs(cfg, root).counts()


def prepare_inputs(cfg: ExperimentConfig, root: str | None = None, progress=None):
    """Validate a trial's data against its tokenizer, and its model weights, before any compute:
    the data by preparing it (trainers.prepared: the one tokenization pass its trials then reuse):
    every row's rules, its rendering by the chat template (eval prompts too), `data.overlength`,
    and the stage's data kind; then that the weights are there. Raises DataError (source:row) or
    ConfigError (model or data key); returns the StageData (`.counts()`: row counts, `.status`:
    built | reused). Sets `data.template` of `cfg` to the template it resolved to (model | plain):
    the value a run logs and replays."""
    from trainers.config import ConfigError
    from trainers.model import weights_problems
    from trainers.prepared import stage_data
    from trainers.templates import chat_template, load_chat_tokenizer

    try:
        tokenizer = load_chat_tokenizer(cfg)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError([("model.name_or_path", f"cannot load tokenizer of {cfg.model.name_or_path!r}: "
                                                  f"{str(err).splitlines()[0]}")]) from None
    data = stage_data(cfg, tokenizer, root, progress)
    problems = weights_problems(cfg.model)  # after the data, whose rules name rows whatever the model
    if problems:
        raise ConfigError(problems)
    cfg.data.template = chat_template(tokenizer, cfg.data.template).name
    return data
