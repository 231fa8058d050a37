"""How much memory a trial needs, from the model's config alone (no weights are loaded).

    python -m trainers.memory llama-2-7b --seq-len 1024 --batch-size 4
    python -m trainers.memory path/to/config.json --methods full,lora --precisions bf16 --breakdown

`estimate(cfg)` predicts the peak bytes of live tensors in one trial, the quantity that
`trainers.runtime.PeakMemory` measures (and `mem/peak_bytes` records): base weights at their
storage width, the method's trainable parameters, their gradients and optimizer states,
activations saved for backward, the logits and loss, and the evaluation pass. `total_bytes` adds
a fixed runtime overhead (CUDA context, or the Python/torch process) for planning resources.

What the estimate follows is what `trainers` does, op by op, on a Llama-style decoder (Llama,
Mistral, Qwen2; SDPA attention): float precisions train the weights in their own dtype (bf16 full
fine-tuning keeps bf16 weights, grads and AdamW states: 8 B/param, no fp32 master copy); on an
int8/nf4/fp4 base every unquantized tensor (embeddings, norms, biases) is upcast to fp32 and so
are the hidden states; PEFT adapters are fp32. Accuracy against measurements:
benchmarks/estimator_accuracy.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig

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

# Bytes a trial needs beyond its tensors: a CUDA context with cuBLAS workspaces, or on CPU the
# Python process with torch, transformers, peft and bitsandbytes imported (~0.45 GiB measured).
RUNTIME_OVERHEAD = {"cuda": 1 * GIB, "cpu": GIB // 2}

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
LINEARS = ATTENTION + MLP
# PEFT's per-architecture defaults (peft.utils.constants) for the methods that have them.
IA3_DEFAULTS = {"llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
                "mistral": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
                "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",))}
LN_TUNING_DEFAULTS = {"llama": ("input_layernorm", "post_attention_layernorm", "norm"),
                      "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
                      "qwen2": ("post_attention_layernorm",)}

def _arch(model_type: str, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int,
          tied: bool, **extra: Any) -> dict[str, Any]:
    """The config.json fields the estimator reads, in the order model cards list them."""
    return dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab, tie_word_embeddings=tied,
                **extra)


# Public architecture facts (the models' config.json), so the CLI answers without a download.
#   type, hidden, layers, heads, kv heads, MLP, vocab, tied embeddings
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "llama-2-7b": _arch("llama", 4096, 32, 32, 32, 11008, 32000, False),
    "llama-2-13b": _arch("llama", 5120, 40, 40, 40, 13824, 32000, False),
    "llama-3-8b": _arch("llama", 4096, 32, 32, 8, 14336, 128256, False),
    "llama-3-70b": _arch("llama", 8192, 80, 64, 8, 28672, 128256, False),
    "llama-3.2-1b": _arch("llama", 2048, 16, 32, 8, 8192, 128256, True, head_dim=64),
    "mistral-7b": _arch("mistral", 4096, 32, 32, 8, 14336, 32000, False),
    "qwen2.5-0.5b": _arch("qwen2", 896, 24, 14, 2, 4864, 151936, True),
    "qwen2.5-1.5b": _arch("qwen2", 1536, 28, 12, 2, 8960, 151936, True),
    "qwen2.5-7b": _arch("qwen2", 3584, 28, 28, 4, 18944, 152064, False),
}
HUB_IDS = {
    "meta-llama/Llama-2-7b-hf": "llama-2-7b", "meta-llama/Llama-2-13b-hf": "llama-2-13b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "meta-llama/Llama-3.1-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-70B": "llama-3-70b", "meta-llama/Llama-3.1-70B": "llama-3-70b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b", "mistralai/Mistral-7B-v0.1": "mistral-7b",
    "Qwen/Qwen2.5-0.5B": "qwen2.5-0.5b", "Qwen/Qwen2.5-1.5B": "qwen2.5-1.5b", "Qwen/Qwen2.5-7B": "qwen2.5-7b",
}


class UnknownModelError(ValueError):
    """The model is neither a known name, nor a config.json / model directory on disk."""


# --------------------------------------------------------------------------------------------
# The model, as far as memory cares


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: embeddings, `layers` x (attention + gated MLP + 2 RMSNorms), norm, head."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def of(cls, config: Any, name: str = "") -> "ModelShape":
        """From a ModelShape, a config.json mapping or a transformers PretrainedConfig."""
        if isinstance(config, ModelShape):
            return config
        if not isinstance(config, dict):
            config = config.to_dict()
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if config.get(k) is None]
        if missing:
            raise UnknownModelError(f"{name or 'config'}: not a Llama-style decoder config (no {', '.join(missing)})")
        model_type = config.get("model_type", "llama")
        heads = config["num_attention_heads"]
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            name=name or config.get("_name_or_path", "") or model_type,
            model_type=model_type,
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            # transformers' default for these architectures is untied unless the config says so
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",  # Qwen2 has q/k/v biases, no flag
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per decoder layer: name -> (in_features, out_features, has_bias)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim, self.qkv_bias), "k_proj": (h, self.kv_dim, self.qkv_bias),
            "v_proj": (h, self.kv_dim, self.qkv_bias), "o_proj": (self.q_dim, h, self.o_bias),
            "gate_proj": (h, i, self.mlp_bias), "up_proj": (h, i, self.mlp_bias), "down_proj": (i, h, self.mlp_bias),
        }

    def bias_params(self) -> int:
        return self.layers * sum(out for _, out, bias in self.linears().values() if bias)

    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def linear_weight_params(self) -> int:
        return self.layers * sum(i * o for i, o, _ in self.linears().values())

    def total_params(self) -> int:
        return self.embedding_params() + self.linear_weight_params() + self.bias_params() + self.norm_params()


def load_shape(name_or_path: str) -> ModelShape:
    """ModelShape of a known name / hub id, a config.json, a model directory or `embedded:base`.

    Hub ids not in KNOWN_MODELS are looked up in the local Hugging Face cache only (no network).
    Nothing is built or downloaded.
    """
    key = HUB_IDS.get(name_or_path, name_or_path)
    if key.lower() in KNOWN_MODELS:
        return ModelShape.of(KNOWN_MODELS[key.lower()], key.lower())
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith("embedded:"):
        return _embedded_shape(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and "/" in name_or_path and not name_or_path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
            if isinstance(cached, str):
                path = Path(cached)
        except ImportError:
            pass
    if not path.is_file():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise UnknownModelError(f"unknown model {name_or_path!r}: not a config.json, a model directory or a "
                                f"cached hub id; known names: {known}")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UnknownModelError(f"{path}: cannot read a model config ({err})") from None
    return ModelShape.of(config, name_or_path)


def _embedded_shape(name: str) -> ModelShape:
    """The embedded base's config.json once built; before that (a dry run should not wait minutes
    for a build) its pretraining shape with the tokenizer's vocabulary cap, an upper bound."""
    from trainers import embedded
    from trainers.embedded import build

    if name != "embedded:base":
        raise UnknownModelError(f"{name!r} is not a model; the embedded model is embedded:base")
    config = embedded.ASSETS_DIR / "base" / "config.json"
    if build.base_complete(embedded.ASSETS_DIR):
        return ModelShape.of(json.loads(config.read_text()), name)
    from trainers.embedded.pretrain import MODEL_SHAPE
    from trainers.embedded.tokenizer import VOCAB_SIZE

    return ModelShape.of({"model_type": "llama", "vocab_size": VOCAB_SIZE, **MODEL_SHAPE}, name)


