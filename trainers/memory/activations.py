"""Bytes of activations: saved for backward in a training step, and the peak of the no-grad
evaluation pass.

What a method changes here comes from its registry entry (`MethodSpec.memory_terms` ->
`MethodTerms`), so this module never asks for a method by name. What an architecture changes
comes from its `Layout` (trainers/memory/shapes.py): the roles of its linear layers, gated or
plain MLP, LayerNorm or RMSNorm, extra norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainers.memory.shapes import ModelShape

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig


@dataclass(frozen=True)
class MethodTerms:
    """What a method does to a training step's memory. The default: a method that adds nothing the
    estimator must model beyond its trainable tensors."""

    weights_train: bool = False  # every base weight trains (full): each linear keeps its input
    # whose weights train: (each layer's input norm, its other norms, the final norm)
    norms_train: tuple[bool, bool, bool] = (False, False, False)
    input_grad: bool = False  # gradient reaches the embeddings' output (trained embeddings or a prompt)
    attention_grad: bool = False  # gradient reaches every attention (a trained key/value prefix)
    biases_train: bool = False
    lora: tuple[str, ...] = ()  # LoRA-targeted linear names per layer
    rank: int = 0
    dropout: float = 0.0
    dora: bool = False
    ia3: tuple[str, ...] = ()  # (IA)3 targets; those in ia3_ff scale their input
    ia3_ff: tuple[str, ...] = ()
    bottleneck: int = 0  # adapter width after each attention and MLP block
    # "base": the base's own tensors train (no extra copy); "copy": a trained copy in the base
    # dtype (PEFT's LN tuning); "fp32": added fp32 tensors (PEFT adapters, bottlenecks, prompts)
    storage: str = "fp32"
    per_step_bytes: float = 0.0  # e.g. p-tuning's prompt encoder, run once per step


def method_terms(shape: ModelShape, cfg: "ExperimentConfig") -> MethodTerms:
    from trainers.methods import METHODS

    spec = METHODS.get(cfg.method.name)
    if spec is None or spec.memory_terms is None:
        return MethodTerms()
    return spec.memory_terms(shape, cfg.method)


def extra_tokens(cfg: "ExperimentConfig") -> tuple[int, int]:
    """(virtual tokens added to every sequence, prefix length added to every key/value)."""
    from trainers.methods import METHODS

    spec = METHODS.get(cfg.method.name)
    return spec.virtual_tokens(cfg.method) if spec is not None else (0, 0)


@dataclass(frozen=True)
class Step:
    """One micro-batch through one model: the sizes every term multiplies."""

    shape: ModelShape
    terms: MethodTerms
    act: int  # bytes of a hidden-state element
    int8: bool
    batch: int
    S: int  # tokens per row, virtual ones included
    kv_len: int  # keys per query (prefix included)

    @property
    def T(self) -> int:
        return self.batch * self.S

    def keeps_input(self, target: str, input_grad: bool) -> bool:
        """Its weight trains; bitsandbytes' int8 matmul keeps it whenever a gradient flows through
        (its input or a trained bias); a same-dtype LoRA branch without dropout reads the same
        tensor; (IA)3 scales it. Layers reading one tensor (q/k/v) share it."""
        m = self.terms
        bias_trains = m.biases_train and self.shape.linears()[target][2]
        return (m.weights_train or (self.int8 and (input_grad or bias_trains))
                or (target in m.lora and self.act == 4 and m.dropout == 0) or (target in m.ia3_ff and self.act == 4))

    def branch(self, target: str) -> float:
        """What a targeted layer's adapter keeps: LoRA's fp32 copy of a 2-byte input (or its
        dropout output and fp32 mask), its rank-r intermediate, DoRA's base output and fp32 LoRA
        output; (IA)3's fp32 cast of a scaled 2-byte input, or the unscaled output it scales."""
        m, T = self.terms, self.T
        fan_in, fan_out, _ = self.shape.linears()[target]
        if target in m.lora:
            copy = T * fan_in * 8 if m.dropout > 0 else (T * fan_in * 4 if self.act != 4 else 0.0)
            return copy + T * m.rank * 4 + (T * fan_out * (self.act + 4) if m.dora else 0.0)
        if target in m.ia3_ff:
            return T * fan_in * 4 if self.act != 4 else 0.0
        return T * fan_out * self.act if target in m.ia3 else 0.0

    def norm(self, input_grad: bool, trains: bool) -> float:
        """A norm keeps its input (RMSNorm: an fp32 view; LayerNorm: the input and its statistics)
        when a gradient passes, and its normalised output when its weight trains."""
        T, h = self.T, self.shape.hidden
        if self.shape.layout.layer_norm:  # its weight's gradient comes from the input and statistics
            return T * h * self.act + T * 8 if input_grad or trains else 0.0
        return (T * h * 4 if input_grad else 0.0) + (T * h * self.act if trains else 0.0)


def _attention_bytes(step: Step, input_grad: bool) -> tuple[float, float]:
    """(saved bytes, int8 context bytes) of the input norm and the attention block."""
    shape, m, T, act = step.shape, step.terms, step.T, step.act
    qkv, out = shape.layout.qkv, shape.layout.out
    qkv_input_grad = input_grad or m.norms_train[0]
    attention_grad = (qkv_input_grad or m.attention_grad or any(t in m.lora or t in m.ia3 for t in qkv)
                      or (m.biases_train and shape.qkv_bias))
    b = step.norm(input_grad, m.norms_train[0])
    ctx = 0.0
    if any(step.keeps_input(t, qkv_input_grad) for t in qkv):
        b += T * shape.hidden * act
        ctx += T * shape.hidden * act if step.int8 else 0.0
    b += sum(step.branch(t) for t in qkv)
    if attention_grad:
        # SDPA keeps q (rotated), k and v (repeated to every head when grouped), its output
        # (also the output projection's input), logsumexp, and the padding mask expanded here.
        b += 2 * T * shape.q_dim * act
        b += 2 * step.batch * shape.heads * step.kv_len * shape.head_dim * act
        b += step.batch * shape.heads * step.S * 4 + step.batch * step.S * step.kv_len * act
        if shape.layout.head_norms:  # Qwen3's RMSNorm of each head's q and k: their fp32 inputs
            b += T * (shape.q_dim + shape.kv_dim) * (4 + (act if m.weights_train else 0))
        if shape.layout.rotary_on_fused_qkv:
            b += T * (shape.q_dim + shape.kv_dim) * act
        b += shape.layout.eager_score_tensors * step.batch * shape.heads * step.S * step.kv_len * act
        ctx += T * shape.q_dim * act if step.int8 else 0.0
    b += step.branch(out)
    if m.bottleneck:  # bottleneck after attention: its fp32 input and activation
        b += T * shape.hidden * 4 + T * m.bottleneck * 4
    return b, ctx


def _mlp_bytes(step: Step) -> tuple[float, float]:
    """(saved bytes, int8 context bytes) of the MLP block and the norms around it."""
    shape, m, T, act = step.shape, step.terms, step.T, step.act
    h, I, lay = shape.hidden, shape.intermediate, shape.layout
    b = step.norm(True, m.norms_train[1]) * (lay.norms_per_layer - 1)  # Gemma 2 also norms each block's output
    if any(step.keeps_input(t, True) for t in lay.mlp_in):
        b += T * h * act
    # gated: the activation keeps gate's output, the product the activation's and up's outputs;
    # plain: the activation keeps its input (ReLU its output), the output projection its input.
    b += 3 * T * I * act if lay.gated else T * I * act * (1 + lay.activation_saves)
    b += sum(step.branch(t) for t in lay.mlp_in)
    b += T * I * act if step.keeps_input(lay.mlp_out, True) and not lay.activation_keeps_output else 0.0
    if step.int8 and lay.mlp_out in m.ia3_ff:  # int8 keeps the scaled product, (IA)3 the unscaled
        b += T * I * act
    b += step.branch(lay.mlp_out)
    if m.bottleneck:
        b += T * h * 4 + T * m.bottleneck * 4
    return b, T * (h + I) * act if step.int8 else 0.0


def train_activation_bytes(shape: ModelShape, cfg: "ExperimentConfig", act: int, batch: int,
                           seq: int) -> tuple[float, float, float]:
    """For one micro-batch: (bytes saved for backward over all layers, those of one layer, bytes
    of layer inputs that bitsandbytes' int8 matmul holds on its autograd contexts).

    Follows autograd: an op keeps an input only when the gradient of another input needs it, so
    frozen weights keep less than trained ones (a frozen linear layer keeps nothing). Batches are
    assumed padded (rows of different lengths), so attention gets a mask and grouped keys/values
    are repeated to every head.
    """
    virtual, prefix = extra_tokens(cfg)
    terms = method_terms(shape, cfg)
    step = Step(shape, terms, act, cfg.precision.name == "int8", batch, seq + virtual, seq + virtual + prefix)

    def layer(first: bool) -> tuple[float, float]:
        # Gradient reaches the first layer's input only when the embeddings or a prompt train.
        attention, attention_ctx = _attention_bytes(step, not first or terms.input_grad)
        mlp, mlp_ctx = _mlp_bytes(step)
        return attention + mlp, attention_ctx + mlp_ctx

    (per_layer, ctx_per_layer), (first_layer, ctx_first) = layer(first=False), layer(first=True)
    total = first_layer + (shape.layers - 1) * per_layer
    total += step.batch * step.S * step.kv_len  # the boolean padding mask, built once
    # final norm, and the head's input if the head trains
    total += step.norm(True, terms.norms_train[2])
    total += step.T * shape.hidden * act if terms.weights_train else 0.0
    return total + terms.per_step_bytes, per_layer, ctx_first + (shape.layers - 1) * ctx_per_layer


def prefix_cache_bytes(shape: ModelShape, cfg: "ExperimentConfig", act: int, batch: int, seq: int) -> float:
    """Prefix tuning passes its prefix as a key/value cache: while the forward runs, every layer's
    concatenated keys and values live in it."""
    _, prefix = extra_tokens(cfg)
    if not prefix:
        return 0.0
    return batch * shape.layers * 2 * shape.kv_dim * (seq + prefix) * act


def eval_bytes(shape: ModelShape, cfg: "ExperimentConfig", act: int, batch: int, seq: int) -> float:
    """Peak of the no-grad evaluation on top of the weights: eval loss and greedy generation."""
    virtual, prefix = extra_tokens(cfg)
    terms = method_terms(shape, cfg)
    T = batch * (seq + virtual)
    shifted = batch * (seq - 1)  # eval_loss drops virtual positions and shifts by one
    h, I, V = shape.hidden, shape.intermediate, shape.vocab
    up = shape.layout.mlp_in[-1]
    # The widest moment of a layer's forward is in the MLP: silu(gate), up and their product; a
    # LoRA branch on up adds its fp32 output and scaled output (and an fp32 copy of a 2-byte
    # input); (IA)3 on the output projection multiplies an fp32 copy of the product and casts it back.
    lora_up = up in terms.lora
    mlp = T * I * (2 * act + 8 if lora_up else 3 * act)
    if lora_up and terms.dora:  # + base output, its rescaling, lora's
        mlp = T * I * (3 * act + 16)
    if lora_up and act != 4:
        mlp += T * h * 4
    if shape.layout.mlp_out in terms.ia3_ff:
        mlp = max(mlp, T * I * (2 * act + 8 if act != 4 else 2 * act))
    hidden_states = 4 * T * h * act  # embeddings, layer input, residual, normed input
    cache = prefix_cache_bytes(shape, cfg, act, batch, seq)
    # eval_loss keeps the previous batch's logits and fp32 shifted copy through the next forward;
    # the new shifted copy is made (reshape, then fp32) while the previous one still exists.
    forward_side = T * V * act + shifted * V * 4 + hidden_states + mlp + cache
    loss_side = T * V * act + shifted * V * max(act + 4 + (4 if act != 4 else 0), 8)
    # generate(): the KV cache for prompt + new tokens, then the prompt's forward
    new = cfg.data.max_new_tokens
    kv_cache = batch * shape.layers * 2 * shape.kv_dim * (seq + virtual + prefix + new) * act
    generate = kv_cache + hidden_states + mlp + batch * V * (act + 4)
    return max(loss_side, forward_side, generate)

