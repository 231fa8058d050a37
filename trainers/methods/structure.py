"""Where the blocks of a decoder are, found by structure instead of by child names.

Architectures name their parts differently (Llama `self_attn` / `mlp.down_proj`, GPT-2 `attn` /
`mlp.c_proj` as Conv1D, GPT-NeoX `attention` / `mlp.dense_4h_to_h`, OPT `self_attn` / `fc2`
directly in the layer), but all share one shape: a list of identical decoder layers, each with
an attention block first and the feed-forward after it. Methods that must find a block (bottleneck
adapters, the portable `attention` target name, norm and (IA)3 defaults PEFT lacks) ask here.
"""

from __future__ import annotations

# Portable names for method.target_modules, resolved per model: every linear layer but the output
# head (PEFT's own `all-linear`), or the linear layers of each attention block.
from trainers.memory.shapes import ALL_LINEAR, ATTENTION  # noqa: E402,F401


def is_linear(module) -> bool:
    """A dense projection: torch Linear (bitsandbytes' int8/4-bit layers subclass it) or GPT-2's
    Conv1D (a linear layer storing its weight transposed)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def out_features(module) -> int:
    return module.nf if hasattr(module, "nf") else module.out_features


def in_features(module) -> int:
    return module.weight.shape[0] if hasattr(module, "nf") else module.in_features


def _has_linear(module) -> bool:
    return any(is_linear(m) for m in module.modules())


def decoder_layers(model) -> list:
    """The repeated blocks: the longest ModuleList of same-class modules each holding at least two
    linear-bearing children (attention, then feed-forward)."""
    import torch

    best: list = []
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) <= len(best):
            continue
        items = list(module)
        if len({type(m) for m in items}) == 1 and all(len(_blocks(m)) >= 2 for m in items):
            best = items
    return best


def _blocks(layer) -> list[tuple[str, object]]:
    """(name, child) of a layer's children that are or hold linear layers, in registration order
    (the order the layer's forward uses them in every architecture here)."""
    return [(name, child) for name, child in layer.named_children() if is_linear(child) or _has_linear(child)]


def sublayers(layer) -> tuple[tuple[str, object], tuple[str, object]]:
    """((name, attention block), (name, feed-forward output block)) of one decoder layer: the first
    linear-bearing child, and the last one (the MLP, or its output projection where the layer
    holds the MLP's linears directly, as OPT's fc1/fc2)."""
    blocks = _blocks(layer)
    return blocks[0], blocks[-1]


def linears_in(block, prefix: str) -> list[tuple[str, object]]:
    """(qualified name, module) of the linear layers in `block` (the block itself if it is one)."""
    if is_linear(block):
        return [(prefix, block)]
    return [(f"{prefix}.{name}", m) for name, m in block.named_modules() if name and is_linear(m)]


def attention_targets(model) -> list[str]:
    """PEFT target names for the linear layers of the attention blocks, qualified by the block's
    name (GPT-2's `attn.c_proj`, not `c_proj`, which the MLP has too); PEFT matches them as suffixes."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found")
    (name, block), _ = sublayers(layers[0])
    return [qualified for qualified, _ in linears_in(block, name)]


def resolve_targets(model, targets) -> str | list[str]:
    """method.target_modules for PEFT: `all-linear` as PEFT's string, `attention` expanded to
    this model's attention projections, other names as given."""
    targets = list(targets)
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    resolved: list[str] = []
    for target in targets:
        for name in attention_targets(model) if target == ATTENTION else [target]:
            if name not in resolved:
                resolved.append(name)
    return resolved


def norm_names(model) -> list[str]:
    """Child names of the hidden-size norms (LayerNorm / RMSNorm of any class: a module named
    *Norm with a weight of hidden size), e.g. Llama [input_layernorm, post_attention_layernorm,
    norm], OPT [self_attn_layer_norm, final_layer_norm]. Per-head norms (Qwen3's q_norm) are left out."""
    hidden = model.get_input_embeddings().embedding_dim
    names: list[str] = []
    for qualified, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (type(module).__name__.lower().endswith("norm") and weight is not None and weight.dim() == 1
                and weight.numel() == hidden):
            leaf = qualified.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def ia3_targets(model) -> tuple[list[str], list[str]]:
    """(targets, feedforward targets) for (IA)3 where PEFT has no default for the architecture,
    the shape of PEFT's Llama default: the key/value-bearing attention projections scaled on their
    output (a fused qkv, or grouped k/v: out_features != hidden; all input projections when none
    differ), and the feed-forward's output projection scaled on its input."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found")
    (attn_name, attn), (ff_name, ff) = sublayers(layers[0])
    hidden = out_features(linears_in(ff, ff_name)[-1][1])
    attention = linears_in(attn, attn_name)
    kv = [name for name, m in attention if out_features(m) != hidden]
    if not kv:
        kv = [name for name, m in attention if in_features(m) == hidden]
    feedforward = [linears_in(ff, ff_name)[-1][0]]
    return kv + feedforward, feedforward