# --------------------------------------------------------------------------------------------
# Trainable parameters, closed forms


def _method_field(method: Any, key: str, default: Any) -> Any:
    value = getattr(method, key, default)
    return default if value is None else value


def lora_targets(shape: ModelShape, method: Any) -> list[str]:
    """Per-layer linear names a LoRA config targets ("all-linear" = all seven, never the head)."""
    targets = list(_method_field(method, "target_modules", ["all-linear"]))
    if targets == ["all-linear"]:
        return list(LINEARS)
    return [name for name in LINEARS if name in targets]


def ia3_targets(shape: ModelShape, method: Any) -> tuple[list[str], list[str]]:
    """(targets, feedforward targets) of an (IA)3 config, PEFT's defaults when unset."""
    default_targets, default_ff = IA3_DEFAULTS.get(shape.model_type, IA3_DEFAULTS["llama"])
    targets = getattr(method, "target_modules", None)
    if targets is None:
        return list(default_targets), list(default_ff)
    return [t for t in LINEARS if t in targets], [t for t in LINEARS if t in (getattr(method, "feedforward_modules",
                                                                                        None) or [])]


def ln_tuning_norms(shape: ModelShape, method: Any) -> tuple[int, bool]:
    """(norms per decoder layer, final norm included) that LN tuning trains."""
    targets = getattr(method, "target_modules", None)
    if targets is None:
        targets = LN_TUNING_DEFAULTS.get(shape.model_type, LN_TUNING_DEFAULTS["llama"])
    per_layer = sum(name in targets for name in ("input_layernorm", "post_attention_layernorm"))
    return per_layer, "norm" in targets


