"""The method registry: how each fine-tuning method changes the model.

A method is one module here that calls `register(...)`: a config dataclass (its Hydra schema),
an `apply(model, cfg)` that freezes/wraps the model, and what it saves (`adapter` or `model`).
Every module of this package is imported below, so adding a method is adding its file (plus its
conf/method/*.yaml and tests).
"""

from __future__ import annotations

import importlib
import pkgutil

from trainers.methods.base import METHODS, MethodConfig, MethodSpec, register
from trainers.methods.loading import load_trained

# Importing each module registers its method (in trainers.methods.base.METHODS).
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["METHODS", "MethodConfig", "MethodSpec", "load_trained", "register"]
