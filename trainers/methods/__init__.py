"""The method registry: how each fine-tuning method changes the model.

A method is one module here that calls `register(...)`: a config dataclass (its Hydra schema),
an `apply(model, cfg)` that freezes/wraps the model, and what it saves (`adapter` or `model`).
"""

from __future__ import annotations

from trainers.methods.base import MethodConfig, MethodSpec

METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    METHODS[spec.name] = spec
    return spec


# Importing each module registers its method.
from trainers.methods import adapter, bitfit, full, ia3, ln_tuning, lora, prefix, prompt, ptuning, qlora  # noqa: E402,F401
from trainers.methods.loading import load_trained  # noqa: E402

__all__ = ["METHODS", "MethodConfig", "MethodSpec", "load_trained", "register"]
