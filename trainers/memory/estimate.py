"""The estimate of one trial: components and peaks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from trainers.memory.activations import _eval_bytes, _extra_tokens, _prefix_cache_bytes, _train_activation_bytes
from trainers.memory.counts import FLOAT_BYTES, GIB, optimizer_state_bytes, trainable_params, trainable_tensor_sizes, weight_bytes
from trainers.memory.shapes import ModelShape, load_shape

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig


# Bytes a trial needs beyond its tensors: a CUDA context with cuBLAS workspaces, or on CPU the
# Python process with torch, transformers, peft and bitsandbytes imported (~0.45 GiB measured).
RUNTIME_OVERHEAD = {"cuda": 1 * GIB, "cpu": GIB // 2}


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
