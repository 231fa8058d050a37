"""Stage recipes: each trains a model for one stage of a pipeline. A recipe is one module that
registers a RecipeSpec (its config dataclass is the Hydra schema of `stage=NAME`)."""

from __future__ import annotations

# Importing each module registers its recipe (in trainers.recipes.base.RECIPES).
from trainers.recipes import dpo, orpo, reward, rl, sft  # noqa: F401
from trainers.recipes.base import RECIPES, RecipeSpec, StageConfig, register

__all__ = ["RECIPES", "RecipeSpec", "StageConfig", "register"]
