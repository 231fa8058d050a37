"""The method registry: how each fine-tuning method changes the model.

A method is one module here that calls `register(...)`: a config dataclass (its Hydra schema),
an `apply(model, cfg)` that freezes/wraps the model, and what it saves (`adapter` or `model`).
"""

from __future__ import annotations

# Importing each module registers its method (in trainers.methods.base.METHODS).
from trainers.methods import adapter, bitfit, full, ia3, ln_tuning, lora, prefix, prompt, ptuning, qlora  # noqa: F401
from trainers.methods.base import METHODS, MethodConfig, MethodSpec, register
from trainers.methods.loading import load_trained

__all__ = ["METHODS", "MethodConfig", "MethodSpec", "load_trained", "register"]
