"""The estimate of one trial: components and peaks. The one module of the estimator that reads
the method and stage registries: what a method or a stage adds comes from its registry entry
(`MethodSpec.trainable_sizes`, `.memory_terms`, `.virtual_tokens`; `RecipeSpec.memory_terms`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from trainers.memory.activations import Activations, eval_bytes, prefix_cache_bytes, train_activation_bytes
from trainers.memory.counts import FLOAT_BYTES, GIB, optimizer_state_bytes, weight_bytes
from trainers.memory.shapes import ModelShape, load_shape
from trainers.memory.sizes import format_size
from trainers.memory.terms import MethodTerms, StageTerms

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig
    from trainers.methods.base import MethodSpec


# Bytes a trial needs beyond its tensors: a CUDA context with cuBLAS workspaces, or on CPU the
# Python process with torch, transformers, peft and bitsandbytes imported (~0.45 GiB measured).
RUNTIME_OVERHEAD = {"cuda": 1 * GIB, "cpu": GIB // 2}

WEIGHT_NOTES = {"fp32": "4 B/param", "bf16": "2 B/param", "fp16": "2 B/param",
                "int8": "linear weights 1 B/param + fp32 row scales; rest fp32",
                "nf4": "linear weights 0.5 B/param + block absmax; rest fp32",
                "fp4": "linear weights 0.5 B/param + block absmax; rest fp32"}
OPTIMIZER_NOTES = {"adamw": "AdamW: 2 states per trainable param, in its dtype", "sgd": "SGD momentum: 1 state",
                   "adamw_8bit": "8-bit AdamW: 2 x 1 B + block absmax",
                   "paged_adamw_8bit": "paged 8-bit AdamW: 2 x 1 B + block absmax (pageable)",
                   "paged_adamw_32bit": "paged AdamW: 2 x fp32 (pageable)"}


def _method(cfg: "ExperimentConfig") -> "MethodSpec":
    from trainers.methods import METHODS

    spec = METHODS.get(cfg.method.name)
    if spec is None or spec.trainable_sizes is None:
        raise ValueError(f"method.name={cfg.method.name!r}: no memory model for this method")
    return spec


def trainable_tensor_sizes(model_config: Any, cfg: "ExperimentConfig") -> list[int]:
    """Element counts of the tensors `cfg.method` trains on this model (closed form, no model
    built; its registry entry's `trainable_sizes`). 8-bit optimizers treat small tensors differently.

    model_config: ModelShape, config.json mapping or transformers PretrainedConfig.
    """
    return _method(cfg).trainable_sizes(ModelShape.of(model_config), cfg.method)


def trainable_params(model_config: Any, cfg: "ExperimentConfig") -> int:
    """Number of parameters `cfg.method` trains on this model."""
    return sum(trainable_tensor_sizes(model_config, cfg))


def method_terms(shape: ModelShape, cfg: "ExperimentConfig") -> MethodTerms:
    spec = _method(cfg)
    return spec.memory_terms(shape, cfg.method) if spec.memory_terms is not None else MethodTerms()


def extra_tokens(cfg: "ExperimentConfig") -> tuple[int, int]:
    """(virtual tokens added to every sequence, prefix length added to every key/value)."""
    return _method(cfg).virtual_tokens(cfg.method)


def stage_terms(cfg: "ExperimentConfig", terms: MethodTerms) -> StageTerms:
    """The stage recipe's terms; none without a stage. The recipe is registered: cfg.stage is an
    instance of its config class, which lives in the recipe's module (importing the recipes
    package here would make a cycle: recipes use the estimator)."""
    from trainers.recipes.base import RECIPES

    stage = getattr(cfg, "stage", None)
    if stage is None:
        return StageTerms()
    recipe = RECIPES.get(stage.name)
    if recipe is None:
        raise ValueError(f"stage.name={stage.name!r}: no recipe registered, no memory model for this stage")
    return recipe.memory_terms(cfg, terms)


@dataclass
class Component:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one trial, by component.

    train peak = weights + trainable + optimizer + max(activations + logits/loss, gradients + step,
                 with train.gradient_checkpointing: activations + recompute + gradients - overlap),
    where overlap = min(layer inputs, gradients): backward frees a layer's input as it adds its
    weights' gradients, so the early layers' recompute sees most gradients and few inputs.
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
    recompute: Component = field(default_factory=lambda: Component("recompute", 0.0))
    layer_inputs: float = 0.0  # of activations, the checkpointed layers' inputs
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak_bytes(self) -> int:
        steady = self.weights.bytes + self.trainable.bytes + self.optimizer_states.bytes
        recompute = (self.activations.bytes + self.recompute.bytes + self.gradients.bytes
                     - min(self.layer_inputs, self.gradients.bytes)) if self.recompute.bytes else 0.0
        return int(steady + max(self.activations.bytes + self.logits.bytes, recompute,
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
                self.recompute, self.logits, self.optimizer_step, self.eval_pass, self.overhead]

    def table(self) -> str:
        """The breakdown as aligned text: one line per component, then the peaks and the total."""
        head = (f"{self.model} | {self.method} | {self.precision} | {self.optimizer} | "
                f"batch {self.batch_size} x seq {self.seq_len} | {self.device}")
        rows = [(c.name, c.bytes, c.note) for c in self.components()]
        rows += [("= train peak", self.train_peak_bytes,
                  "weights + trainable + optimizer + max(activations + logits, gradients + step"
                  + (", activations + recompute + gradients - overlap)" if self.recompute.bytes else ")")),
                 ("= eval peak", self.eval_peak_bytes, "weights + trainable + eval pass"),
                 ("= peak (tensors)", self.peak_bytes, "compare with mem/peak_bytes"),
                 ("= total", self.total_bytes, "peak + runtime overhead")]
        width = max(len(r[0]) for r in rows)
        lines = [head, f"  params: {self.params_total:,} total, {self.params_trainable:,} trainable"]
        lines += [f"  {name:<{width}}  {format_size(n):>10}  {note}" for name, n, note in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Training:
    """The trainable side of a trial: counts and the bytes that follow from them."""

    sizes: list[int]
    param_bytes: int  # bytes per trained element (its gradient and AdamW states alike)
    added: float  # bytes of trainable tensors added to the base
    grads: float
    opt: float
    step: float  # optimizer-step temporaries

    @classmethod
    def of(cls, shape: ModelShape, cfg: "ExperimentConfig", terms: MethodTerms, base_bytes: int) -> "Training":
        sizes = _method(cfg).trainable_sizes(shape, cfg.method)
        n = sum(sizes)
        # the base's own tensors (full, BitFit) or a copy of them (LN tuning) train in the base
        # dtype; everything a method adds is fp32
        param_bytes = base_bytes if terms.storage in ("base", "copy") else 4
        added = 0 if terms.storage == "base" else n * param_bytes
        optimizer = cfg.train.optimizer
        # single-tensor AdamW makes two temporaries the size of the largest tensor (sqrt, denominator)
        step = (2 if optimizer == "adamw" else 1) * max(sizes, default=0) * param_bytes
        return cls(sizes, param_bytes, added, n * param_bytes, optimizer_state_bytes(sizes, param_bytes, optimizer),
                   step)


@dataclass
class Batch:
    """Sequences per training micro-batch and the model that scores them, after the stage's changes."""

    rows: int
    seq: int
    head: ModelShape  # the shape whose output head makes the logits
    weights: float
    eval_rows: int


