"""Prefix tuning (Li & Liang 2021, PEFT): a learned key/value prefix in every attention layer;
the base is untouched.

Trainable (no projection): num_virtual_tokens x layers x 2 (key, value) x kv_heads x head_dim.
Works on any base precision. Wants a higher learning rate than LoRA (~1e-2). The artifact is a
PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.memory.terms import MethodTerms
from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, positive, prepare_quantized_base


@dataclass
class PrefixConfig(MethodConfig):
    name: str = "prefix"
    num_virtual_tokens: int = 16  # prefix length in every layer's attention
    # true: learn the prefix through a 2-layer MLP (stabler training, many more trainable params);
    # PEFT saves the projected prefix, not the MLP, so the adapter is as small as without it.
    prefix_projection: bool = False
    encoder_hidden_size: int = 128  # MLP width, used when prefix_projection=true

    def check(self) -> list[tuple[str, str]]:
        return positive(self, "num_virtual_tokens", "encoder_hidden_size")


def apply(model, cfg):
    import peft

    method: PrefixConfig = cfg.method
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
                                     prefix_projection=method.prefix_projection,
                                     encoder_hidden_size=method.encoder_hidden_size)
    return peft.get_peft_model(prepare_quantized_base(model, cfg), config)


def trainable_sizes(shape, method) -> list[int]:
    n, kv, L = method.num_virtual_tokens, shape.kv_dim, shape.layers
    if method.prefix_projection:
        e = method.encoder_hidden_size
        return [n * kv, kv * e, e, e * 2 * L * kv, 2 * L * kv]
    return [n * 2 * L * kv]


@dataclass(frozen=True)
class PrefixTerms(MethodTerms):
    """A trained key/value prefix in every attention; with prefix_projection, made per row by an MLP."""

    tokens: int = 0  # num_virtual_tokens
    projection: int = 0  # encoder_hidden_size with prefix_projection, else 0

    def prompt_flops(self, shape, rows: int) -> tuple[float, float]:
        """The projection (kv width -> e -> layers x 2 x kv width) runs on each row's copy of the
        prefix embeddings; every weight and the embeddings train: backward twice the forward."""
        if not self.projection:
            return 0.0, 0.0
        kv, e = shape.kv_dim, self.projection
        forward = 2.0 * rows * self.tokens * (kv * e + e * 2 * shape.layers * kv)
        return forward, 2 * forward


def memory_terms(shape, method) -> PrefixTerms:
    return PrefixTerms(attention_grad=True, tokens=method.num_virtual_tokens,
                       projection=method.encoder_hidden_size if method.prefix_projection else 0)


register(MethodSpec(name="prefix", config_cls=PrefixConfig, apply=apply, saves="adapter", mergeable=False,
                    virtual_tokens=lambda method: (0, method.num_virtual_tokens),
                    trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="trainable key/value prefix in every attention layer"))
