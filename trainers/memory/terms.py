"""What a method and a stage contribute to the memory estimate, in the estimator's vocabulary.

A method's registry entry (`MethodSpec.memory_terms(shape, method_cfg)`) returns a `MethodTerms`,
or a subclass of it that the method's own file defines: the generic fields say which of the
base's tensors train and where a gradient flows; the hooks say what the method's own modules keep
on a targeted linear layer (`keeps_input`, `branch_bytes`), after each block (`block_bytes`) and
in the widest moment of an evaluation forward (`eval_mlp_bytes`). A stage's registry entry
(`RecipeSpec.memory_terms(cfg, method_terms)`) returns a `StageTerms`: how many sequences a
training row becomes, the models held beside the policy, the output head.

This module imports no registry (the method and recipe files import it), so the estimator never
asks for a method or a stage by name. The terms describe the step itself (targeted layers, rank,
sequences per row, generated tokens, models held), so the other cost of a step, its FLOPs
(trainers/flops.py), comes from further hooks on the same objects: a method's branches
(`branch_flops`, `block_flops`, `prompt_flops`) and where its tensors let a gradient in
(`adapts`, `scales_input`); a stage's sequences per micro-batch (`sequences`) and the passes it
runs on them (`step_flops`: the trained forward and backward, a reference's forward, sampling
and scoring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from trainers.flops import FlopsModel
    from trainers.memory.activations import Step
    from trainers.memory.shapes import ModelShape


# A micro-batch as the model runs it: one tuple per row, the lengths of the sequences packed in
# it (one, unless packed); rows are padded to the longest.
Rows = Sequence[tuple[int, ...]]


@dataclass(frozen=True)
class Cost:
    """What a step (or a part of one) costs: FLOPs, and the data positions its trained forward
    runs (rows x padded width; a padding-free row: its tokens; virtual tokens not included)."""

    flops: float = 0.0
    tokens: int = 0

    def __add__(self, other: "Cost") -> Cost:
        return Cost(self.flops + other.flops, self.tokens + other.tokens)


def rows_of(batch) -> list[tuple[int, ...]]:
    """The rows of a micro-batch of token rows (Examples or PackedRows): each row's sequence
    lengths, from where its positions restart."""
    rows = []
    for item in batch:
        positions = getattr(item, "position_ids", None)
        if not positions:
            rows.append((len(item.input_ids),))
            continue
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        rows.append(tuple(b - a for a, b in zip(starts, starts[1:]) if b > a))
    return rows


@dataclass(frozen=True)
class MethodTerms:
    """What a method does to a training step's memory. This class as it is: a method that adds
    nothing the estimator must model beyond its trainable tensors."""

    weights_train: bool = False  # every base weight trains (full): each linear keeps its input
    # whose weights train: (each layer's input norm, its other norms, the final norm)
    norms_train: tuple[bool, bool, bool] = (False, False, False)
    input_grad: bool = False  # gradient reaches the embeddings' output (trained embeddings or a prompt)
    attention_grad: bool = False  # gradient reaches every attention (a trained key/value prefix)
    biases_train: bool = False
    # "base": the base's own tensors train (no extra copy); "copy": a trained copy in the base
    # dtype (PEFT's LN tuning); "fp32": added fp32 tensors (PEFT adapters, bottlenecks, prompts)
    storage: str = "fp32"
    per_step_bytes: float = 0.0  # e.g. p-tuning's prompt encoder, run once per step

    def adapts(self, target: str) -> bool:
        """Whether the method puts a trained branch on this per-layer linear layer (so a gradient
        flows back through the block that computes its input)."""
        return False

    def keeps_input(self, step: "Step", target: str) -> bool:
        """Whether the method's branch on `target` keeps the layer's input tensor itself for
        backward (shared with the base layer's own use of it)."""
        return False

    def branch_bytes(self, step: "Step", target: str) -> float:
        """Bytes the method's branch on `target` keeps for backward, beyond the layer's input."""
        return 0.0

    def block_bytes(self, step: "Step") -> float:
        """Bytes the method's modules after each attention and each MLP block keep for backward."""
        return 0.0

    def eval_mlp_bytes(self, shape: "ModelShape", tokens: int, act: int, plain: float) -> float:
        """The widest moment of one layer's no-grad forward (in its MLP), given `plain`: that of
        the base layer alone."""
        return plain

    def scales_input(self, target: str) -> bool:
        """Whether the method multiplies the input of `target` by a trained tensor (so that input
        requires a gradient, and the layer computes its input gradient)."""
        return False

    def branch_flops(self, shape: "ModelShape", target: str, tokens: int, input_grad: bool) -> tuple[float, float]:
        """(forward, backward) FLOPs of the method's branch on per-layer linear `target` for
        `tokens` positions; `input_grad`: the layer's input requires a gradient."""
        return 0.0, 0.0

    def block_flops(self, shape: "ModelShape", tokens: int, input_grad: bool) -> tuple[float, float, bool]:
        """(forward, backward, output requires grad) of the method's modules after each attention
        and each MLP block, whose input requires a gradient when `input_grad`."""
        return 0.0, 0.0, False

    def prompt_flops(self, shape: "ModelShape", rows: int) -> tuple[float, float]:
        """(forward, backward) FLOPs of what makes the virtual tokens for a batch of `rows` rows
        (a prompt encoder, a prefix projection)."""
        return 0.0, 0.0


@dataclass(frozen=True)
class StageTerms:
    """What a stage does to a training step's memory, beyond one causal LM on a batch of rows.
    This class as it is: supervised training of the policy alone."""

    # Sequences one training row becomes in a forward pass (chosen + rejected: 2; answers sampled
    # per prompt: their number), and one evaluation row.
    sequences_per_row: int = 1
    eval_sequences_per_row: int = 1
    generated_tokens: int = 0  # tokens each training sequence grows by (sampled answers)
    scalar_head: bool = False  # the output is one score per sequence (a reward model), not vocab logits
    # Models as large as the trained one that stay in memory, it included (a reward model scoring
    # rollouts, a frozen reference copy).
    model_copies: int = 1
    note: str = ""  # what the estimate table says about these terms
    # No-grad forwards of the trained sequences per step beside the trained one (DPO's reference
    # log-probs of each pair)
    reference_forwards: int = 0

    def sequences(self, batch: list) -> Rows:
        """The rows one micro-batch of the stage's items becomes in its trained forward, each as
        the lengths of the sequences in it (trainers/flops.py); default: token rows (examples,
        packed rows)."""
        return rows_of(batch)

    def step_flops(self, model: "FlopsModel", rows: Rows) -> Cost:
        """FLOPs of one micro-batch of `rows` on `model` (the trained one): its forward and
        backward, and the reference forwards."""
        flops = model.train(rows) + self.reference_forwards * model.forward(rows)
        return Cost(flops, len(rows) * max((sum(row) for row in rows), default=0))
