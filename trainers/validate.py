"""Whole-config validation: the checks that need the method and stage registries, and the typed
loading of a composed (or hand-written) config, `from_container(raw) -> ExperimentConfig`.

Kept apart from trainers/config.py so the dataclasses import no registry: methods and recipes
import the config classes, this module imports both.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainers.config import ConfigError, ExperimentConfig, InapplicableError
from trainers.methods import METHODS
from trainers.recipes import RECIPES


def check_precision_device(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Precision settings the chosen device cannot train with (method-independent)."""
    if cfg.train.use_gpu:
        return []
    why = ("CPU fp16 kernels are slow fallbacks (no speed or memory win) and this trainer has no fp16 "
           "loss scaling; on CPU use bf16 or fp32, or set train.use_gpu=true")
    if cfg.precision.name == "fp16":
        return [("precision.name", f"fp16 training needs a GPU: {why}")]
    if cfg.precision.quantized and cfg.precision.compute_dtype == "fp16":
        return [("precision.compute_dtype", f"fp16 compute needs a GPU: {why}")]
    return []


def check(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """All value problems of a composed config, each as (dotted key, message)."""
    problems: list[tuple[str, str]] = []
    for part in (cfg.model, cfg.data, cfg.precision, cfg.train):
        problems += part.check()
    if getattr(cfg.stage, "name", None) not in RECIPES:
        problems.append(("stage.name", f"unknown stage; known: {', '.join(sorted(RECIPES))}"))
    else:
        problems += [(f"stage.{key}", msg) for key, msg in cfg.stage.check()]
    problems += check_precision_device(cfg)
    spec = METHODS.get(getattr(cfg.method, "name", None))
    if spec is None:
        problems.append(("method.name", f"unknown method; known: {', '.join(sorted(METHODS))}"))
    else:
        problems += [(f"method.{key}", msg) for key, msg in cfg.method.check()]
        problems += spec.combination_problems(cfg)
        recipe = RECIPES.get(getattr(cfg.stage, "name", None))
        if recipe is not None:
            if cfg.data.format != "auto" and cfg.data.format not in recipe.data_formats:
                problems.append(("data.format", f"stage {recipe.name} trains on {' or '.join(recipe.data_formats)} "
                                                f"data, got {cfg.data.format}"))
            problems += recipe.check_combination(cfg)
    problems += check_fsdp(cfg)
    problems += check_batching(cfg)
    problems += check_attention(cfg)
    return problems


def batching_options(cfg: ExperimentConfig) -> dict[str, str]:
    """{option the config asks for (RecipeSpec.batching's names): the setting that asks for it}."""
    asked = {}
    if cfg.data.padding_free:
        asked["padding_free"] = "data.packing=padding_free"
    elif cfg.data.packing:
        asked["packing"] = "data.packing=true"
    if cfg.data.group_by_length:
        asked["group_by_length"] = "data.group_by_length=true"
    return asked


def stages_that(wanted) -> str:
    """The names of the stages whose RecipeSpec has `wanted`, for a message: 'a or b'."""
    return " or ".join(name for name, recipe in sorted(RECIPES.items()) if wanted(recipe))


def check_batching(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """data.packing / data.group_by_length against the stage and method that would use them."""
    problems = []
    recipe = RECIPES.get(getattr(cfg.stage, "name", None))
    for option, setting in batching_options(cfg).items():
        if recipe is not None and option not in recipe.batching:
            able = stages_that(lambda other: option in other.batching)
            problems.append((setting.split("=")[0], f"{setting}: stage {recipe.name} does not batch this way (it "
                                                    f"would ignore it); only stage {able} does"))
    method = getattr(cfg.method, "name", None)
    if cfg.data.packing and method in METHODS and any(METHODS[method].virtual_tokens(cfg.method)):
        problems.append(("data.packing", f"method {method} puts virtual tokens before each row, which all "
                                         "examples packed in it would share: use unpacked batches"))
    return problems


def check_attention(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """model.attn_implementation against the device and the installed packages."""
    import importlib.util

    attention = cfg.model.attn_implementation
    if attention == "flex_attention" and not cfg.train.use_gpu:
        return [("model.attn_implementation", "flex_attention has no backward pass on CPU in torch (training "
                                              "fails at the first step): needs train.use_gpu=true (on CPU use sdpa "
                                              "or eager)")]
    if attention != "flash_attention_2":
        return []
    if not cfg.train.use_gpu:
        return [("model.attn_implementation", "flash_attention_2 runs CUDA kernels only: needs train.use_gpu=true "
                                              "(on CPU use sdpa or eager)")]
    if importlib.util.find_spec("flash_attn") is None:
        return [("model.attn_implementation", "flash_attention_2 needs the flash-attn package, which is not "
                                              "installed (pip install flash-attn --no-build-isolation)")]
    return []


def check_fsdp(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    if not cfg.train.fsdp:
        return []
    if cfg.train.num_workers < 2:
        return [("train.fsdp", f"shards the model over train.num_workers > 1 workers, got {cfg.train.num_workers}")]
    spec = METHODS.get(getattr(cfg.method, "name", None))
    if spec is not None and not spec.shards:
        shardable = " or ".join(name for name, other in sorted(METHODS.items()) if other.shards)
        return [("train.fsdp", f"is for full fine-tuning (method={shardable}); adapter methods train few parameters: "
                               "leave train.fsdp=false and their workers use DDP")]
    recipe = RECIPES.get(getattr(cfg.stage, "name", None))
    if recipe is not None and not recipe.shards:
        return [("train.fsdp", f"is supported by stage {stages_that(lambda r: r.shards)} only, "
                               f"got stage {cfg.stage.name}")]
    if cfg.precision.quantized:
        return [("train.fsdp", f"cannot shard a quantized base (precision.name={cfg.precision.name})")]
    return []


def from_container(raw: dict | DictConfig, schema: type | None = None) -> ExperimentConfig:
    """Typed config from a plain (resolved) mapping; raises ConfigError naming bad keys. `schema`
    is ExperimentConfig or a subclass (the orchestrator's types cluster, tracking and sweep)."""
    raw = OmegaConf.create(raw) if not isinstance(raw, DictConfig) else raw
    schemas = {}
    for group, registry in (("method", METHODS), ("stage", RECIPES)):
        node = raw.get(group) or {}
        name = node.get("name") if isinstance(node, (dict, DictConfig)) else None
        if name not in registry:
            raise ConfigError([(f"{group}.name", f"unknown {group} {name!r}; known: {', '.join(sorted(registry))}")])
        schemas[group] = registry[name].config_cls
    try:
        typed = OmegaConf.structured(schema or ExperimentConfig)
        typed.method = OmegaConf.structured(schemas["method"])
        typed.stage = OmegaConf.structured(schemas["stage"])
        merged = OmegaConf.merge(typed, raw)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError([(key, str(err).splitlines()[0])]) from None
    problems = check(cfg)
    if problems:
        if set(problems) <= set(architecture_problems(cfg)):
            raise InapplicableError(problems, cfg)
        raise ConfigError(problems)
    return cfg


def architecture_problems(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """The part of check()'s problems that says the method cannot work on this model's architecture
    (nothing for it to train there), as opposed to a setting the user can correct."""
    spec = METHODS.get(getattr(cfg.method, "name", None))
    return spec.architecture_problems(cfg) if spec is not None else []
