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

from trainers.memory.terms import MethodTerms
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


def ia3_targets(shape, method) -> tuple[list[str], list[str]]:
    """(targets, feedforward targets) of the config on a ModelShape: its own lists; when unset,
    PEFT's per-architecture defaults (peft.utils.constants, as apply() gets them); on other
    architectures the structural choice of trainers/methods/structure.py (key/value-bearing
    projections, i.e. out_features != hidden, and the MLP's output projection)."""
    from trainers.memory.counts import linear_targets

    if method.target_modules is not None:
        return (linear_targets(shape, method.target_modules),
                linear_targets(shape, method.feedforward_modules or []))
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as PEFT_FEEDFORWARD
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if shape.model_type in PEFT_DEFAULTS:
        return (linear_targets(shape, PEFT_DEFAULTS[shape.model_type]),
                linear_targets(shape, PEFT_FEEDFORWARD[shape.model_type]))
    linears = shape.linears()
    kv = [n for n in shape.attention_linears() if linears[n][1] != shape.hidden] or \
        [n for n in shape.attention_linears() if linears[n][0] == shape.hidden]
    return kv + [shape.layout.mlp_out], [shape.layout.mlp_out]


def trainable_sizes(shape, method) -> list[int]:
    """One vector per targeted layer: its in_features (feed-forward targets) or out_features."""
    targets, feedforward = ia3_targets(shape, method)
    linears = shape.linears()
    return [linears[t][0] if t in feedforward else linears[t][1] for t in targets] * shape.layers


@dataclass(frozen=True)
class IA3Terms(MethodTerms):
    """A trained vector scaling each target's output, or its input for feed-forward targets."""

    targets: tuple[str, ...] = ()
    feedforward: tuple[str, ...] = ()

    def adapts(self, target: str) -> bool:
        return target in self.targets

    def scales_input(self, target: str) -> bool:
        return target in self.feedforward

    def keeps_input(self, step, target: str) -> bool:
        return target in self.feedforward and step.act == 4  # scaling an fp32 input keeps it

    def branch_bytes(self, step, target: str) -> float:
        """The fp32 cast of a scaled 2-byte input, or the unscaled output it scales; on an int8
        base the output projection's int8 matmul also keeps the scaled product."""
        fan_in, fan_out, _ = step.shape.linears()[target]
        if target in self.feedforward:
            cast = step.T * fan_in * 4 if step.act != 4 else 0.0
            product = step.T * step.shape.intermediate * step.act
            return cast + (product if step.int8 and target == step.shape.layout.mlp_out else 0.0)
        return step.T * fan_out * step.act if target in self.targets else 0.0

    def eval_mlp_bytes(self, shape, tokens: int, act: int, plain: float) -> float:
        """Scaling the output projection's input multiplies an fp32 copy of the product and casts it back."""
        if shape.layout.mlp_out not in self.feedforward:
            return plain
        return max(plain, tokens * shape.intermediate * (2 * act + 8 if act != 4 else 2 * act))


def memory_terms(shape, method) -> IA3Terms:
    targets, feedforward = ia3_targets(shape, method)
    return IA3Terms(targets=tuple(targets), feedforward=tuple(feedforward))


register(MethodSpec(name="ia3", config_cls=IA3Config, apply=apply, saves="adapter", trainable_sizes=trainable_sizes,
                    memory_terms=memory_terms,
                    summary="learned scaling vectors on attention outputs and feed-forward inputs"))
