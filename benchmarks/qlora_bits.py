"""Weight memory of quantized linear layers, measured from real bitsandbytes layers, beside the
formula `trainers.memory` uses, with fp32 and bf16 as the baseline.

    python benchmarks/qlora_bits.py

Part 1: single layers of the default model's shapes and of a 7B Llama's, quantized on CPU by
bnb.nn.Linear8bitLt / Linear4bit (nf4, fp4, each with and without double quantization); bytes are
the distinct storages a layer holds (packed weight, absmax, code books, nested absmax, row scales).
Part 2: the default model loaded at each precision the way a trial loads it
(`load_base_model` + `prepare_quantized_base`), all parameters and quantization state, against
`trainers.memory.weight_bytes`. Prints tables; writes nothing.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FORMATS = ("fp32", "bf16", "int8", "nf4", "nf4+dq", "fp4", "fp4+dq")
# (in_features, out_features): the default model's q/k/v, o and MLP shapes, then a 7B Llama's.
LAYERS = [(128, 128), (128, 64), (128, 384), (384, 128), (4096, 4096), (4096, 11008), (11008, 4096)]


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and shared tensors count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def quant_state_tensors(param) -> list:
    """The tensors a bitsandbytes parameter keeps beside its data."""
    import torch

    out = []
    state = getattr(param, "quant_state", None)
    while state is not None:  # nf4/fp4: absmax, code book, offset, then the nested state
        out += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
        state = getattr(state, "state2", None)
    scales = getattr(param, "SCB", None)  # int8: one fp32 scale per output row
    if torch.is_tensor(scales):
        out.append(scales)
    return out


def quantized_layer(fmt: str, fan_in: int, fan_out: int, weight):
    import bitsandbytes as bnb
    import torch

    if fmt in ("fp32", "bf16"):
        layer = torch.nn.Linear(fan_in, fan_out, bias=False, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
        return layer, [layer.weight]
    if fmt == "int8":
        layer = bnb.nn.Linear8bitLt(fan_in, fan_out, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        quant_type, double_quant = fmt.split("+")[0], fmt.endswith("+dq")
        layer = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compress_statistics=double_quant, quant_type=quant_type)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=double_quant,
                                         quant_type=quant_type)
    layer = layer.to("cpu")  # quantizes
    return layer, [layer.weight.data] + quant_state_tensors(layer.weight)


def layer_table() -> list[str]:
    import torch

    from trainers.memory import quantized_linear_bytes

    lines = ["| layer (in x out) | format | measured bytes | formula bytes | measured / formula | bits/param "
             "| vs bf16 | vs fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    torch.manual_seed(0)
    for fan_in, fan_out in LAYERS:
        weight = torch.randn(fan_out, fan_in) * 0.02
        n = fan_in * fan_out
        measured = {}
        for fmt in FORMATS:
            _, tensors = quantized_layer(fmt, fan_in, fan_out, weight)
            measured[fmt] = tensor_bytes(tensors)
        for fmt in FORMATS:
            formula = quantized_linear_bytes(fan_in, fan_out, fmt.split("+")[0], fmt.endswith("+dq"))
            lines.append(f"| {fan_in} x {fan_out} | {fmt} | {measured[fmt]:,} | {formula:,} | "
                         f"{measured[fmt] / formula:.4f} | {8 * measured[fmt] / n:.3f} | "
                         f"{measured[fmt] / measured['bf16']:.3f} | {measured[fmt] / measured['fp32']:.3f} |")
    return lines


def model_bytes(model) -> int:
    tensors = []
    for param in model.parameters():
        tensors.append(param.data)
        tensors += quant_state_tensors(param)
    return tensor_bytes(tensors)


def model_table(model_path: str) -> list[str]:
    import torch

    from trainers.config import ExperimentConfig, ModelConfig, PrecisionConfig
    from trainers.memory import load_shape, weight_bytes
    from trainers.methods.base import prepare_quantized_base
    from trainers.methods.lora import LoraConfig
    from trainers.model import load_base_model

    shape = load_shape(model_path)
    lines = [f"Whole model `{model_path}` ({shape.total_params():,} params), as a trial loads it:", "",
             "| precision | measured bytes | formula bytes | measured / formula | bytes/param |",
             "|---|---:|---:|---:|---:|"]
    for name, double_quant in (("fp32", False), ("bf16", False), ("int8", False), ("nf4", False), ("nf4", True),
                               ("fp4", False), ("fp4", True)):
        cfg = ExperimentConfig(model=ModelConfig(name_or_path=model_path), method=LoraConfig(),
                               precision=PrecisionConfig(name=name, compute_dtype="fp32" if name != "bf16" else "bf16",
                                                         double_quant=double_quant))
        model = prepare_quantized_base(load_base_model(cfg, torch.device("cpu")), cfg)
        measured = model_bytes(model)
        formula = weight_bytes(shape, name, double_quant)
        label = name + ("+dq" if double_quant else "")
        lines.append(f"| {label} | {measured:,} | {formula:,} | {measured / formula:.4f} | "
                     f"{measured / shape.total_params():.3f} |")
        del model
    return lines


def default_model_path() -> str:
    from trainers.embedded import ASSETS_DIR, build

    if build.base_complete(ASSETS_DIR):
        return "embedded:base"
    stand_in = Path("/tmp/finetune-lab-bench/assets")
    if not build.base_complete(stand_in):  # same shape and tokenizer, barely pretrained
        build.build(stand_in, steps=20, parts=("base",))
    return str(stand_in / "base")


def main() -> int:
    import logging

    warnings.filterwarnings("ignore")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    print("Single layers (bitsandbytes on CPU, 4-bit blocks of 64):\n")
    print("\n".join(layer_table()))
    print()
    print("\n".join(model_table(default_model_path())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
