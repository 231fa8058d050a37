"""P-tuning (Liu et al. 2021, PEFT): virtual input tokens produced by a small trainable prompt
encoder (MLP or bidirectional LSTM), which trains more stably than free prompt embeddings.

Trainable (mlp): num_virtual_tokens x hidden (the encoder's input embeddings) + the encoder,
hidden -> encoder_hidden_size -> encoder_hidden_size -> hidden with biases. Works on any base
precision. Wants a higher learning rate than LoRA. The artifact is a PEFT adapter holding the
encoder's output (num_virtual_tokens x hidden), not the encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def memory_terms(shape, method):
    """The prompt encoder runs once per step, for batch 1."""
    from trainers.memory.terms import MethodTerms

    encoder = method.num_virtual_tokens * (shape.hidden + 2 * method.encoder_hidden_size) * 4
    return MethodTerms(input_grad=True, per_step_bytes=encoder)


register(MethodSpec(name="ptuning", config_cls=PTuningConfig, apply=apply, saves="adapter", mergeable=False,
                    virtual_tokens=lambda method: (method.num_virtual_tokens, 0),
                    trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="virtual input tokens produced by a small trainable encoder"))
