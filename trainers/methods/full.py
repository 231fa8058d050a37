"""Full fine-tuning: every weight trains; the saved artifact is the whole model."""

from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, fp16_weights_problem


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


def apply(model, cfg):
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def check_combination(cfg) -> list[tuple[str, str]]:
    if cfg.precision.quantized:
        return [("precision.name",
                 f"full fine-tuning cannot update {cfg.precision.name} quantized weights; "
                 "use fp32/bf16/fp16, or a LoRA-style method on the quantized base")]
    return fp16_weights_problem(cfg, "full fine-tuning")


def trainable_sizes(shape, method) -> list[int]:
    from trainers.memory.counts import full_sizes

    return full_sizes(shape)


def memory_terms(shape, method):
    from trainers.memory.terms import MethodTerms

    return MethodTerms(weights_train=True, norms_train=(True, True, True), input_grad=True, storage="base")


register(MethodSpec(name="full", config_cls=FullConfig, apply=apply, saves="model", check_combination=check_combination,
                    trainable_sizes=trainable_sizes, memory_terms=memory_terms, shards=True,
                    summary="all weights trainable"))