def _stage_batch(shape: ModelShape, cfg: "ExperimentConfig", seq: int, weights: float, terms: MethodTerms,
                 notes: list[str]) -> Batch:
    """The batch after the stage's terms: e.g. the preference stages score chosen and rejected
    together (and a reward model has a scalar head); RL trains on sampled answers and holds a
    reward model (and a reference copy)."""
    train = cfg.train
    stage = stage_terms(cfg, terms)
    eval_rows = min(train.eval_batch_size, cfg.data.max_eval_rows or train.eval_batch_size)
    head = dataclasses.replace(shape, vocab=1) if stage.scalar_head else shape
    if stage.note:
        notes.append(stage.note)
    # data.packing=padding_free: one row of up to the token budget, whatever train.batch_size is
    rows = 1 if cfg.data.padding_free else train.batch_size
    if cfg.data.padding_free:
        notes.append(f"data.packing=padding_free: one row of up to {seq:,} tokens per micro-batch")
    return Batch(rows * stage.sequences_per_row, seq + stage.generated_tokens, head,
                 weights * stage.model_copies, eval_rows * stage.eval_sequences_per_row)


def _shard(shape: ModelShape, cfg: "ExperimentConfig", batch: Batch, training: Training, base_bytes: int,
           notes: list[str]) -> None:
    """FSDP2 shards weights, gradients and optimizer state; a decoder layer is gathered while it
    computes, the root unit (embeddings, head, norm) stays whole."""
    n = cfg.train.num_workers
    if not (cfg.train.fsdp and n > 1):
        return
    layer_bytes = (shape.total_params() - shape.embedding_params()) / shape.layers * base_bytes
    batch.weights = batch.weights / n + 2 * layer_bytes + shape.embedding_params() * base_bytes
    training.grads, training.opt = training.grads / n + layer_bytes, training.opt / n
    notes.append(f"FSDP over {n} workers: weights, gradients and optimizer states sharded (not measured)")


