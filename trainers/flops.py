"""FLOPs of a training step, in closed form from the model's shape (trainers/memory/shapes.py),
the method and the stage; what `perf/train_flops` counts and what `sweep.budget_unit=flops`
spends.

A matmul of an [m, k] by a [k, n] costs 2mkn (multiply and add), the convention of
torch.utils.flop_counter. Only matmuls count (linear layers, attention scores and values, the
output head, a method's branches); norms, activations, softmax and the loss are left out, as
FlopCounterMode leaves them out. A training pass is its forward plus a backward that follows
autograd: a linear layer's input gradient costs one matmul more only where its input requires a
gradient (something below it trains, or the method's tensors feed it), its weight gradient only
where its weight trains. So a frozen layer at the bottom of a LoRA model computes no input
gradient, and a prompt's gradient reaches the input through every layer.

What a method adds comes from its `MethodTerms` (trainers/memory/terms.py: `adapts`,
`scales_input`, `trains_in_layer`, `branch_flops`, `block_flops`, `prompt_flops`) and its virtual
tokens; what a stage adds from its `StageTerms` (`sequences`, `step_flops`: pairs, a reference's
forward, sampled rollouts scored by a reward model). This module asks for neither by name.

Attention is counted as run with a mask: every row of a padded batch attends over the batch's
padded width (as SDPA and eager attention compute it); only a variable-length kernel
(data.packing=padding_free with flash-attention) computes each packed example's own square. A
fused attention kernel that recomputes the scores in backward runs more than counted here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from trainers.memory.shapes import ModelShape
from trainers.memory.terms import Cost, MethodTerms, Rows

if TYPE_CHECKING:
    from trainers.config import ExperimentConfig
    from trainers.memory.terms import StageTerms


def matmul(m: float, k: float, n: float) -> float:
    return 2.0 * m * k * n


@dataclass(frozen=True)
class FlopsModel:
    """One model as a training step runs it: its shape, the method on it, the tokens the method
    adds to every row and to every attention's keys, and its output head."""

    shape: ModelShape
    terms: MethodTerms = MethodTerms()
    virtual: int = 0  # tokens prepended to every row (prompt, p-tuning)
    prefix: int = 0  # key/value positions prepended in every attention (prefix tuning)
    varlen: bool = False  # attention per packed sequence (flash-attention varlen), not per row
    head_trains: bool = False  # the output head trains although the method leaves the base frozen
    logits_all: bool = True  # the head runs on every position (a generate step: the last only)

    def frozen(self) -> "FlopsModel":
        """The same model with no method (a reward model, an adapter switched off)."""
        return FlopsModel(self.shape, varlen=self.varlen)

    def scorer(self) -> "FlopsModel":
        """A model of this shape with a one-score head and no method: a reward model scoring."""
        return FlopsModel(dataclasses.replace(self.shape, vocab=1), varlen=self.varlen)

    def forward(self, rows: Rows) -> float:
        """FLOPs of a no-grad forward of the padded batch `rows`."""
        return self._pass(rows, train=False)

    def train(self, rows: Rows) -> float:
        """FLOPs of the forward and backward of the padded batch `rows`."""
        return self._pass(rows, train=True)

    def _pass(self, rows: Rows, train: bool) -> float:
        if not rows:
            return 0.0
        shape, m = self.shape, self.terms
        width = max(sum(row) for row in rows) + self.virtual
        tokens = len(rows) * width
        # query positions x key positions of every row, over which each head attends
        if self.varlen:
            pairs = sum(s * (s + self.prefix) for row in rows for s in row)
        else:
            pairs = len(rows) * width * (width + self.prefix)
        grad = m.input_grad
        fwd = bwd = 0.0
        for _ in range(shape.layers):
            f, b, grad = self._layer(tokens, pairs, grad, len(rows))
            fwd, bwd = fwd + f, bwd + b
        head_tokens = tokens if self.logits_all else len(rows)
        head = matmul(head_tokens, shape.hidden, shape.vocab)
        fwd += head
        head_input_grad = grad or m.norms_train[2]
        bwd += head * (head_input_grad + (m.weights_train or self.head_trains))
        prompt_fwd, prompt_bwd = m.prompt_flops(shape, len(rows))
        return fwd + prompt_fwd + (bwd + prompt_bwd if train else 0.0)

    def _linear(self, name: str, tokens: int, input_grad: bool) -> tuple[float, float, bool]:
        """(forward, backward, output requires grad) of a per-layer linear layer and the method's
        branch on it."""
        m = self.terms
        fan_in, fan_out, bias = self.shape.linears()[name]
        input_grad = input_grad or m.scales_input(name)
        cost = matmul(tokens, fan_in, fan_out)
        branch_fwd, branch_bwd = m.branch_flops(self.shape, name, tokens, input_grad)
        bwd = cost * (input_grad + m.weights_train) + branch_bwd
        out_grad = input_grad or m.weights_train or (m.biases_train and bias) or m.adapts(name)
        return cost + branch_fwd, bwd, out_grad

    def _layer(self, tokens: int, pairs: int, grad: bool, rows: int) -> tuple[float, float, bool]:
        """(forward, backward, output requires grad) of one decoder layer whose input requires a
        gradient when `grad`."""
        shape, m, lay = self.shape, self.terms, self.shape.layout
        fwd = bwd = 0.0
        x = grad or m.norms_train[0] or (m.biases_train and lay.layer_norm)
        qkv = []
        for name in lay.qkv:
            f, b, g = self._linear(name, tokens, x)
            fwd, bwd, qkv = fwd + f, bwd + b, qkv + [g]
        q, k, v = qkv if len(qkv) == 3 else qkv * 3
        k, v = k or m.attention_grad, v or m.attention_grad  # a trained key/value prefix
        # scores q k^T and their use on v; backward: dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q
        one = matmul(pairs, shape.head_dim, shape.heads)
        fwd += 2 * one
        bwd += one * (v + (q or k) + q + k)
        f, b, g = self._linear(lay.out, tokens, q or k or v)
        block_fwd, block_bwd, block_grad = m.block_flops(shape, tokens, g)
        fwd, bwd = fwd + f + block_fwd, bwd + b + block_bwd
        h = grad or g or block_grad
        x = h or m.norms_train[1] or (m.biases_train and lay.layer_norm)
        mlp_grad = False
        for name in lay.mlp_in:
            f, b, g = self._linear(name, tokens, x)
            fwd, bwd, mlp_grad = fwd + f, bwd + b, mlp_grad or g
        f, b, g = self._linear(lay.mlp_out, tokens, mlp_grad)
        block_fwd, block_bwd, block_grad = m.block_flops(shape, tokens, g)
        return fwd + f + block_fwd, bwd + b + block_bwd, h or g or block_grad

    def generate(self, prompts: Sequence[int], new_tokens: int) -> float:
        """FLOPs of sampling `new_tokens` tokens after left-padded prompts with a key/value cache:
        the prompts' forward, then one position per row at a time, each attending to all before
        it; the head scores only the last position (or, without a cache, as prefix models decode:
        the whole sequence again for every token)."""
        if not prompts or new_tokens < 1:
            return 0.0
        rows, width = len(prompts), max(prompts)
        last = dataclasses.replace(self, logits_all=False)
        if self.prefix:  # PEFT's prefix rides in the cache, so generate() runs without one
            return sum(last.forward([(width + t,)] * rows) for t in range(new_tokens))
        total = last.forward([(width,)] * rows)
        shape = self.shape
        per_token = self.shape.layers * sum(matmul(rows, i, o) for i, o, _ in shape.linears().values())
        per_token += matmul(rows, shape.hidden, shape.vocab) + sum(
            self.terms.branch_flops(shape, name, rows, False)[0] for name in shape.linears()) * shape.layers
        for t in range(1, new_tokens):
            keys = width + self.virtual + t
            total += per_token + shape.layers * 2 * matmul(rows * keys, shape.head_dim, shape.heads)
        return total


