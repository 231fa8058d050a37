"""QLoRA: LoRA on a 4-bit (nf4 or fp4) bitsandbytes base, the adapter trained in compute dtype.

The 4-bit storage comes from the `precision` group (conf/method/qlora.yaml selects nf4 unless
the command line says otherwise): `precision=fp4`, `precision.double_quant=true`,
`precision.compute_dtype=bf16`. Pair with `train.optimizer=paged_adamw_8bit` to page the
optimizer state as the QLoRA paper does. The artifact is a plain PEFT LoRA adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import register
from trainers.methods.base import MethodSpec
from trainers.methods.lora import LoraConfig
from trainers.methods.lora import apply as lora_apply
from trainers.methods.lora import memory_terms, target_problems, trainable_sizes

FOUR_BIT = ("nf4", "fp4")


@dataclass
class QLoraConfig(LoraConfig):
    name: str = "qlora"


def check_combination(cfg) -> list[tuple[str, str]]:
    if cfg.precision.name not in FOUR_BIT:
        return [("precision.name", f"qlora needs a 4-bit base: add precision=nf4 or precision=fp4 "
                                   f"(precision is {cfg.precision.name}; LoRA on it is method=lora)")]
    return []


register(MethodSpec(name="qlora", config_cls=QLoraConfig, apply=lora_apply, saves="adapter",
                    check_combination=check_combination, check_architecture=target_problems,
                    trainable_sizes=trainable_sizes, memory_terms=memory_terms, summary="LoRA on a 4-bit nf4/fp4 base"))
