"""Shared shapes of a method entry: its config base class and its registry record.

Artifacts: PEFT methods save `adapter/` through `save_pretrained` (adapter_config.json +
adapter_model.safetensors, loadable with `peft.PeftModel.from_pretrained`). Methods PEFT does not
have (BitFit, bottleneck adapters) save `adapter/` as method_config.json (the method and its
config) + adapter_model.safetensors (the trained tensors under their names in the model).
`trainers.methods.load_trained(base, dir)` reloads any of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional

if TYPE_CHECKING:
    import torch

    from trainers.config import ExperimentConfig

METHOD_CONFIG_FILE = "method_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Attribute a non-PEFT method leaves on the model it attached to: {"method": name, "config": {...}}.
METHOD_RECORD_ATTR = "trained_method_record"


@dataclass
class MethodConfig:
    name: str = "?"

    def check(self) -> list[tuple[str, str]]:
        """Problems with this method's own fields, keyed relative to `method.`."""
        return []


def no_combination_limits(cfg: "ExperimentConfig") -> list[tuple[str, str]]:
    return []


def no_virtual_tokens(method: Any) -> tuple[int, int]:
    return 0, 0


@dataclass
class MethodSpec:
    name: str
    config_cls: type
    # Freeze/wrap the loaded base model for training; returns the model to train.
    apply: Callable[["torch.nn.Module", "ExperimentConfig"], "torch.nn.Module"]
    # `adapter`: PEFT adapter dir (adapter_config.json + adapter_model.safetensors); `model`: full weights.
    saves: Literal["adapter", "model"] = "adapter"
    # Which precisions/stages it can sit on; returns (key, reason) for impossible combinations.
    check_combination: Callable[["ExperimentConfig"], list[tuple[str, str]]] = no_combination_limits
    # Where the base model's architecture (read from its config.json) leaves the method nothing to
    # work on: no biases, no layer of a named target. Kept apart from check_combination because a
    # comparison sweep skips such a trial (trainers.config.InapplicableError), where it refuses a
    # wrong setting.
    check_architecture: Callable[["ExperimentConfig"], list[tuple[str, str]]] = no_combination_limits
    summary: str = ""
    # The trained model is one plain model: the artifact folds into the base's weights (PEFT's
    # merge_and_unload, or tensors trained in place), so a later stage or an export starts from it.
    # False for methods that prepend virtual tokens or insert modules.
    mergeable: bool = True
    # (tokens prepended to every input row, prefix length added to every attention's keys/values)
    # for this method config: sequences grow by them, and packed rows would share them.
    virtual_tokens: Callable[[Any], tuple[int, int]] = no_virtual_tokens
    # Element counts of the tensors it trains, in closed form from the model's shape
    # (trainers.memory.shapes.ModelShape) and the method config: the memory estimator's input.
    trainable_sizes: Optional[Callable[[Any, Any], list[int]]] = None
    # What it changes in a training step's memory, for that shape and method config: a
    # trainers.memory.terms.MethodTerms, or the method's own subclass of it (what its modules keep
    # on a targeted layer, after a block, in an eval forward). None: nothing beyond its trainable
    # tensors.
    memory_terms: Optional[Callable[[Any, Any], Any]] = None
    # train.fsdp can shard it (FSDP2 over the workers): it trains every weight of the base.
    shards: bool = False

    def combination_problems(self, cfg: "ExperimentConfig") -> list[tuple[str, str]]:
        """check_combination plus what no base of this architecture and precision can do."""
        return self.check_combination(cfg) + self.architecture_problems(cfg) + self.checkpointing_problems(cfg)

    def checkpointing_problems(self, cfg: "ExperimentConfig") -> list[tuple[str, str]]:
        """A key/value prefix rides in the layers' cache, which a checkpointed layer drops
        (transformers sets cache=None: recomputing would append the prefix a second time)."""
        if not cfg.train.gradient_checkpointing or not self.virtual_tokens(cfg.method)[1]:
            return []
        return [("train.gradient_checkpointing",
                 f"method {self.name} passes its trained prefix to every layer as a key/value cache, which "
                 "activation checkpointing drops; set train.gradient_checkpointing=false")]

    def architecture_problems(self, cfg: "ExperimentConfig") -> list[tuple[str, str]]:
        """What this method (at this precision, on this device) cannot do on cfg.model's architecture."""
        return self.check_architecture(cfg) + cpu_4bit_problems(cfg)

    def prepare(self, model: "torch.nn.Module", cfg: "ExperimentConfig") -> "torch.nn.Module":
        """The loaded base made ready to train: `apply`, then what every method shares
        (train.gradient_checkpointing). Every stage that trains a policy starts here."""
        model = self.apply(model, cfg)
        if cfg.train.gradient_checkpointing:
            enable_checkpointing(model)
        return model

    def save(self, model: "torch.nn.Module", out_dir: Path) -> Path:
        """Write what this method trained to out_dir (safetensors) and return it."""
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        return out_dir

    def load(self, base_model: "torch.nn.Module", artifact_dir: Path) -> "torch.nn.Module":
        """The trained model: `base_model` (as load_base_model returns it) plus what save() wrote."""
        if self.saves == "model":
            model = type(base_model).from_pretrained(str(artifact_dir), dtype=base_model.dtype, use_safetensors=True,
                                                     attn_implementation=base_model.config._attn_implementation)
            return model.to(base_model.device)
        import peft

        return peft.PeftModel.from_pretrained(base_model, str(artifact_dir))