def _logits(shape: ModelShape, extra: tuple[int, int], batch: Batch, act: int, int8_contexts: float) -> Component:
    """The training step keeps only the loss of the model's output. Backward starts with three
    fp32 tensors of tokens x vocab: log-softmax, its gradient and the gradient it passes on. The
    forward's end holds the logits, their fp32 copy and log-softmax, the output's key/value cache
    (prefix tuning), and the previous step's loss, whose finished graph still holds what
    bitsandbytes' int8 matmul stored on its autograd context: every int8 layer's input."""
    virtual, prefix = extra
    tokens, vocab = batch.rows * (batch.seq + virtual), batch.head.vocab
    softcap = tokens * vocab * act if batch.head.logit_softcap else 0  # its tanh, kept for backward
    backward_start = tokens * vocab * 12 + softcap
    forward_end = tokens * vocab * (act + 4 + (4 if act != 4 else 0)) + softcap
    forward_end += prefix_cache_bytes(shape, prefix, act, batch.rows, batch.seq) + int8_contexts
    note = (f"{tokens:,} tokens x {vocab:,} vocab: " + ("3 fp32 loss tensors at backward start"
                                                        if backward_start >= forward_end
                                                        else "logits + loss (+ caches) at forward end"))
    return Component("logits + loss", max(backward_start, forward_end), note)


def _activations_note(saved: Activations, shape: ModelShape, tokens: int) -> str:
    if saved.recompute:
        return f"checkpointed: each of {shape.layers} layers keeps its input; {tokens:,} tokens"
    return f"saved for backward; {format_size(saved.per_layer)} per layer x {shape.layers}, {tokens:,} tokens"


