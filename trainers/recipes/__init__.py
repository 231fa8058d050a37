"""Stage recipes: each trains a model for one stage of a pipeline. A recipe is one module that
registers a RecipeSpec (its config dataclass is the Hydra schema of `stage=NAME`). Every module of
this package is imported below, so adding a stage is adding its file (plus its conf/stage/*.yaml
and tests)."""

from __future__ import annotations

import importlib
import pkgutil

from trainers.recipes.base import RECIPES, RecipeSpec, StageConfig, register

# Importing each module registers its recipe (in trainers.recipes.base.RECIPES).
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["RECIPES", "RecipeSpec", "StageConfig", "register"]
