"""Bytes of activations: saved for backward in a training step, and the peak of the no-grad
evaluation pass."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainers.memory.counts import ia3_targets, ln_tuning_norms, lora_targets
from trainers.memory.shapes import ModelShape

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig


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
    targets = getattr(cfg.method, "target_modules", None)
    if targets is not None:
        return "input_layernorm" in targets, "post_attention_layernorm" in targets, "norm" in targets
    per_layer, final = ln_tuning_norms(shape, cfg.method)
    return per_layer >= 2, per_layer >= 1, final


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
