"""Parameter and byte counts in closed form: the tensors methods train (which layers a target
list selects, the norms, every tensor), base weights at their storage width (bitsandbytes formats
included), optimizer states."""

from __future__ import annotations

import math
from typing import Any

from trainers.memory.shapes import ALL_LINEAR, ATTENTION, ModelShape

GIB = 1024 ** 3
FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# bitsandbytes 4-bit storage: two codes per byte; one fp32 absmax per block of 64 weights, or
# with double quantization one 8-bit absmax per block + one fp32 absmax per 256 blocks.
QUANT_BLOCK = 64
NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * 4  # the 16-entry code book every 4-bit weight keeps
NESTED_CODE_BYTES = 256 * 4 + 4  # the 8-bit code book of the nested absmax + its offset
# bitsandbytes 8-bit optimizers keep 32-bit state for tensors smaller than this.
BNB_MIN_8BIT_SIZE = 4096
BNB_STATE_BLOCK = 256


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a target name: the module's name or a dotted suffix of it."""
    return name == target or name.endswith("." + target) or target.endswith("." + name) or \
        name.rsplit(".", 1)[-1] == target


def linear_targets(shape: ModelShape, targets: Any) -> list[str]:
    """Per-layer linear names a target list selects: `all-linear` (every one, never the head),
    `attention` (the attention projections), or the model's own names."""
    targets = list(targets)
    if targets == [ALL_LINEAR]:
        return list(shape.linears())
    names = shape.attention_linears() if ATTENTION in targets else []
    return [n for n in shape.linears() if n in names or any(_matches(n, t) for t in targets)]


def full_sizes(shape: ModelShape) -> list[int]:
    """Every parameter tensor of the model."""
    L, h = shape.layers, shape.hidden
    sizes = [shape.vocab * h] * (1 if shape.tied else 2) + ([shape.positions * h] if shape.positions else [])
    for fan_in, fan_out, bias in shape.linears().values():
        sizes += [fan_in * fan_out] * L + ([fan_out] * L if bias else [])
    return sizes + norm_sizes(shape, shape.layout.norms_per_layer, final=True, head_norms=True)


def norm_sizes(shape: ModelShape, per_layer: int, final: bool, head_norms: bool = False) -> list[int]:
    """Tensors of `per_layer` hidden-size norms in every layer (+ the final one): weight, and bias
    for LayerNorm; with head_norms, Qwen3's per-head q/k norms too."""
    tensors = 2 if shape.layout.layer_norm else 1
    sizes = [shape.hidden] * tensors * (per_layer * shape.layers + int(final))
    if shape.layout.head_norms and head_norms:
        sizes += [shape.head_dim] * 2 * shape.layers
    return sizes


def quantized_linear_bytes(fan_in: int, fan_out: int, precision: str, double_quant: bool = False) -> int:
    """Bytes of one bitsandbytes linear weight (without bias) stored at `precision`."""
    n = fan_in * fan_out
    if precision == "int8":
        return n + fan_out * 4  # int8 weight + one fp32 scale per output row
    if precision in ("nf4", "fp4"):
        blocks = math.ceil(n / QUANT_BLOCK)
        if double_quant:
            constants = blocks + math.ceil(blocks / NESTED_BLOCK) * 4 + NESTED_CODE_BYTES
        else:
            constants = blocks * 4
        return (n + 1) // 2 + constants + NF4_CODE_BYTES
    return n * FLOAT_BYTES[precision]


def weight_bytes(shape: ModelShape, precision: str, double_quant: bool = False) -> int:
    """The base model's parameters at their storage width. Quantized: the decoder's linear weights
    in bitsandbytes formats; embeddings, lm_head, norms and biases stay unquantized, in fp32 once
    a method prepares the base for training."""
    if precision in FLOAT_BYTES:
        return shape.total_params() * FLOAT_BYTES[precision]
    linears = sum(quantized_linear_bytes(i, o, precision, double_quant) for i, o, _ in shape.linears().values())
    unquantized = shape.embedding_params() + shape.bias_params() + shape.norm_params()
    return shape.layers * linears + unquantized * 4


def optimizer_state_bytes(sizes: list[int], param_bytes: int, optimizer: str) -> int:
    n = sum(sizes)
    if optimizer == "sgd":  # momentum buffer
        return n * param_bytes
    if optimizer in ("adamw", "paged_adamw_32bit"):  # exp_avg + exp_avg_sq, in the parameter's dtype
        return 2 * n * (param_bytes if optimizer == "adamw" else 4)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        total = 0
        for size in sizes:
            if size < BNB_MIN_8BIT_SIZE:
                total += 2 * size * 4
            else:  # two uint8 states + one fp32 absmax per 256-value block each
                total += 2 * size + 2 * math.ceil(size / BNB_STATE_BLOCK) * 4
        return total
    raise ValueError(f"train.optimizer={optimizer!r}: no memory model for this optimizer")