def flops_model(cfg: "ExperimentConfig", model_config: Any = None) -> tuple[FlopsModel, "StageTerms"]:
    """The trained model of trial `cfg` as a FlopsModel, and its stage's terms."""
    from trainers.config import VARLEN_ATTENTION
    from trainers.memory.estimate import extra_tokens, method_terms, stage_terms
    from trainers.memory.shapes import load_shape

    shape = ModelShape.of(model_config, cfg.model.name_or_path) if model_config is not None \
        else load_shape(cfg.model.name_or_path)
    terms = method_terms(shape, cfg)
    stage = stage_terms(cfg, terms)
    if stage.scalar_head:
        shape = dataclasses.replace(shape, vocab=1)
    virtual, prefix = extra_tokens(cfg)
    varlen = cfg.data.padding_free and cfg.model.attn_implementation in VARLEN_ATTENTION
    return FlopsModel(shape, terms, virtual, prefix, varlen, head_trains=stage.scalar_head), stage


class StepCounter:
    """cost(micro_batch) -> Cost of one micro-batch of trial `cfg` as its stage runs it; the
    training loop's counter behind `perf/train_flops`."""

    def __init__(self, cfg: "ExperimentConfig", model_config: Any = None):
        self.model, self.stage = flops_model(cfg, model_config)

    def __call__(self, batch: list) -> Cost:
        return self.stage.step_flops(self.model, self.stage.sequences(batch))


def planned_step(cfg: "ExperimentConfig", model_config: Any = None) -> Cost:
    """The cost of one optimizer step of trial `cfg` before any data is read: every micro-batch
    full (train.batch_size rows of data.max_seq_len tokens; padding-free: one row of the token
    budget), times train.grad_accum and train.num_workers. An upper bound of what the trial's
    real batches cost."""
    model, stage = flops_model(cfg, model_config)
    data, train = cfg.data, cfg.train
    if data.padding_free:
        budget = data.token_budget(train.batch_size)
        rows = [tuple([data.max_seq_len] * (budget // data.max_seq_len) + [budget % data.max_seq_len] * (
            budget % data.max_seq_len > 0))] if model.varlen else [(budget,)]
    else:
        rows = [(data.max_seq_len,)] * train.batch_size
    rows = rows * stage.sequences_per_row
    one = stage.step_flops(model, rows)
    micro = train.grad_accum * train.num_workers
    return Cost(one.flops * micro, one.tokens * micro)
