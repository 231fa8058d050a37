"""The model as far as memory cares: its shape from config.json alone (a known name, a model
directory, a cached hub id or embedded:base); nothing is built or downloaded."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Portable target names (trainers/methods/structure.py).
ALL_LINEAR, ATTENTION = "all-linear", "attention"


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


@dataclass(frozen=True)
class Layout:
    """What differs between the decoder families here, as config.json does not say it: the linear
    layers of one layer and their roles, the norms, learned positions, the MLP's form."""

    qkv: tuple[str, ...]  # projections reading the attention input (one fused, or q, k, v)
    out: str  # attention output projection
    mlp_in: tuple[str, ...]  # gate + up (gated), or the one input projection
    mlp_out: str
    gated: bool = True
    # Tensors of MLP width a plain MLP's activation keeps beyond its input: GPT-2's gelu_new is
    # written as torch ops (tanh, its sum with 1, half the input); exact GELU and ReLU keep none.
    activation_saves: int = 0
    activation_keeps_output: bool = False  # ReLU: what it keeps is the output projection's input
    # Rotary on a fused q/k/v output: v stays a view of it, so the whole output lives beside the
    # rotated q and k (GPT-NeoX, Phi-3)
    rotary_on_fused_qkv: bool = False
    # Gemma 2 runs eager attention (for its score softcapping): it keeps the softcapped scores'
    # tanh and the softmax, tokens x keys per head each, instead of SDPA's logsumexp
    eager_score_tensors: int = 0
    layer_norm: bool = False  # LayerNorm with bias (GPT-2, GPT-NeoX, OPT) instead of RMSNorm
    norms_per_layer: int = 2  # Gemma 2 also normalises each sublayer's output
    head_norms: bool = False  # Qwen3: RMSNorm over each head's q and k
    tied_default: bool = False  # tie_word_embeddings when config.json leaves it out
    final_norm: str = "norm"  # the norm after the last layer (every other norm is one per layer)


LLAMA = Layout(("q_proj", "k_proj", "v_proj"), "o_proj", ("gate_proj", "up_proj"), "down_proj")
LAYOUTS = {
    "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA,
    "qwen3": dataclasses.replace(LLAMA, head_norms=True),
    "gemma2": dataclasses.replace(LLAMA, norms_per_layer=4, tied_default=True, eager_score_tensors=2),
    "phi3": Layout(("qkv_proj",), "o_proj", ("gate_up_proj",), "down_proj", rotary_on_fused_qkv=True),
    "gpt2": Layout(("c_attn",), "attn.c_proj", ("c_fc",), "mlp.c_proj", gated=False, activation_saves=3,
                   layer_norm=True, tied_default=True, final_norm="ln_f"),
    "gpt_neox": Layout(("query_key_value",), "dense", ("dense_h_to_4h",), "dense_4h_to_h", gated=False,
                       layer_norm=True, rotary_on_fused_qkv=True, final_norm="final_layer_norm"),
    "opt": Layout(("q_proj", "k_proj", "v_proj"), "out_proj", ("fc1",), "fc2", gated=False, layer_norm=True,
                  activation_keeps_output=True, tied_default=True, final_norm="final_layer_norm"),
}
# config.json keys of the architectures that do not use Llama's names.
RENAMED_KEYS = {"gpt2": {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
                         "intermediate_size": "n_inner"},
                "opt": {"intermediate_size": "ffn_dim"}}


def _config_value(config: dict, model_type: str, key: str) -> Any:
    value = config.get(RENAMED_KEYS.get(model_type, {}).get(key, key))
    if key == "intermediate_size" and value is None and model_type == "gpt2":
        return 4 * config.get("n_embd", 768)  # GPT-2's n_inner=null means 4 x hidden
    return value


@dataclass(frozen=True)
class ModelShape:
    """A decoder: embeddings (+ learned positions), `layers` x (attention + MLP + norms), norm, head.

    Known layouts (LAYOUTS) say which linear layers a layer has; a config of another model_type
    with Llama's keys is read as Llama-style (the structural fallback: separate q/k/v, gated MLP)."""

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
    positions: int = 0  # rows of a learned position embedding (GPT-2, OPT)
    layout: Layout = LLAMA
    logit_softcap: bool = False  # Gemma 2's tanh on the logits keeps one more tokens x vocab tensor

    @classmethod
    def of(cls, config: Any, name: str = "") -> "ModelShape":
        """From a ModelShape, a config.json mapping or a transformers PretrainedConfig."""
        if isinstance(config, ModelShape):
            return config
        if not isinstance(config, dict):
            config = config.to_dict()
        model_type = config.get("model_type", "llama")
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        values = {key: _config_value(config, model_type, key) for key in keys}
        missing = [RENAMED_KEYS.get(model_type, {}).get(k, k) for k, v in values.items() if v is None]
        if missing:
            raise UnknownModelError(f"{name or 'config'}: model_type {model_type} is not a decoder this estimator "
                                    f"knows (no {', '.join(missing)} in its config)")
        layout = LAYOUTS.get(model_type, LLAMA)
        hidden, heads = values["hidden_size"], values["num_attention_heads"]
        bias = _biases(config, model_type)
        return cls(
            name=name or config.get("_name_or_path", "") or model_type, model_type=model_type, hidden=hidden,
            layers=values["num_hidden_layers"], heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            intermediate=values["intermediate_size"], vocab=values["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", layout.tied_default)),
            qkv_bias=bias[0], o_bias=bias[1], mlp_bias=bias[2],
            positions={"gpt2": config.get("n_positions", 0),
                       "opt": config.get("max_position_embeddings", 0) + 2}.get(model_type, 0),  # OPT offsets by 2
            layout=layout, logit_softcap=config.get("final_logit_softcapping") is not None)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per decoder layer: name -> (in_features, out_features, has_bias), in module order."""
        h, i, lay = self.hidden, self.intermediate, self.layout
        qkv = {lay.qkv[0]: (h, self.q_dim + 2 * self.kv_dim, self.qkv_bias)} if len(lay.qkv) == 1 else {
            lay.qkv[0]: (h, self.q_dim, self.qkv_bias), lay.qkv[1]: (h, self.kv_dim, self.qkv_bias),
            lay.qkv[2]: (h, self.kv_dim, self.qkv_bias)}
        mlp_in = {name: (h, i * (2 if lay.gated and len(lay.mlp_in) == 1 else 1), self.mlp_bias)
                  for name in lay.mlp_in}
        return {**qkv, lay.out: (self.q_dim, h, self.o_bias), **mlp_in, lay.mlp_out: (i, h, self.mlp_bias)}

    def attention_linears(self) -> list[str]:
        return list(self.layout.qkv) + [self.layout.out]

    def bias_params(self) -> int:
        """Biases of the linear layers and of LayerNorms (BitFit trains exactly these)."""
        norm_biases = self.norm_params() if self.layout.layer_norm else 0
        return self.layers * sum(out for _, out, bias in self.linears().values() if bias) + norm_biases // 2

    def norm_params(self) -> int:
        per_layer = self.layout.norms_per_layer * self.hidden + (2 * self.head_dim if self.layout.head_norms else 0)
        return (self.layers * per_layer + self.hidden) * (2 if self.layout.layer_norm else 1)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.positions * self.hidden

    def linear_weight_params(self) -> int:
        return self.layers * sum(i * o for i, o, _ in self.linears().values())

    def total_params(self) -> int:
        linear_biases = self.layers * sum(out for _, out, bias in self.linears().values() if bias)
        return self.embedding_params() + self.linear_weight_params() + linear_biases + self.norm_params()


def _biases(config: dict, model_type: str) -> tuple[bool, bool, bool]:
    """(q/k/v, attention output, MLP) linear layers have biases."""
    if model_type == "gpt2":
        return True, True, True
    if model_type == "opt":
        return (bool(config.get("enable_bias", True)),) * 3
    if model_type == "gpt_neox":
        attention = bool(config.get("attention_bias", True))
        return attention, attention, True
    attention = bool(config.get("attention_bias", False))
    return attention or model_type == "qwen2", attention, bool(config.get("mlp_bias", False))  # Qwen2: q/k/v biases, no flag


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
