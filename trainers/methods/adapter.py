"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after each sublayer.

In every decoder layer, the output h of the attention sublayer and of the feed-forward sublayer
becomes h + up(act(down(h))) before the layer's own residual add. `down` is hidden -> b,
`up` is b -> hidden, both with bias; `up` starts at zero, so the model is unchanged at init.
Everything else is frozen.

Trainable: layers x 2 sublayers x (hidden x b + b + b x hidden + hidden).

Written here (AdapterHub's `adapters` pins old transformers): the adapters are child modules of
the attention block and of the feed-forward block (Llama `self_attn.bottleneck_adapter` /
`mlp.bottleneck_adapter`; OPT, whose layer holds fc1/fc2 directly, `fc2.bottleneck_adapter`) run
by forward hooks, so the base weights keep their names and PEFT or a checkpoint loader still
finds them. The blocks are found by structure (trainers/methods/structure.py), so it works on
every decoder here (Llama, Mistral, Qwen2/3, Phi-3, Gemma 2, GPT-2, GPT-NeoX, OPT) and on
int8/nf4/fp4 bases (the adapters are fp32). The artifact is method_config.json + the adapter
tensors as adapter_model.safetensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from trainers.memory.terms import MethodTerms
from trainers.methods.base import register
from trainers.methods.base import MethodConfig, TensorsMethodSpec, positive, prepare_quantized_base

NONLINEARITIES = ("relu", "gelu", "silu", "tanh")
ADAPTER_ATTR = "bottleneck_adapter"


@dataclass
class AdapterConfig(MethodConfig):
    name: str = "adapter"
    bottleneck_size: int = 16  # b: higher increases capacity and adapter size (2 x hidden x b per sublayer)
    nonlinearity: str = "relu"  # relu | gelu | silu | tanh

    def check(self) -> list[tuple[str, str]]:
        problems = positive(self, "bottleneck_size")
        if self.nonlinearity not in NONLINEARITIES:
            problems.append(("nonlinearity", f"must be one of {', '.join(NONLINEARITIES)}, got {self.nonlinearity!r}"))
        return problems


@functools.cache
def _bottleneck_cls():
    """The module class, built on first use so that importing the registry does not import torch."""
    import torch

    class Bottleneck(torch.nn.Module):
        """x -> x + up(act(down(x))), computed in the adapter's dtype (fp32) and cast back."""

        def __init__(self, hidden: int, size: int, nonlinearity: str):
            super().__init__()
            self.down = torch.nn.Linear(hidden, size)
            self.act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
                        "tanh": torch.nn.Tanh}[nonlinearity]()
            self.up = torch.nn.Linear(size, hidden)
            torch.nn.init.zeros_(self.up.weight)
            torch.nn.init.zeros_(self.up.bias)

        def forward(self, hidden_states):
            delta = self.up(self.act(self.down(hidden_states.to(self.down.weight.dtype))))
            return hidden_states + delta.to(hidden_states.dtype)

    return Bottleneck


def _run_adapter(module, args, output):
    adapter = getattr(module, ADAPTER_ATTR)
    if isinstance(output, tuple):  # attention returns (attn_output, attn_weights, ...)
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def attach(model, method: AdapterConfig):
    """Insert one bottleneck after each attention and feed-forward block (idempotent)."""
    from trainers.methods import structure

    Bottleneck = _bottleneck_cls()
    layers = structure.decoder_layers(model)
    if not layers:
        raise ValueError(f"method=adapter: {type(model).__name__} has no repeated decoder layers with an "
                         "attention and a feed-forward block to put adapters after")
    for layer in layers:
        (_, attention), (ff_name, feedforward) = structure.sublayers(layer)
        hidden = structure.out_features(structure.linears_in(feedforward, ff_name)[-1][1])  # the residual width
        for sublayer in (attention, feedforward):
            if hasattr(sublayer, ADAPTER_ATTR):
                continue
            device = next(p.device for p in sublayer.parameters())
            setattr(sublayer, ADAPTER_ATTR, Bottleneck(hidden, method.bottleneck_size, method.nonlinearity).to(device))
            sublayer.register_forward_hook(_run_adapter)
    return model


def apply(model, cfg):
    model = SPEC.attach_to(prepare_quantized_base(model, cfg), cfg.method)
    for name, param in model.named_parameters():
        param.requires_grad_(f".{ADAPTER_ATTR}." in name)
    return model


def trainable_sizes(shape, method) -> list[int]:
    b, h = method.bottleneck_size, shape.hidden
    return [h * b, b, b * h, h] * 2 * shape.layers  # down, up (with biases) after both blocks


@dataclass(frozen=True)
class BottleneckTerms(MethodTerms):
    size: int = 0  # adapter width after each attention and MLP block

    def block_bytes(self, step) -> float:
        return step.T * step.shape.hidden * 4 + step.T * self.size * 4  # its fp32 input and activation

    def block_flops(self, shape, tokens: int, input_grad: bool) -> tuple[float, float, bool]:
        """down and up forward; backward both weight gradients, up's input gradient, down's where
        the block's output wants one."""
        one = 2.0 * tokens * shape.hidden * self.size
        return 2 * one, 3 * one + (one if input_grad else 0.0), True


def memory_terms(shape, method) -> BottleneckTerms:
    return BottleneckTerms(size=method.bottleneck_size)


SPEC = register(TensorsMethodSpec(
    name="adapter", config_cls=AdapterConfig, apply=apply, attach=attach, saves="adapter", mergeable=False,
    trainable_sizes=trainable_sizes, memory_terms=memory_terms,
    summary="bottleneck MLPs after attention and feed-forward"))