@dataclass
class TensorsMethodSpec(MethodSpec):
    """A method outside PEFT: its artifact is its trainable tensors plus method_config.json.

    `attach(model, method_cfg)` makes the method's structural change (inserted modules) without
    touching requires_grad; `apply` calls it before choosing what trains, and `load` calls it
    again on a fresh base before copying the saved tensors in.
    """

    attach: Optional[Callable[["torch.nn.Module", Any], "torch.nn.Module"]] = None

    def attach_to(self, model: "torch.nn.Module", method_cfg) -> "torch.nn.Module":
        if self.attach is not None:
            model = self.attach(model, method_cfg)
        setattr(model, METHOD_RECORD_ATTR, {"method": self.name, "config": dataclasses.asdict(method_cfg)})
        return model

    def save(self, model: "torch.nn.Module", out_dir: Path) -> Path:
        from safetensors.torch import save_file

        record = getattr(model, METHOD_RECORD_ATTR, None)
        if record is None or record["method"] != self.name:
            raise ValueError(f"model was not prepared by method {self.name!r}; nothing to save")
        tensors = {name: param.detach().cpu().contiguous()
                   for name, param in model.named_parameters() if param.requires_grad}
        if not tensors:
            raise ValueError(f"method {self.name!r}: the model has no trainable tensors to save")
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_FILE), metadata={"method": self.name})
        (out_dir / METHOD_CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return out_dir

    def load(self, base_model: "torch.nn.Module", artifact_dir: Path) -> "torch.nn.Module":
        import torch
        from safetensors.torch import load_file

        artifact_dir = Path(artifact_dir)
        record = json.loads((artifact_dir / METHOD_CONFIG_FILE).read_text())
        model = self.attach_to(base_model, self.config_cls(**record["config"]))
        own = dict(model.named_parameters())
        saved = load_file(str(artifact_dir / ADAPTER_WEIGHTS_FILE))
        stray = sorted(set(saved) - set(own))
        if stray:
            raise ValueError(f"{artifact_dir}: tensors with no place in {type(model).__name__}: {', '.join(stray[:3])}")
        with torch.no_grad():
            for name, value in saved.items():
                if own[name].shape != value.shape:
                    raise ValueError(f"{artifact_dir}: {name} has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(own[name].shape)}")
                own[name].copy_(value)
        model.requires_grad_(False)
        return model


def peft_task_type(model: "torch.nn.Module") -> str:
    """PEFT task of a model: SEQ_CLS for a sequence-classification head (a reward model; PEFT then
    also trains and saves the new head), else CAUSAL_LM."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def prepare_quantized_base(model: "torch.nn.Module", cfg: "ExperimentConfig") -> "torch.nn.Module":
    """On an int8/nf4/fp4 base: freeze every weight and upcast the unquantized ones (norms,
    embeddings, biases) to fp32, so that what a method then unfreezes trains in fp32."""
    if cfg.precision.quantized:
        import peft

        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def enable_checkpointing(model: "torch.nn.Module") -> None:
    """Activation checkpointing on every decoder layer of the transformers model inside `model`
    (itself, or the base a PEFT wrapper holds). Non-reentrant checkpointing gives a gradient to
    whatever trains inside a layer even when the layer's input needs none (a frozen base under
    LoRA, IA3 or a prompt); transformers also makes the embeddings' output require grad. A layer
    checkpoints only in training mode with grad enabled, so evaluation and generation (no grad,
    key/value cache on) run as without it."""
    from transformers import PreTrainedModel

    base = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if base is None or not base.supports_gradient_checkpointing:
        raise ValueError(f"train.gradient_checkpointing=true: {type(model).__name__} does not support activation "
                         "checkpointing; set train.gradient_checkpointing=false")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def model_shape(cfg: "ExperimentConfig"):
    """The architecture of cfg.model from its config.json alone (trainers.memory.shapes), or None
    where that is not readable before training (a hub id not in the local cache): the model's own
    load then reports what is wrong."""
    from trainers.memory.shapes import UnknownModelError, load_shape

    try:
        return load_shape(cfg.model.name_or_path)
    except UnknownModelError:
        return None


def architecture(shape) -> str:
    return f"{shape.name} (model_type {shape.model_type})"


# bitsandbytes' CPU 4-bit kernel, used for no-grad forwards (evaluation, generation), repacks each
# weight in blocks of 32 output features and reshapes its scales to one per 64 inputs of a row: other
# sizes fail there (an assertion, or a reshape error), after training (bitsandbytes 0.50).
CPU_4BIT_OUT_BLOCK, CPU_4BIT_IN_BLOCK = 32, 64


def cpu_4bit_problems(cfg: "ExperimentConfig") -> list[tuple[str, str]]:
    if cfg.precision.name not in ("nf4", "fp4") or cfg.train.use_gpu:
        return []
    shape = model_shape(cfg)
    if shape is None:
        return []
    odd = [f"{name} ({fan_in} -> {out})" for name, (fan_in, out, _) in shape.linears().items()
           if out % CPU_4BIT_OUT_BLOCK or fan_in % CPU_4BIT_IN_BLOCK]
    if not odd:
        return []
    return [("precision.name", f"method {cfg.method.name} on a {cfg.precision.name} base of {architecture(shape)} "
                               f"on CPU: bitsandbytes' CPU 4-bit kernel needs in_features divisible by "
                               f"{CPU_4BIT_IN_BLOCK} and out_features by {CPU_4BIT_OUT_BLOCK} for evaluation, "
                               f"and {', '.join(odd)} are not; use train.use_gpu=true, precision=int8 or a "
                               "float precision")]


def positive(method: MethodConfig, *keys: str) -> list[tuple[str, str]]:
    """(key, message) for each integer field of `method` that is not > 0."""
    return [(key, f"must be > 0, got {getattr(method, key)}") for key in keys if getattr(method, key) <= 0]


def fp16_weights_problem(cfg: "ExperimentConfig", what: str) -> list[tuple[str, str]]:
    """For methods that train tensors stored in the base dtype (full, BitFit, LN tuning): fp16
    storage plus torch AdamW diverges on the first step, since Adam's second moment (g^2, 1e-6 and
    below) underflows to 0 in fp16 and so does eps=1e-8, making the update m / 0 = inf."""
    if cfg.precision.name != "fp16" or cfg.train.optimizer != "adamw":
        return []
    return [("precision.name",
             f"{what} trains fp16 tensors directly; with train.optimizer=adamw the first step sends them to "
             "inf (Adam's g^2 and eps underflow to 0 in fp16): use precision=bf16 or fp32, or an optimizer "
             "with fp32 math inside (train.optimizer=adamw_8bit, paged_adamw_8bit or paged_adamw_32bit)")]


# Every method module registers itself here when trainers.methods imports it.
METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec
