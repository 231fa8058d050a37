"""LN tuning (Zhao et al. 2023, PEFT LNTuningConfig): only the LayerNorm/RMSNorm weights (and
biases, where a norm has them) train.

Trainable on Llama-style models: (2 x layers + 1) x hidden_size (both norms of every decoder
layer plus the final norm). PEFT trains a copy of each norm, so the model holds the original
norms too. Norms are never quantized, so it works on int8/nf4/fp4 bases. The artifact is a
PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from trainers.memory.terms import MethodTerms
from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, fp16_weights_problem, peft_task_type, prepare_quantized_base


@dataclass
class LNTuningConfig(MethodConfig):
    name: str = "ln_tuning"
    # null = PEFT's per-architecture norm names (Llama: input_layernorm, post_attention_layernorm, norm);
    # where PEFT has none (OPT, GPT-NeoX, Phi-3), every hidden-size norm of the model.
    target_modules: Optional[List[str]] = None


def apply(model, cfg):
    import warnings

    import peft

    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from trainers.methods.structure import norm_names

    method: LNTuningConfig = cfg.method
    kwargs = {} if method.target_modules is None else {"target_modules": list(method.target_modules)}
    if method.target_modules is None and model.config.model_type not in PEFT_DEFAULTS:
        kwargs["target_modules"] = norm_names(model)  # e.g. OPT, GPT-NeoX, Phi-3: every hidden-size norm
    with warnings.catch_warnings():
        # PEFT warns about any norm class it does not list (e.g. LlamaRMSNorm); copying one is safe.
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return peft.get_peft_model(prepare_quantized_base(model, cfg),
                                   peft.LNTuningConfig(task_type=peft_task_type(model), **kwargs))


def check_combination(cfg) -> list[tuple[str, str]]:
    # PEFT trains a copy of each norm in the base dtype (it does not upcast these to fp32).
    return fp16_weights_problem(cfg, "ln_tuning")


def ln_tuning_norms(shape, method) -> tuple[int, bool]:
    """(norms per decoder layer, final norm included) that the config trains on a ModelShape: its
    own names; when unset, PEFT's per-architecture defaults (peft.utils.constants, as apply() gets
    them: the layout's final norm by name, every other name one norm per layer); where PEFT has
    none, every hidden-size norm (structure.norm_names)."""
    targets = method.target_modules
    if targets is not None:
        per_layer = sum(name in targets for name in ("input_layernorm", "post_attention_layernorm"))
        return per_layer, "norm" in targets
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    names = PEFT_DEFAULTS.get(shape.model_type)
    if names is None:
        return shape.layout.norms_per_layer, True
    final = shape.layout.final_norm in names
    return len(names) - final, final


def trainable_sizes(shape, method) -> list[int]:
    from trainers.memory.counts import norm_sizes

    return norm_sizes(shape, *ln_tuning_norms(shape, method))


def memory_terms(shape, method) -> MethodTerms:
    """Which norms train: named targets, or (norms per layer, final) of the default."""
    targets = method.target_modules
    if targets is not None:
        trains = ("input_layernorm" in targets, "post_attention_layernorm" in targets, "norm" in targets)
    else:
        per_layer, final = ln_tuning_norms(shape, method)
        trains = (per_layer >= 2, per_layer >= 1, final)
    return MethodTerms(norms_train=trains, storage="copy")  # PEFT trains copies of the norms


register(MethodSpec(name="ln_tuning", config_cls=LNTuningConfig, apply=apply, saves="adapter",
                    check_combination=check_combination, trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="only the norm layers' weights train"))
