"""Bytes of activations: saved for backward in a training step, and the peak of the no-grad
evaluation pass.

What a method changes here comes from the `MethodTerms` its registry entry returns
(trainers/memory/terms.py), so this module never asks for a method by name. What an architecture
changes comes from its `Layout` (trainers/memory/shapes.py): the roles of its linear layers, gated
or plain MLP, LayerNorm or RMSNorm, extra norms.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.memory.shapes import ModelShape
from trainers.memory.terms import MethodTerms


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
        (its input or a trained bias); or the method's branch on it keeps it. Layers reading one
        tensor (q/k/v) share it."""
        m = self.terms
        bias_trains = m.biases_train and self.shape.linears()[target][2]
        return m.weights_train or (self.int8 and (input_grad or bias_trains)) or m.keeps_input(self, target)

    def branch(self, target: str) -> float:
        return self.terms.branch_bytes(self, target)

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
    attention_grad = (qkv_input_grad or m.attention_grad or any(m.adapts(t) for t in qkv)
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
    b += m.block_bytes(step)
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
    b += step.branch(lay.mlp_out)
    b += m.block_bytes(step)
    return b, T * (h + I) * act if step.int8 else 0.0


@dataclass(frozen=True)
class Activations:
    """What one micro-batch's activations hold, in bytes."""

    saved: float  # saved for backward through the forward, all layers (checkpointed: their inputs)
    per_layer: float  # saved by one layer (not the first)
    int8_contexts: float  # layer inputs bitsandbytes' int8 matmul holds on its autograd contexts
    # checkpointed: one layer recomputed in backward, what it saves plus the gradients of its widest
    # tensors while its backward runs; and how much of `saved` is the layers' inputs
    recompute: float = 0.0
    layer_inputs: float = 0.0


def train_activation_bytes(shape: ModelShape, terms: MethodTerms, extra_tokens: tuple[int, int], int8: bool,
                           act: int, batch: int, seq: int, checkpointed: bool = False) -> Activations:
    """For one micro-batch: the bytes its activations hold.
    extra_tokens: (virtual tokens added to every sequence, prefix length added to every key/value).
    checkpointed (train.gradient_checkpointing): a layer keeps only its input hidden state through
    the forward; backward recomputes one layer at a time, whose saved tensors live until its
    gradient is through.

    Follows autograd: an op keeps an input only when the gradient of another input needs it, so
    frozen weights keep less than trained ones (a frozen linear layer keeps nothing). Batches are
    assumed padded (rows of different lengths), so attention gets a mask and grouped keys/values
    are repeated to every head.
    """
    virtual, prefix = extra_tokens
    step = Step(shape, terms, act, int8, batch, seq + virtual, seq + virtual + prefix)

    def layer(first: bool) -> tuple[float, float]:
        # Gradient reaches the first layer's input only when the embeddings or a prompt train.
        attention, attention_ctx = _attention_bytes(step, not first or terms.input_grad)
        mlp, mlp_ctx = _mlp_bytes(step)
        return attention + mlp, attention_ctx + mlp_ctx

    (per_layer, ctx_per_layer), (first_layer, ctx_first) = layer(first=False), layer(first=True)
    outside = step.batch * step.S * step.kv_len  # the boolean padding mask, built once
    # final norm, and the head's input if the head trains
    outside += step.norm(True, terms.norms_train[2])
    outside += step.T * shape.hidden * act if terms.weights_train else 0.0
    outside += terms.per_step_bytes
    if checkpointed:
        inputs = shape.layers * step.T * shape.hidden * act
        # the layer's backward: gradients of its MLP's intermediate and of its hidden state
        recompute = max(per_layer, first_layer) + step.T * (shape.intermediate + shape.hidden) * act
        return Activations(outside + inputs, per_layer, max(ctx_per_layer, ctx_first), recompute, inputs)
    total = first_layer + (shape.layers - 1) * per_layer
    return Activations(outside + total, per_layer, ctx_first + (shape.layers - 1) * ctx_per_layer)


def prefix_cache_bytes(shape: ModelShape, prefix: int, act: int, batch: int, seq: int) -> float:
    """Prefix tuning passes its prefix as a key/value cache: while the forward runs, every layer's
    concatenated keys and values live in it."""
    if not prefix:
        return 0.0
    return batch * shape.layers * 2 * shape.kv_dim * (seq + prefix) * act


def eval_bytes(shape: ModelShape, terms: MethodTerms, extra_tokens: tuple[int, int], new_tokens: int, act: int,
               batch: int, seq: int) -> float:
    """Peak of the no-grad evaluation on top of the weights: eval loss and greedy generation of
    `new_tokens` tokens."""
    virtual, prefix = extra_tokens
    T = batch * (seq + virtual)
    shifted = batch * (seq - 1)  # eval_loss drops virtual positions and shifts by one
    h, I, V = shape.hidden, shape.intermediate, shape.vocab
    # The widest moment of a layer's forward is in the MLP: silu(gate), up and their product, or
    # what the method's branches add there.
    mlp = terms.eval_mlp_bytes(shape, T, act, T * I * 3 * act)
    hidden_states = 4 * T * h * act  # embeddings, layer input, residual, normed input
    cache = prefix_cache_bytes(shape, prefix, act, batch, seq)
    # eval_loss keeps the previous batch's logits and fp32 shifted copy through the next forward;
    # the new shifted copy is made (reshape, then fp32) while the previous one still exists.
    forward_side = T * V * act + shifted * V * 4 + hidden_states + mlp + cache
    loss_side = T * V * act + shifted * V * max(act + 4 + (4 if act != 4 else 0), 8)
    # generate(): the KV cache for prompt + new tokens, then the prompt's forward
    kv_cache = batch * shape.layers * 2 * shape.kv_dim * (seq + virtual + prefix + new_tokens) * act
    generate = kv_cache + hidden_states + mlp + batch * V * (act + 4)
    return max(loss_side, forward_side, generate)
