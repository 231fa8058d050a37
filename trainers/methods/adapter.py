"""Bottleneck adapters (Houlsby et al. 2019): a small residual MLP after each sublayer.

In every decoder layer, the output h of the attention sublayer and of the feed-forward sublayer
becomes h + up(act(down(h))) before the layer's own residual add. `down` is hidden -> b,
`up` is b -> hidden, both with bias; `up` starts at zero, so the model is unchanged at init.
Everything else is frozen.

Trainable: layers x 2 sublayers x (hidden x b + b + b x hidden + hidden).

Written here (AdapterHub's `adapters` pins old transformers): the adapters are child modules
`self_attn.bottleneck_adapter` / `mlp.bottleneck_adapter` run by forward hooks, so the base
weights keep their names and PEFT or a checkpoint loader still finds them. Works on any decoder
whose layers have `self_attn` and `mlp` children (Llama, Qwen2, Mistral, Gemma, Phi-3) and on
int8/nf4/fp4 bases (the adapters are fp32). The artifact is method_config.json + the adapter
tensors as adapter_model.safetensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, TensorsMethodSpec, positive, prepare_quantized_base

NONLINEARITIES = ("relu", "gelu", "silu", "tanh")
ADAPTER_ATTR = "bottleneck_adapter"
SUBLAYERS = ("self_attn", "mlp")


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


def decoder_layers(model) -> list:
    """Modules with both an attention and a feed-forward child: the decoder layers."""
    import torch

    return [m for m in model.modules()
            if all(isinstance(getattr(m, name, None), torch.nn.Module) for name in SUBLAYERS)]


def attach(model, method: AdapterConfig):
    """Insert one bottleneck after each attention and feed-forward sublayer (idempotent)."""
    Bottleneck = _bottleneck_cls()
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"method=adapter: {type(model).__name__} has no decoder layers with "
                         f"{' and '.join(SUBLAYERS)} children to put adapters after")
    hidden = model.config.hidden_size
    for layer in layers:
        for name in SUBLAYERS:
            sublayer = getattr(layer, name)
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


SPEC = register(TensorsMethodSpec(name="adapter", config_cls=AdapterConfig, apply=apply, attach=attach,
                                  saves="adapter", summary="bottleneck MLPs after attention and feed-forward"))
