"""LoRA: frozen base, trainable low-rank update B @ A (r x (in + out) per targeted linear layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, peft_task_type, prepare_quantized_base


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8  # higher increases capacity, adapter size and memory
    alpha: float = 16.0  # update scale is alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0
    # "all-linear" = every linear layer but the output head; or names like [q_proj, v_proj].
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


def peft_lora_config(method: LoraConfig, task_type: str = "CAUSAL_LM"):
    import peft

    targets = method.target_modules
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return peft.LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=target,
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        bias="none",
        task_type=task_type,
    )


def apply(model, cfg):
    import peft

    return peft.get_peft_model(prepare_quantized_base(model, cfg), peft_lora_config(cfg.method, peft_task_type(model)))


def check_combination(cfg) -> list[tuple[str, str]]:
    if cfg.method.use_dora and cfg.precision.name == "int8" and not cfg.train.use_gpu:
        # PEFT dequantizes the int8 weight for DoRA's norm and, on CPU, moves it back with .to(),
        # which drops its scales: the next forward of bitsandbytes' Linear8bitLt fails (peft 0.21, bnb 0.50).
        return [("method.use_dora", "DoRA on an int8 base fails on CPU (the int8 layer loses its scales after "
                                    "the first step); on CPU use DoRA with fp32/bf16/nf4/fp4, or train.use_gpu=true")]
    return []


register(MethodSpec(name="lora", config_cls=LoraConfig, apply=apply, saves="adapter",
                    check_combination=check_combination, summary="low-rank update on frozen linear layers"))
