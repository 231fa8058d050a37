"""(IA)3 (Liu et al. 2022, PEFT): learned per-channel scaling vectors on a few frozen layers.

Attention targets scale their output (a vector of out_features), feed-forward targets scale their
input (in_features). On Llama-style models PEFT's default targets are k_proj, v_proj (outputs)
and down_proj (input): per layer 2 x kv_heads x head_dim + intermediate_size trainable values,
the smallest of all methods here. Vectors start at 1, so the model is unchanged at init. Works on
int8/nf4/fp4 bases. Wants a higher learning rate than LoRA. The artifact is a PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, peft_task_type, prepare_quantized_base


@dataclass
class IA3Config(MethodConfig):
    name: str = "ia3"
    # null = PEFT's per-architecture choice (Llama/Mistral: k_proj, v_proj, down_proj); where PEFT has
    # none (Phi-3), the same shape found by structure: key/value projections + the MLP's output.
    target_modules: Optional[List[str]] = None
    # Targets that scale their input instead of their output; must be among target_modules.
    feedforward_modules: Optional[List[str]] = None

    def check(self) -> list[tuple[str, str]]:
        if self.feedforward_modules is None:
            return []
        if self.target_modules is None:
            return [("feedforward_modules", "needs method.target_modules too (PEFT's defaults pick both)")]
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            return [("feedforward_modules", f"must be among method.target_modules; not there: {', '.join(extra)}")]
        return []


def apply(model, cfg):
    import peft

    method: IA3Config = cfg.method
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    from trainers.methods import structure

    kwargs = {}
    if method.target_modules is not None:
        kwargs["target_modules"] = structure.resolve_targets(model, method.target_modules)
        kwargs["feedforward_modules"] = list(method.feedforward_modules or [])
    elif model.config.model_type not in PEFT_DEFAULTS:  # e.g. phi3: the same choice, found by structure
        kwargs["target_modules"], kwargs["feedforward_modules"] = structure.ia3_targets(model)
    config = peft.IA3Config(task_type=peft_task_type(model), **kwargs)
    return peft.get_peft_model(prepare_quantized_base(model, cfg), config)


def trainable_sizes(shape, method) -> list[int]:
    """One vector per targeted layer: its in_features (feed-forward targets) or out_features."""
    from trainers.memory.counts import ia3_targets

    targets, feedforward = ia3_targets(shape, method)
    linears = shape.linears()
    return [linears[t][0] if t in feedforward else linears[t][1] for t in targets] * shape.layers


def memory_terms(shape, method):
    from trainers.memory.activations import MethodTerms
    from trainers.memory.counts import ia3_targets

    targets, feedforward = ia3_targets(shape, method)
    return MethodTerms(ia3=tuple(targets), ia3_ff=tuple(feedforward))


register(MethodSpec(name="ia3", config_cls=IA3Config, apply=apply, saves="adapter", trainable_sizes=trainable_sizes,
                    memory_terms=memory_terms,
                    summary="learned scaling vectors on attention outputs and feed-forward inputs"))