def estimate(cfg: "ExperimentConfig", model_config: Any = None, *, seq_len: Optional[int] = None,
             eval_seq_len: Optional[int] = None, device: Optional[str] = None) -> MemoryEstimate:
    """Predicted peak memory of the trial `cfg` describes.

    model_config: a ModelShape / config mapping / PretrainedConfig; default: read the config of
    cfg.model.name_or_path (known name, config.json, model directory, cached hub id, embedded:base).
    seq_len: tokens per training row (default data.max_seq_len: the worst case; batches are padded
    to their longest row, so a typical length gives the typical peak; with data.packing=padding_free
    the one row of a micro-batch, default the token budget). eval_seq_len: the same for
    evaluation batches (default seq_len). device: "cuda" or "cpu" for the runtime overhead
    (default from train.use_gpu).
    """
    shape = ModelShape.of(model_config, cfg.model.name_or_path) if model_config is not None \
        else load_shape(cfg.model.name_or_path)
    precision, train = cfg.precision, cfg.train
    device = device or ("cuda" if train.use_gpu else "cpu")
    notes: list[str] = []
    # Unquantized tensors on a quantized base are upcast to fp32 (and with them the hidden states).
    act = 4 if precision.quantized else FLOAT_BYTES[precision.name]
    terms, extra = method_terms(shape, cfg), extra_tokens(cfg)
    training = Training.of(shape, cfg, terms, act)
    # padding-free: one row of the token budget (the worst case) instead of rows of max_seq_len
    longest = cfg.data.token_budget(train.batch_size) if cfg.data.padding_free else cfg.data.max_seq_len
    batch = _stage_batch(shape, cfg, seq_len or longest,
                         weight_bytes(shape, precision.name, precision.double_quant), terms, notes)
    _shard(shape, cfg, batch, training, act, notes)
    saved = train_activation_bytes(shape, terms, extra, precision.name == "int8", act, batch.rows, batch.seq,
                                   train.gradient_checkpointing)
    acts = saved.saved
    if train.grad_accum > 1:  # earlier micro-batches' gradients stay through the next backward
        acts += training.grads
    if train.num_workers > 1 and not train.fsdp:  # DDP's gradient buckets
        acts += training.grads
    # evaluation batches are examples, padded, whatever the training batches are
    eval_seq = eval_seq_len or (None if cfg.data.padding_free else seq_len) or cfg.data.max_seq_len
    evaluation = (eval_bytes(batch.head, terms, extra, cfg.data.max_new_tokens, act, batch.eval_rows, eval_seq)
                  if cfg.data.eval_file else 0.0)
    n_trainable, dtype_name = sum(training.sizes), {4: "fp32", 2: "bf16/fp16"}[training.param_bytes]
    tokens = batch.rows * (batch.seq + extra[0])
    return MemoryEstimate(
        model=shape.name, method=cfg.method.name,
        precision=precision.name + (" +dq" if precision.double_quant else ""),
        optimizer=train.optimizer, batch_size=train.batch_size, seq_len=batch.seq, device=device,
        params_total=shape.total_params(), params_trainable=n_trainable,
        weights=Component("weights", batch.weights, WEIGHT_NOTES[precision.name]
                          + (" (double quant)" if precision.double_quant else "")),
        trainable=Component("trainable (added)", training.added, f"{n_trainable:,} params, {dtype_name}"
                            if training.added else "the base's own tensors train"),
        gradients=Component("gradients", training.grads, f"{dtype_name}, one per trainable param"),
        optimizer_states=Component("optimizer states", training.opt, OPTIMIZER_NOTES[train.optimizer]),
        activations=Component("activations", acts, _activations_note(saved, shape, tokens)),
        recompute=Component("recompute", saved.recompute, "one checkpointed layer's forward again + its backward"
                            if saved.recompute else "train.gradient_checkpointing=false"),
        layer_inputs=saved.layer_inputs,
        logits=_logits(shape, extra, batch, act, saved.int8_contexts),
        optimizer_step=Component("optimizer step", training.step, "temporaries of the update (peak alternative)"),
        eval_pass=Component("eval pass", evaluation, f"batch {batch.eval_rows} x seq {eval_seq}, no grad"
                            if evaluation else "no eval file"),
        overhead=Component("runtime overhead", RUNTIME_OVERHEAD[device],
                           "CUDA context" if device == "cuda" else "Python + torch process"),
        notes=notes,
    )
