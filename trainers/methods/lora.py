"""LoRA: frozen base, trainable low-rank update B @ A (r x (in + out) per targeted linear layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, architecture, model_shape, peft_task_type, prepare_quantized_base
from trainers.methods.structure import ALL_LINEAR, ATTENTION


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8  # higher increases capacity, adapter size and memory
    alpha: float = 16.0  # update scale is alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0
    # Portable: [all-linear] = every linear layer but the output head, [attention] = the attention
    # block's projections on any architecture; or the model's own names, e.g. [q_proj, v_proj].
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False  # rank-stabilised scaling, keeps high ranks from under-training
    use_dora: bool = False  # weight-decomposed LoRA: also learns a per-column magnitude

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.r <= 0:
            problems.append(("r", f"must be > 0, got {self.r}"))
        if not self.alpha > 0:
            problems.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0 <= self.dropout < 1:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not self.target_modules:
            problems.append(("target_modules", "must name at least one module or 'all-linear'"))
        return problems


def peft_lora_config(method: LoraConfig, model, task_type: str = "CAUSAL_LM"):
    import peft

    from trainers.methods.structure import resolve_targets

    return peft.LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=resolve_targets(model, method.target_modules),
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        bias="none",
        task_type=task_type,
    )


def apply(model, cfg):
    import peft

    config = peft_lora_config(cfg.method, model, peft_task_type(model))
    return peft.get_peft_model(prepare_quantized_base(model, cfg), config)


def check_combination(cfg) -> list[tuple[str, str]]:
    return dora_int8_problems(cfg)


def target_problems(cfg) -> list[tuple[str, str]]:
    """Target names the architecture (a known layout) does not have: PEFT would fail on the worker."""
    from trainers.memory.counts import linear_targets
    from trainers.memory.shapes import LAYOUTS

    shape = model_shape(cfg)
    if shape is None or shape.model_type not in LAYOUTS:
        return []
    missing = [t for t in cfg.method.target_modules
               if t not in (ALL_LINEAR, ATTENTION) and not linear_targets(shape, [t])]
    if not missing:
        return []
    return [("method.target_modules", f"{cfg.method.name} on {architecture(shape)}: no layer named "
                                      f"{', '.join(missing)}; its linear layers are {', '.join(shape.linears())}, "
                                      f"or use the portable [{ATTENTION}] or [{ALL_LINEAR}]")]


def dora_int8_problems(cfg) -> list[tuple[str, str]]:
    if cfg.method.use_dora and cfg.precision.name == "int8" and not cfg.train.use_gpu:
        # PEFT dequantizes the int8 weight for DoRA's norm and, on CPU, moves it back with .to(),
        # which drops its scales: the next forward of bitsandbytes' Linear8bitLt fails (peft 0.21, bnb 0.50).
        return [("method.use_dora", "DoRA on an int8 base fails on CPU (the int8 layer loses its scales after "
                                    "the first step); on CPU use DoRA with fp32/bf16/nf4/fp4, or train.use_gpu=true")]
    return []


def trainable_sizes(shape, method) -> list[int]:
    """A (r x in) and B (out x r) per targeted layer; DoRA adds a magnitude per output feature."""
    from trainers.memory.counts import lora_targets

    sizes = []
    for target in lora_targets(shape, method):
        fan_in, fan_out, _ = shape.linears()[target]
        sizes += [method.r * fan_in, method.r * fan_out] + ([fan_out] if method.use_dora else [])
    return sizes * shape.layers


def memory_terms(shape, method):
    from trainers.memory.activations import MethodTerms
    from trainers.memory.counts import lora_targets

    return MethodTerms(lora=tuple(lora_targets(shape, method)), rank=method.r, dropout=method.dropout,
                       dora=method.use_dora)


register(MethodSpec(name="lora", config_cls=LoraConfig, apply=apply, saves="adapter", check_combination=check_combination,
                    check_architecture=target_problems, trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="low-rank update on frozen linear layers"))
