"""Hydra composition: conf/ defaults + sweeps/NAME.yaml + command-line overrides -> typed config.

The schemas (trainers/config.py and each method's dataclass) are registered in Hydra's
ConfigStore, so an unknown key or a wrong type fails during composition, naming the key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orchestrator.config import OrchestratorConfig
from trainers.config import CONF_DIR, ConfigError
from trainers.validate import from_container

SWEEPS_DIR = Path(__file__).resolve().parent.parent / "sweeps"

_registered = False


def register_schemas() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    from trainers.methods import METHODS
    from trainers.recipes import RECIPES

    store = ConfigStore.instance()
    store.store(name="experiment_schema", node=OrchestratorConfig)
    for group, registry in (("method", METHODS), ("stage", RECIPES)):
        for name, spec in registry.items():
            store.store(group=group, name=f"{name}_schema", node=spec.config_cls)
    _registered = True


def register_resolvers() -> None:
    # `${mul:2,${method.r}}`: lets a sweep tie one value to another (alpha = 2r across ranks).
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)


def compose_raw(overrides: list[str]) -> DictConfig:
    """Composed (not yet value-checked) config; Hydra errors become ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError([(_key_of(err), _first_lines(err))]) from None


def _key_of(err: Exception) -> str:
    """Best guess at the config key an error is about, for the one-line message."""
    import re

    for candidate in (err, err.__cause__):
        key = getattr(candidate, "full_key", None)
        if key:
            return str(key)
    text = str(err)
    for pattern in (r"override '([\w.]+)'", r"override ([\w.+~]+)=", r"Key '([\w.]+)'",
                    r"find '(\w+)/", r"key[: ]+'?([\w.]+)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1).lstrip("+~")
    return "overrides"


def _first_lines(err: Exception) -> str:
    """Hydra's message on one line: its reason, the cause's reason, available options as a list."""
    text = str(err)
    if err.__cause__ is not None:
        cause = str(err.__cause__).splitlines()[0]
        text = f"{text.splitlines()[0].rstrip('.')}: {cause}"
    noise = ("full_key:", "reference_type", "object_type")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise)]
    if any(line.startswith("Available options") for line in lines):
        at = next(i for i, line in enumerate(lines) if line.startswith("Available options"))
        options = []
        for line in lines[at + 1:]:
            if line.startswith("Config search path"):
                break
            if not line.endswith("_schema"):
                options.append(line)
        return " ".join(lines[:at]) + " Available: " + ", ".join(options) + "."
    return " ".join(lines[:3])


def compose(overrides: list[str]) -> OrchestratorConfig:
    """Typed and value-checked config; raises ConfigError listing every bad key."""
    raw = compose_raw(overrides)
    try:
        container = OmegaConf.to_container(raw, resolve=True, throw_on_missing=True)
    except Exception as err:  # a ??? left unset, or a broken interpolation
        raise ConfigError([(_key_of(err), _first_lines(err))]) from None
    return from_container(container, OrchestratorConfig)


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
