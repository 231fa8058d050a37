"""BitFit (Ben Zaken et al. 2022): only the bias terms train; every weight matrix stays frozen.

Trainable: the sum of all bias sizes (on Llama-style models with attention_bias/mlp_bias, each
projection's out_features). A base without biases (most Llamas; Qwen2 has them on q/k/v only)
leaves little or nothing to train: apply() refuses a model with no bias at all. Biases of
bitsandbytes int8/4-bit layers are ordinary fp32 tensors, so it works on quantized bases.
PEFT has no BitFit: the artifact is method_config.json + the biases as adapter_model.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import register
from trainers.methods.base import (MethodConfig, TensorsMethodSpec, architecture, fp16_weights_problem, model_shape,
                                   prepare_quantized_base)


@dataclass
class BitFitConfig(MethodConfig):
    name: str = "bitfit"


def bias_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]


def apply(model, cfg):
    model = SPEC.attach_to(prepare_quantized_base(model, cfg), cfg.method)
    biases = set(bias_names(model))
    if not biases:
        raise ValueError(f"method=bitfit: {type(model).__name__} has no bias terms to train "
                         "(pick a model with biases, or another method)")
    for name, param in model.named_parameters():
        param.requires_grad_(name in biases)
    return model


def check_combination(cfg) -> list[tuple[str, str]]:
    # On int8/4-bit bases prepare_quantized_base upcasts the biases to fp32, so only fp16 is a problem.
    return fp16_weights_problem(cfg, "bitfit")


def check_architecture(cfg) -> list[tuple[str, str]]:
    shape = model_shape(cfg)
    if shape is not None and not trainable_sizes(shape, cfg.method):
        return [("method.name", f"bitfit trains bias terms and {architecture(shape)} has none "
                                "(no attention/MLP biases, RMSNorm without bias): pick another method")]
    return []


def trainable_sizes(shape, method) -> list[int]:
    """Biases of the linear layers, and of the LayerNorms where the model has LayerNorm."""
    linear = [out for _, out, bias in shape.linears().values() if bias] * shape.layers
    norms = shape.layout.norms_per_layer * shape.layers + 1 if shape.layout.layer_norm else 0
    return linear + [shape.hidden] * norms


def memory_terms(shape, method):
    from trainers.memory.activations import MethodTerms

    return MethodTerms(biases_train=True, storage="base")


SPEC = register(TensorsMethodSpec(
    name="bitfit", config_cls=BitFitConfig, apply=apply, saves="adapter", check_combination=check_combination,
    check_architecture=check_architecture, trainable_sizes=trainable_sizes, memory_terms=memory_terms,
    summary="only bias terms train"))
