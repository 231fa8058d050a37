"""Stage recipes: each trains a model for one stage of a pipeline. A recipe is one module that
registers a RecipeSpec (its config dataclass is the Hydra schema of `stage=NAME`)."""

from __future__ import annotations

from trainers.recipes.base import RecipeSpec, StageConfig

RECIPES: dict[str, RecipeSpec] = {}


def register(spec: RecipeSpec) -> RecipeSpec:
    if spec.name in RECIPES:
        raise ValueError(f"recipe {spec.name!r} registered twice")
    RECIPES[spec.name] = spec
    return spec


from trainers.recipes import dpo, reward, rl, sft  # noqa: E402,F401

__all__ = ["RECIPES", "RecipeSpec", "StageConfig", "register"]
