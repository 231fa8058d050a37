"""How a stage starts from another stage's output (`stage.init_from`, `stage.reward_from`).

A finished stage's output directory holds:

    adapter/ or model/   the method's artifact (trainers.methods), relative to the model the stage
                         started from
    lineage.json         what that model was: {"stage", "task", "init_from", "base", "method"}
    metrics.json

A downstream stage starts from its upstream with the upstream's training merged into the weights
(PEFT `merge_and_unload`; full and BitFit artifacts are weights already) and trains a fresh
adapter of its own on top, so its artifact is relative to that merged model. Loading any output
follows lineage.json back to the base model:

    policy = load_start(cfg, device)                                  # base, or stage.init_from merged
    reward = load_reward_model(cfg, "runs/rlhf/<key>", device, pad_id)  # frozen scalar-head model

Merging runs on the CPU in fp32 (bf16 when the trial computes in bf16); the merged model is then
written to a temporary directory and loaded like a base model, so the trial's precision
(quantization included) and head (a reward model's score head) apply to it as to a base. An
output in remote storage (s3://...) is downloaded first (lineage.json and the artifact only).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from trainers import storage, timeline
from trainers.config import VARLEN_ATTENTION, ExperimentConfig, PrecisionConfig
from trainers.model import load_base_model, resolve_model_path

LINEAGE_FILE = "lineage.json"
# RecipeSpec.produces -> the model head its output has.
TASK_OF = {"policy": "causal_lm", "reward_model": "sequence_classification"}


def model_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal_lm": AutoModelForCausalLM, "sequence_classification": AutoModelForSequenceClassification}[task]


def head_kwargs(task: str) -> dict:
    # A reward model is one scalar per sequence.
    return {"num_labels": 1} if task == "sequence_classification" else {}


def write_lineage(output_dir: Path, cfg: ExperimentConfig, produces: str) -> None:
    init_from = cfg.stage.init_from
    record = {"stage": cfg.stage.name, "task": TASK_OF[produces], "method": cfg.method.name,
              "init_from": storage.normalize(init_from) if init_from else None, "base": cfg.model.name_or_path}
    (Path(output_dir) / LINEAGE_FILE).write_text(json.dumps(record, indent=2) + "\n")


_fetched: dict[str, Path] = {}


def local_output(stage_dir: str | Path) -> Path:
    """A stage output as a local directory: itself, or (remote storage) a downloaded copy of its
    lineage.json and artifact, made once per process."""
    location = storage.normalize(stage_dir)
    if not storage.is_remote(location):
        return Path(location)
    if location not in _fetched:
        local = Path(tempfile.mkdtemp(prefix="stage-output-"))
        for name in (LINEAGE_FILE, "adapter", "model"):
            storage.download(storage.join(location, name), local / name)
        _fetched[location] = local
    return _fetched[location]


def read_lineage(stage_dir: str | Path, key: str = "stage.init_from") -> dict:
    path = local_output(stage_dir) / LINEAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{key}={stage_dir}: not the output of a finished stage (no {LINEAGE_FILE} "
                                "beside adapter/ or model/)")
    return json.loads(path.read_text())


def check_lineage(cfg: ExperimentConfig, stage_dir: str | Path, task: str, key: str) -> dict:
    record = read_lineage(stage_dir, key)
    if record["task"] != task:
        wanted = "a reward model" if task == "sequence_classification" else "a policy (causal LM)"
        raise ValueError(f"{key}={stage_dir}: holds the {record['task']} output of stage {record['stage']}; "
                         f"this stage needs {wanted}")
    if record["base"] != cfg.model.name_or_path:
        raise ValueError(f"{key}={stage_dir}: trained on model {record['base']}, this trial has "
                         f"model.name_or_path={cfg.model.name_or_path}")
    return record


def merge_precision(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config merging loads with: on the CPU, so without CUDA-only attention kernels."""
    dtype = "bf16" if "bf16" in (cfg.precision.name, cfg.precision.compute_dtype) else "fp32"
    model = cfg.model
    if model.attn_implementation in VARLEN_ATTENTION:
        model = dataclasses.replace(model, attn_implementation="sdpa")
    return dataclasses.replace(cfg, model=model, precision=PrecisionConfig(name=dtype, compute_dtype=dtype))


