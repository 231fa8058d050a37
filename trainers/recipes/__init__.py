"""Stage recipes: each one trains a model for one stage of a pipeline (sft today)."""

from trainers.recipes import sft

RECIPES = {"sft": sft.run}