def trainable_params(model_config: Any, cfg: "ExperimentConfig") -> int:
    """Number of parameters `cfg.method` trains on this model (closed form, no model built).

    model_config: ModelShape, config.json mapping or transformers PretrainedConfig.
    """
    shape = ModelShape.of(model_config)
    method = cfg.method
    name = method.name
    h, L = shape.hidden, shape.layers
    if name == "full":
        return shape.total_params()
    if name in ("lora", "qlora"):
        r = method.r
        linears = shape.linears()
        total = 0
        for target in lora_targets(shape, method):
            fan_in, fan_out, _ = linears[target]
            total += r * (fan_in + fan_out) + (fan_out if getattr(method, "use_dora", False) else 0)
        return L * total
    if name == "prompt":
        return method.num_virtual_tokens * h
    if name == "ptuning":
        n, e = method.num_virtual_tokens, method.encoder_hidden_size
        if _method_field(method, "encoder_type", "mlp") == "lstm":
            lstm = 2 * (4 * e * (h + e) + 8 * e) + 2 * (4 * e * (2 * e + e) + 8 * e)  # 2 layers x 2 directions
            return n * h + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * h + h)
        return n * h + (h * e + e) + (e * e + e) + (e * h + h)
    if name == "prefix":
        n, kv = method.num_virtual_tokens, shape.kv_dim
        if getattr(method, "prefix_projection", False):
            e = method.encoder_hidden_size
            return n * kv + (kv * e + e) + (e * 2 * L * kv + 2 * L * kv)
        return n * 2 * L * kv
    if name == "ia3":
        targets, feedforward = ia3_targets(shape, method)
        linears = shape.linears()
        return L * sum(linears[t][0] if t in feedforward else linears[t][1] for t in targets)
    if name == "bitfit":
        return shape.bias_params()
    if name == "ln_tuning":
        per_layer, final = ln_tuning_norms(shape, method)
        return (per_layer * L + int(final)) * h
    if name == "adapter":
        b = method.bottleneck_size
        return L * 2 * (2 * h * b + b + h)
    raise ValueError(f"method.name={name!r}: no memory model for this method")


def trainable_tensor_sizes(shape: ModelShape, cfg: "ExperimentConfig") -> list[int]:
    """Element counts of the trainable tensors (8-bit optimizers treat small tensors differently)."""
    method, name, L = cfg.method, cfg.method.name, shape.layers
    linears = shape.linears()
    if name == "full":
        sizes = [shape.vocab * shape.hidden] * (1 if shape.tied else 2) + [shape.hidden]
        for fan_in, fan_out, bias in linears.values():
            sizes += [fan_in * fan_out] * L + ([fan_out] * L if bias else [])
        return sizes + [shape.hidden] * 2 * L
    if name in ("lora", "qlora"):
        sizes = []
        for target in lora_targets(shape, method):
            fan_in, fan_out, _ = linears[target]
            sizes += [method.r * fan_in, method.r * fan_out] + ([fan_out] if getattr(method, "use_dora", False) else [])
        return sizes * L
    if name == "bitfit":
        return [out for _, out, bias in linears.values() if bias] * L
    if name == "ia3":
        targets, feedforward = ia3_targets(shape, method)
        return [linears[t][0] if t in feedforward else linears[t][1] for t in targets] * L
    if name == "ln_tuning":
        per_layer, final = ln_tuning_norms(shape, method)
        return [shape.hidden] * (per_layer * L + int(final))
    if name == "adapter":
        b, h = method.bottleneck_size, shape.hidden
        return [h * b, b, b * h, h] * 2 * L
    return [trainable_params(shape, cfg)]  # prompt/prefix/ptuning: one dominant embedding