def merge(model, artifact: Path):
    """`model` with its adapter folded into the weights; refuses artifacts that cannot fold."""
    import peft

    from trainers.methods import METHODS
    from trainers.methods.base import METHOD_RECORD_ATTR

    if isinstance(model, peft.PeftModel):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError(f"{artifact}: a {model.active_peft_config.peft_type} adapter adds virtual tokens and "
                             "cannot be merged into the weights; start later stages from another method")
        return model.merge_and_unload()
    record = getattr(model, METHOD_RECORD_ATTR, None)
    if record is not None and getattr(METHODS[record["method"]], "attach", None) is not None:
        raise ValueError(f"{artifact}: method {record['method']} inserts modules that cannot be merged into "
                         "the weights; start later stages from another method")
    return model


def merged_model(cfg: ExperimentConfig, stage_dir: str | Path):
    """The model a stage output describes, with its training (and its upstream's) merged in: a
    plain transformers model on the CPU."""
    import torch

    from trainers.methods import load_trained
    from trainers.model import torch_dtype

    record = read_lineage(stage_dir)
    stage_dir = local_output(stage_dir)
    task, mcfg = record["task"], merge_precision(cfg)
    if (stage_dir / "model").is_dir():
        return model_class(task).from_pretrained(str(stage_dir / "model"), dtype=torch_dtype(mcfg.precision.name),
                                                 use_safetensors=True)
    artifact = stage_dir / "adapter"
    if not artifact.is_dir():
        raise FileNotFoundError(f"{stage_dir}: no adapter/ or model/ directory")
    cpu = torch.device("cpu")
    if record["init_from"]:
        base = materialize(mcfg, record["init_from"], cpu, task)
    else:
        base = load_base_model(mcfg, cpu, model_class(task), **head_kwargs(task))
    return merge(load_trained(base, artifact), artifact)


def materialize(cfg: ExperimentConfig, stage_dir: str | Path, device, task: str):
    """A fresh base for the next stage: the output in stage_dir merged, loaded at cfg's precision
    on `device`, with the head of `task` (a new score head when a policy becomes a reward model)."""
    merged = merged_model(cfg, stage_dir)
    with tempfile.TemporaryDirectory(prefix="merged-") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        del merged
        local = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=tmp, revision=None))
        model = load_base_model(local, device, model_class(task), **head_kwargs(task))
    # Not the temporary directory: adapters record this as their base_model_name_or_path.
    model.name_or_path = model.config._name_or_path = resolve_model_path(cfg.model.name_or_path)
    return model


def load_start(cfg: ExperimentConfig, device, task: str = "causal_lm"):
    """The model a stage trains from: the base model, or the policy in `stage.init_from` merged;
    with the head of `task` (a reward stage puts a score head on its policy)."""
    timeline.mark("data_ready")  # every recipe prepares its data before its model
    if not cfg.stage.init_from:
        model = load_base_model(cfg, device, model_class(task), **head_kwargs(task))
    else:
        check_lineage(cfg, cfg.stage.init_from, "causal_lm", "stage.init_from")
        model = materialize(cfg, cfg.stage.init_from, device, task)
    timeline.mark("model_loaded")
    return model


def load_reward_model(cfg: ExperimentConfig, reward_dir: str | Path, device, pad_token_id: int,
                      key: str = "stage.reward_from"):
    """The trained reward model in `reward_dir`, frozen, in eval mode."""
    check_lineage(cfg, reward_dir, "sequence_classification", key)
    model = materialize(cfg, reward_dir, device, "sequence_classification")
    model.config.pad_token_id = pad_token_id  # where the score is read: the last non-pad token
    model.requires_grad_(False)
    return model.eval()
