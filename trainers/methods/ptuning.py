"""P-tuning (Liu et al. 2021, PEFT): virtual input tokens produced by a small trainable prompt
encoder (MLP or bidirectional LSTM), which trains more stably than free prompt embeddings.

Trainable (mlp): num_virtual_tokens x hidden (the encoder's input embeddings) + the encoder,
hidden -> encoder_hidden_size -> encoder_hidden_size -> hidden with biases. Works on any base
precision. Wants a higher learning rate than LoRA. The artifact is a PEFT adapter holding the
encoder's output (num_virtual_tokens x hidden), not the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.memory.terms import MethodTerms
from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, positive, prepare_quantized_base

ENCODER_TYPES = ("mlp", "lstm")


@dataclass
class PTuningConfig(MethodConfig):
    name: str = "ptuning"
    num_virtual_tokens: int = 16  # more tokens = more capacity, and that much longer every sequence
    encoder_hidden_size: int = 128  # width of the prompt encoder
    encoder_type: str = "mlp"  # mlp | lstm (bidirectional LSTM then MLP: slower, more parameters)
    encoder_dropout: float = 0.0

    def check(self) -> list[tuple[str, str]]:
        problems = positive(self, "num_virtual_tokens", "encoder_hidden_size")
        if self.encoder_type not in ENCODER_TYPES:
            problems.append(("encoder_type", f"must be one of {', '.join(ENCODER_TYPES)}, got {self.encoder_type!r}"))
        if not 0 <= self.encoder_dropout < 1:
            problems.append(("encoder_dropout", f"must be in [0, 1), got {self.encoder_dropout}"))
        return problems


def apply(model, cfg):
    import peft

    method: PTuningConfig = cfg.method
    config = peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
        encoder_hidden_size=method.encoder_hidden_size,
        encoder_reparameterization_type=method.encoder_type.upper(), encoder_dropout=method.encoder_dropout)
    return peft.get_peft_model(prepare_quantized_base(model, cfg), config)


def trainable_sizes(shape, method) -> list[int]:
    """Input embeddings, then the encoder: mlp = 3 linear layers; lstm = a 2-layer bidirectional
    LSTM (4 gates) and a 2-layer MLP head."""
    n, e, h = method.num_virtual_tokens, method.encoder_hidden_size, shape.hidden
    if method.encoder_type == "lstm":
        lstm = 2 * (4 * e * (h + e) + 8 * e) + 2 * (4 * e * (2 * e + e) + 8 * e)  # 2 layers x 2 directions
        return [n * h, lstm, 2 * e * 2 * e, 2 * e, 2 * e * h, h]
    return [n * h, h * e, e, e * e, e, e * h, h]


@dataclass(frozen=True)
class PromptEncoderTerms(MethodTerms):
    """The prompt encoder makes the virtual tokens of every row from trained embeddings."""

    tokens: int = 0  # num_virtual_tokens
    width: int = 0  # encoder_hidden_size
    lstm: bool = False

    def prompt_flops(self, shape, rows: int) -> tuple[float, float]:
        """PEFT runs the encoder once per forward, for one row, whatever the batch: MLP hidden ->
        e -> e -> hidden (lstm: a 2-layer bidirectional LSTM of width e, then 2e -> 2e -> hidden).
        Every weight trains and so do its input embeddings: backward is twice the forward."""
        n, e, h = self.tokens, self.width, shape.hidden
        if self.lstm:
            forward = 2 * 4 * 2.0 * n * e * ((h + e) + (2 * e + e)) + 2.0 * n * 2 * e * (2 * e + h)
        else:
            forward = 2.0 * n * (h * e + e * e + e * h)
        return forward, 2 * forward


def memory_terms(shape, method):
    """The prompt encoder runs once per step, for batch 1."""
    encoder = method.num_virtual_tokens * (shape.hidden + 2 * method.encoder_hidden_size) * 4
    return PromptEncoderTerms(input_grad=True, per_step_bytes=encoder, tokens=method.num_virtual_tokens,
                              width=method.encoder_hidden_size, lstm=method.encoder_type == "lstm")


register(MethodSpec(name="ptuning", config_cls=PTuningConfig, apply=apply, saves="adapter", mergeable=False,
                    virtual_tokens=lambda method: (method.num_virtual_tokens, 0),
                    trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="virtual input tokens produced by a small trainable encoder"))
