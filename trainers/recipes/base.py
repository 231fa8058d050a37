"""Shared shapes of a stage recipe: its config base class and its registry record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from trainers.context import TrialContext


@dataclass
class StageConfig:
    name: str = "?"
    # Output directory of the stage this one starts from (its adapter or model); the orchestrator
    # fills it in from the upstream trial, a plain-process run sets it by hand.
    init_from: str | None = None

    def check(self) -> list[tuple[str, str]]:
        """Problems with this stage's own fields, keyed relative to `stage.`."""
        return []


@dataclass
class RecipeSpec:
    name: str
    config_cls: type
    run: Callable[["TrialContext"], dict[str, float]]
    # Data format the stage trains on: "instruction" (instruction/chat) or "preference".
    data_kind: str = "instruction"
    summary: str = ""