# --------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Component:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one trial, by component.

    train peak = weights + trainable + optimizer + max(activations + logits/loss, gradients + step)
    eval peak  = weights + trainable + eval pass;   peak_bytes = max of the two (what PeakMemory
    measures); total_bytes = peak_bytes + runtime overhead (what to reserve).
    """

    model: str
    method: str
    precision: str
    optimizer: str
    batch_size: int
    seq_len: int
    device: str
    params_total: int
    params_trainable: int
    weights: Component
    trainable: Component
    gradients: Component
    optimizer_states: Component
    activations: Component
    logits: Component
    optimizer_step: Component
    eval_pass: Component
    overhead: Component
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak_bytes(self) -> int:
        steady = self.weights.bytes + self.trainable.bytes + self.optimizer_states.bytes
        return int(steady + max(self.activations.bytes + self.logits.bytes,
                                self.gradients.bytes + self.optimizer_step.bytes))

    @property
    def eval_peak_bytes(self) -> int:
        if not self.eval_pass.bytes:
            return 0
        return int(self.weights.bytes + self.trainable.bytes + self.eval_pass.bytes)

    @property
    def peak_bytes(self) -> int:
        return max(self.train_peak_bytes, self.eval_peak_bytes)

    @property
    def total_bytes(self) -> int:
        return self.peak_bytes + int(self.overhead.bytes)

    def components(self) -> list[Component]:
        return [self.weights, self.trainable, self.gradients, self.optimizer_states, self.activations,
                self.logits, self.optimizer_step, self.eval_pass, self.overhead]

    def table(self) -> str:
        """The breakdown as aligned text: one line per component, then the peaks and the total."""
        head = (f"{self.model} | {self.method} | {self.precision} | {self.optimizer} | "
                f"batch {self.batch_size} x seq {self.seq_len} | {self.device}")
        rows = [(c.name, c.bytes, c.note) for c in self.components()]
        rows += [("= train peak", self.train_peak_bytes,
                  "weights + trainable + optimizer + max(activations + logits, gradients + step)"),
                 ("= eval peak", self.eval_peak_bytes, "weights + trainable + eval pass"),
                 ("= peak (tensors)", self.peak_bytes, "compare with mem/peak_bytes"),
                 ("= total", self.total_bytes, "peak + runtime overhead")]
        width = max(len(r[0]) for r in rows)
        lines = [head, f"  params: {self.params_total:,} total, {self.params_trainable:,} trainable"]
        lines += [f"  {name:<{width}}  {_human(n):>10}  {note}" for name, n, note in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


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


def _extra_tokens(cfg: "ExperimentConfig") -> tuple[int, int]:
    """(virtual tokens added to every sequence, prefix length added to every key/value)."""
    name = cfg.method.name
    if name in ("prompt", "ptuning"):
        return cfg.method.num_virtual_tokens, 0
    if name == "prefix":
        return 0, cfg.method.num_virtual_tokens
    return 0, 0


def _norms_that_train(shape: ModelShape, cfg: "ExperimentConfig") -> tuple[bool, bool, bool]:
    """(input_layernorm, post_attention_layernorm, final norm): whose weight trains."""
    name = cfg.method.name
    if name == "full":
        return True, True, True
    if name != "ln_tuning":
        return False, False, False
    targets = getattr(cfg.method, "target_modules", None) or LN_TUNING_DEFAULTS.get(
        shape.model_type, LN_TUNING_DEFAULTS["llama"])
    return "input_layernorm" in targets, "post_attention_layernorm" in targets, "norm" in targets


def _train_activation_bytes(shape: ModelShape, cfg: "ExperimentConfig", act: int, batch: int,
                            seq: int) -> tuple[float, float, float]:
    """For one micro-batch: (bytes saved for backward over all layers, those of one layer, bytes
    of layer inputs that bitsandbytes' int8 matmul holds on its autograd contexts).

    Follows autograd: an op keeps an input only when the gradient of another input needs it, so
    frozen weights keep less than trained ones (a frozen linear layer keeps nothing). Batches are
    assumed padded (rows of different lengths), so attention gets a mask and grouped keys/values
    are repeated to every head.
    """
    method, name = cfg.method, cfg.method.name
    int8 = cfg.precision.name == "int8"
    virtual, prefix = _extra_tokens(cfg)
    S = seq + virtual
    kv_len = S + prefix
    T = batch * S
    h, I = shape.hidden, shape.intermediate
    linears = shape.linears()
    lora = lora_targets(shape, method) if name in ("lora", "qlora") else []
    r = getattr(method, "r", 0)
    dropout = getattr(method, "dropout", 0.0) or 0.0
    dora = bool(getattr(method, "use_dora", False))
    ia3, ia3_ff = ia3_targets(shape, method) if name == "ia3" else ([], [])
    norm1_trains, norm2_trains, final_norm_trains = _norms_that_train(shape, cfg)
    qkv = ("q_proj", "k_proj", "v_proj")

    def keeps_input(target: str, input_grad: bool) -> bool:
        """Its weight trains; bitsandbytes' int8 matmul keeps it whenever a gradient flows through
        (its input or a trained bias); a same-dtype LoRA branch without dropout reads the same
        tensor; (IA)3 scales it. q/k/v share one input, gate/up another."""
        bias_trains = name == "bitfit" and linears[target][2]
        return (name == "full" or (int8 and (input_grad or bias_trains))
                or (target in lora and act == 4 and dropout == 0) or (target in ia3_ff and act == 4))

    def own_copy(target: str) -> float:
        """Adapters in fp32 keep their own copy of the input: LoRA's fp32 cast of a 2-byte input
        (or its dropout output and fp32 mask), (IA)3's fp32 cast of a scaled 2-byte input."""
        fan_in = linears[target][0]
        if target in lora:
            if dropout > 0:
                return T * fan_in * 8
            return T * fan_in * 4 if act != 4 else 0.0
        if target in ia3_ff and act != 4:
            return T * fan_in * 4
        return 0.0

    def adapter_branch(target: str) -> float:
        """What a targeted layer's adapter keeps: its input copy and LoRA's rank-r intermediate;
        DoRA's magnitude scaling also keeps the base output and the fp32 LoRA output."""
        if target not in lora:
            return own_copy(target)
        return own_copy(target) + T * r * 4 + (T * linears[target][1] * (act + 4) if dora else 0.0)

    def layer(first: bool) -> tuple[float, float]:
        # Gradient reaches the first layer's input only when the embeddings or a prompt train.
        input_grad = not first or name in ("full", "prompt", "ptuning")
        qkv_input_grad = input_grad or norm1_trains
        attention_grad = (qkv_input_grad or name == "prefix" or any(t in lora or t in ia3 for t in qkv)
                          or (name == "bitfit" and shape.qkv_bias))
        b = int8_ctx = 0.0
        # input RMSNorm: the fp32 view of its input; the normalised tensor if its weight trains
        b += T * h * 4 if input_grad else 0.0
        b += T * h * act if norm1_trains else 0.0
        if any(keeps_input(t, qkv_input_grad) for t in qkv):
            b += T * h * act
            int8_ctx += T * h * act if int8 else 0.0
        for t in qkv:
            b += adapter_branch(t)
            if t in ia3 and t not in ia3_ff:  # output scaling keeps the unscaled output
                b += T * linears[t][1] * act
        if attention_grad:
            # SDPA keeps q (rotated), k and v (repeated to every head when grouped), its output
            # (also o_proj's input), logsumexp, and the padding mask expanded for this layer.
            b += 2 * T * shape.q_dim * act
            b += 2 * batch * shape.heads * kv_len * shape.head_dim * act
            b += batch * shape.heads * S * 4 + batch * S * kv_len * act
            int8_ctx += T * shape.q_dim * act if int8 else 0.0
        b += adapter_branch("o_proj")
        if name == "adapter":  # bottleneck after attention: its fp32 input and activation
            b += T * h * 4 + T * method.bottleneck_size * 4
        # post-attention RMSNorm, as above
        b += T * h * 4
        b += T * h * act if norm2_trains else 0.0
        # gated MLP: silu keeps gate's output; the product keeps silu's and up's outputs
        if keeps_input("gate_proj", True) or keeps_input("up_proj", True):
            b += T * h * act
        b += 3 * T * I * act
        b += adapter_branch("gate_proj") + adapter_branch("up_proj")
        b += T * I * act if keeps_input("down_proj", True) else 0.0
        if int8 and "down_proj" in ia3_ff:  # int8 keeps the scaled product, (IA)3 the unscaled
            b += T * I * act
        b += adapter_branch("down_proj")
        if name == "adapter":
            b += T * h * 4 + T * method.bottleneck_size * 4
        int8_ctx += T * (h + I) * act if int8 else 0.0
        return b, int8_ctx

    (per_layer, ctx_per_layer), (first_layer, ctx_first) = layer(first=False), layer(first=True)
    total = first_layer + (shape.layers - 1) * per_layer
    total += batch * S * kv_len  # the boolean padding mask, built once
    # final norm (fp32 input; normalised tensor if it trains) and the head's input if it trains
    total += T * h * 4
    total += T * h * act if final_norm_trains else 0.0
    total += T * h * act if name == "full" else 0.0
    if name == "ptuning":  # the prompt encoder runs once per step, for batch 1
        total += virtual * (h + 2 * method.encoder_hidden_size) * 4
    return total, per_layer, ctx_first + (shape.layers - 1) * ctx_per_layer


def _prefix_cache_bytes(shape: ModelShape, cfg: "ExperimentConfig", act: int, batch: int, seq: int) -> float:
    """Prefix tuning passes its prefix as a key/value cache: while the forward runs, every layer's
    concatenated keys and values live in it."""
    virtual, prefix = _extra_tokens(cfg)
    if not prefix:
        return 0.0
    return batch * shape.layers * 2 * shape.kv_dim * (seq + prefix) * act


def _eval_bytes(shape: ModelShape, cfg: "ExperimentConfig", act: int, batch: int, seq: int) -> float:
    """Peak of the no-grad evaluation on top of the weights: eval loss and greedy generation."""
    virtual, prefix = _extra_tokens(cfg)
    S = seq + virtual
    T = batch * S
    shifted = batch * (seq - 1)  # eval_loss drops virtual positions and shifts by one
    h, I, V = shape.hidden, shape.intermediate, shape.vocab
    name = cfg.method.name
    lora_up = name in ("lora", "qlora") and "up_proj" in lora_targets(shape, cfg.method)
    ia3_down = name == "ia3" and "down_proj" in ia3_targets(shape, cfg.method)[1]
    # The widest moment of a layer's forward is in the MLP: silu(gate), up and their product; a
    # LoRA branch on up adds its fp32 output and scaled output (and an fp32 copy of a 2-byte
    # input); (IA)3 on down multiplies an fp32 copy of the product and casts it back.
    mlp = T * I * (2 * act + 8 if lora_up else 3 * act)
    if lora_up and getattr(cfg.method, "use_dora", False):  # + base output, its rescaling, lora's
        mlp = T * I * (3 * act + 16)
    if lora_up and act != 4:
        mlp += T * h * 4
    if ia3_down:
        mlp = max(mlp, T * I * (2 * act + 8 if act != 4 else 2 * act))
    hidden_states = 4 * T * h * act  # embeddings, layer input, residual, normed input
    cache = _prefix_cache_bytes(shape, cfg, act, batch, seq)
    # eval_loss keeps the previous batch's logits and fp32 shifted copy through the next forward;
    # the new shifted copy is made (reshape, then fp32) while the previous one still exists.
    forward_side = T * V * act + shifted * V * 4 + hidden_states + mlp + cache
    loss_side = T * V * act + shifted * V * max(act + 4 + (4 if act != 4 else 0), 8)
    # generate(): the KV cache for prompt + new tokens, then the prompt's forward
    new = cfg.data.max_new_tokens
    kv_cache = batch * shape.layers * 2 * shape.kv_dim * (S + prefix + new) * act
    generate = kv_cache + hidden_states + mlp + batch * V * (act + 4)
    return max(loss_side, forward_side, generate)


def estimate(cfg: "ExperimentConfig", model_config: Any = None, *, seq_len: Optional[int] = None,
             eval_seq_len: Optional[int] = None, device: Optional[str] = None) -> MemoryEstimate:
    """Predicted peak memory of the trial `cfg` describes.

    model_config: a ModelShape / config mapping / PretrainedConfig; default: read the config of
    cfg.model.name_or_path (known name, config.json, model directory, cached hub id, embedded:base).
    seq_len: tokens per training row (default data.max_seq_len: the worst case; batches are padded
    to their longest row, so a typical length gives the typical peak). eval_seq_len: the same for
    evaluation batches (default seq_len). device: "cuda" or "cpu" for the runtime overhead
    (default from train.use_gpu).
    """
    shape = ModelShape.of(model_config, cfg.model.name_or_path) if model_config is not None \
        else load_shape(cfg.model.name_or_path)
    name, precision, train = cfg.method.name, cfg.precision, cfg.train
    device = device or ("cuda" if train.use_gpu else "cpu")
    seq = seq_len or cfg.data.max_seq_len
    eval_seq = eval_seq_len or seq
    notes: list[str] = []
    quantized = precision.quantized
    # Unquantized tensors on a quantized base are upcast to fp32 (and with them the hidden states).
    base_bytes = 4 if quantized else FLOAT_BYTES[precision.name]
    act = base_bytes

    weights = weight_bytes(shape, precision.name, precision.double_quant)
    n_trainable = trainable_params(shape, cfg)
    sizes = trainable_tensor_sizes(shape, cfg)
    if name in ("full", "bitfit"):
        param_bytes, extra = base_bytes, 0  # the base's own tensors train
    elif name == "ln_tuning":
        param_bytes, extra = base_bytes, n_trainable * base_bytes  # PEFT trains copies of the norms
    else:
        param_bytes, extra = 4, n_trainable * 4
    grads = n_trainable * param_bytes
    opt = optimizer_state_bytes(sizes, param_bytes, train.optimizer)
    # single-tensor AdamW makes two temporaries the size of the largest tensor (sqrt, denominator)
    step = 2 * max(sizes) * param_bytes if train.optimizer == "adamw" else max(sizes) * param_bytes

    # Sequences per micro-batch. The preference stages score chosen and rejected together; RL
    # trains on num_generations sampled answers per prompt and holds a reward model. These stages
    # follow sft's per-sequence model; only sft is checked against measurements.
    stage = getattr(getattr(cfg, "stage", None), "name", None) or "sft"
    rows, head_shape = train.batch_size, shape
    if stage in ("reward", "dpo"):
        rows *= 2
        notes.append(f"stage {stage}: chosen + rejected = {rows} sequences per micro-batch (not measured)")
    if stage == "reward":  # a scalar score head instead of vocabulary logits
        head_shape = dataclasses.replace(shape, vocab=1)
    if stage == "rl":
        rows *= cfg.stage.num_generations
        seq += cfg.data.max_new_tokens
        weights *= 2
        notes.append(f"stage rl: {rows} rollouts of prompt + {cfg.data.max_new_tokens} new tokens per micro-batch, "
                     "and a reward model as large as the policy (not measured)")
    if train.fsdp and train.num_workers > 1:
        # FSDP2 shards weights, gradients and optimizer state; a decoder layer is gathered while it
        # computes, the root unit (embeddings, head, norm) stays whole
        n = train.num_workers
        layer_bytes = (shape.total_params() - shape.embedding_params()) / shape.layers * base_bytes
        weights = weights / n + 2 * layer_bytes + shape.embedding_params() * base_bytes
        grads, opt = grads / n + layer_bytes, opt / n
        notes.append(f"FSDP over {n} workers: weights, gradients and optimizer states sharded (not measured)")

    virtual, _ = _extra_tokens(cfg)
    tokens = rows * (seq + virtual)
    acts, per_layer, int8_contexts = _train_activation_bytes(shape, cfg, act, rows, seq)
    if train.grad_accum > 1:  # earlier micro-batches' gradients stay through the next backward
        acts += grads
    if train.num_workers > 1 and not train.fsdp:  # DDP's gradient buckets
        acts += grads
    # The training step keeps only the loss of the model's output. Backward starts with three
    # fp32 tensors of tokens x vocab: log-softmax, its gradient and the gradient it passes on.
    # The forward's end holds the logits, their fp32 copy and log-softmax, the output's key/value
    # cache (prefix tuning), and the previous step's loss, whose finished graph still holds what
    # bitsandbytes' int8 matmul stored on its autograd context: every int8 layer's input.
    backward_start = tokens * head_shape.vocab * 12
    forward_end = tokens * head_shape.vocab * (act + 4 + (4 if act != 4 else 0))
    forward_end += _prefix_cache_bytes(shape, cfg, act, rows, seq)
    forward_end += int8_contexts
    logits = max(backward_start, forward_end)
    logits_note = (f"{tokens:,} tokens x {head_shape.vocab:,} vocab: " +
                   ("3 fp32 loss tensors at backward start" if backward_start >= forward_end
                    else "logits + loss (+ caches) at forward end"))

    eval_batch = train.eval_batch_size
    if cfg.data.max_eval_rows:
        eval_batch = min(eval_batch, cfg.data.max_eval_rows)
    if stage in ("reward", "dpo"):
        eval_batch *= 2
    evaluation = _eval_bytes(head_shape, cfg, act, eval_batch, eval_seq) if cfg.data.eval_file else 0.0

    weight_note = {"fp32": "4 B/param", "bf16": "2 B/param", "fp16": "2 B/param",
                   "int8": "linear weights 1 B/param + fp32 row scales; rest fp32",
                   "nf4": "linear weights 0.5 B/param + block absmax" + (" (double quant)" if precision.double_quant
                                                                         else "") + "; rest fp32"}
    weight_note["fp4"] = weight_note["nf4"]
    opt_note = {"adamw": "AdamW: 2 states per trainable param, in its dtype", "sgd": "SGD momentum: 1 state",
                "adamw_8bit": "8-bit AdamW: 2 x 1 B + block absmax", "paged_adamw_8bit": "paged 8-bit AdamW: "
                "2 x 1 B + block absmax (pageable)", "paged_adamw_32bit": "paged AdamW: 2 x fp32 (pageable)"}
    dtype_name = {4: "fp32", 2: "bf16/fp16"}[param_bytes]
    return MemoryEstimate(
        model=shape.name, method=name,
        precision=precision.name + (" +dq" if precision.double_quant else ""),
        optimizer=train.optimizer, batch_size=train.batch_size, seq_len=seq, device=device,
        params_total=shape.total_params(), params_trainable=n_trainable,
        weights=Component("weights", weights, weight_note[precision.name]),
        trainable=Component("trainable (added)", extra,
                            f"{n_trainable:,} params, {dtype_name}" if extra else "the base's own tensors train"),
        gradients=Component("gradients", grads, f"{dtype_name}, one per trainable param"),
        optimizer_states=Component("optimizer states", opt, opt_note[train.optimizer]),
        activations=Component("activations", acts, f"saved for backward; {_human(per_layer)} per layer x "
                                                   f"{shape.layers}, {tokens:,} tokens"),
        logits=Component("logits + loss", logits, logits_note),
        optimizer_step=Component("optimizer step", step, "temporaries of the update (peak alternative)"),
        eval_pass=Component("eval pass", evaluation,
                            f"batch {eval_batch} x seq {eval_seq}, no grad" if evaluation else "no eval file"),
        overhead=Component("runtime overhead", RUNTIME_OVERHEAD[device],
                           "CUDA context" if device == "cuda" else "Python + torch process"),
        notes=notes,
    )


def estimate_peak_bytes(cfg: "ExperimentConfig", **kwargs: Any) -> int:
    """Predicted peak tensor bytes of the trial (comparable with `mem/peak_bytes`)."""
    return estimate(cfg, **kwargs).peak_bytes


# --------------------------------------------------------------------------------------------
# Command line


def _experiment(model: str, method: str, precision: str, args) -> "ExperimentConfig":
    from trainers.config import DataConfig, ExperimentConfig, ModelConfig, PrecisionConfig, TrainConfig
    from trainers.methods import METHODS
    from trainers.recipes import RECIPES

    method_cfg = METHODS[method].config_cls()
    if hasattr(method_cfg, "r"):
        method_cfg.r = args.rank
    compute = precision if precision in FLOAT_BYTES else "bf16"
    return ExperimentConfig(
        model=ModelConfig(name_or_path=model),
        data=DataConfig(train_file="-", eval_file="-" if args.eval_batch_size else None, max_seq_len=args.seq_len),
        method=method_cfg,
        stage=RECIPES["sft"].config_cls(name="sft"),
        precision=PrecisionConfig(name=precision, compute_dtype=compute,
                                  double_quant=args.double_quant and precision in ("nf4", "fp4")),
        train=TrainConfig(batch_size=args.batch_size, optimizer=args.optimizer,
                          eval_batch_size=args.eval_batch_size or 1, use_gpu=args.device == "cuda"),
    )


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    from trainers.config import OPTIMIZERS, PRECISIONS
    from trainers.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="python -m trainers.memory",
        description="Estimated peak memory (GiB) of fine-tuning MODEL, per method and base precision.")
    parser.add_argument("model", metavar="MODEL",
                        help=f"config.json, model directory, embedded:base or a known name ({', '.join(KNOWN_MODELS)})")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (default 1)")
    parser.add_argument("--methods", default="full,lora,qlora", help="comma-separated (default full,lora,qlora)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated (default all)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--double-quant", action="store_true", help="4-bit bases quantize their scales too")
    parser.add_argument("--eval-batch-size", type=int, default=0,
                        help="also count the eval pass at this batch size (default 0: training only)")
    parser.add_argument("--device", default="cuda", choices=sorted(RUNTIME_OVERHEAD),
                        help="whose runtime overhead to add (default cuda)")
    parser.add_argument("--breakdown", action="store_true", help="print every estimate's components")
    args = parser.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = [m for m in methods if m not in METHODS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        print(f"error: unknown method/precision {', '.join(unknown)}; methods: {', '.join(sorted(METHODS))}; "
              f"precisions: {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    if args.seq_len < 1 or args.batch_size < 1 or args.rank < 1:
        print("error: --seq-len, --batch-size and --rank must be >= 1", file=sys.stderr)
        return 2
    try:
        shape = load_shape(args.model)
    except UnknownModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(f"{shape.name}: {shape.total_params() / 1e9:.3g}B params (hidden {shape.hidden}, {shape.layers} layers, "
          f"{shape.heads} heads / {shape.kv_heads} kv, vocab {shape.vocab})")
    print(f"batch {args.batch_size} x seq {args.seq_len}, {args.optimizer}, LoRA r={args.rank}"
          f"{', eval batch ' + str(args.eval_batch_size) if args.eval_batch_size else ''}; "
          f"GiB including {RUNTIME_OVERHEAD[args.device] / GIB:g} GiB {args.device} runtime overhead\n")
    estimates, cells, refusals = [], {}, {}
    for method in methods:
        for precision in precisions:
            cfg = _experiment(args.model, method, precision, args)
            problems = METHODS[method].check_combination(cfg)
            if problems:
                cells[method, precision] = "n/a"
                refusals[method, precision] = problems[0][1]
                continue
            est = estimate(cfg, shape, device=args.device)
            estimates.append(est)
            gib = est.total_bytes / GIB
            cells[method, precision] = f"{gib:.1f}" if gib >= 10 else f"{gib:.2f}" if gib >= 1 else f"{gib:.3f}"
    width = max(len(m) for m in methods + ["method"])
    print(f"{'method':<{width}}  " + "  ".join(f"{p:>8}" for p in precisions))
    for method in methods:
        print(f"{method:<{width}}  " + "  ".join(f"{cells[method, p]:>8}" for p in precisions))
    print("\nbf16/fp16 train in that dtype throughout (full fine-tuning: weights, grads and AdamW states "
          "8 B/param; fp32: 16 B/param).")
    for method in methods:
        refused = [p for p in precisions if (method, p) in refusals]
        if refused:
            print(f"n/a {method}: {', '.join(refused)} (the method's own checks refuse it; --breakdown says why)")
    if args.breakdown:
        for (method, precision), reason in refusals.items():
            print(f"\n{method} on {precision}: {reason}")
    if args.breakdown:
        for est in estimates:
            print()
            print(est.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
