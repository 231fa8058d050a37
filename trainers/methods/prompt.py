"""Prompt tuning (Lester et al. 2021, PEFT): num_virtual_tokens trainable input embeddings put
in front of every sequence; the base is untouched.

Trainable: num_virtual_tokens x hidden_size. Works on any base precision (gradients only pass
through the frozen layers). Wants a much higher learning rate than LoRA (~1e-2 to 3e-1).
The artifact is a PEFT adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, positive, prepare_quantized_base

PROMPT_INITS = ("random", "sample_vocab", "text")


@dataclass
class PromptConfig(MethodConfig):
    name: str = "prompt"
    num_virtual_tokens: int = 16  # more tokens = more capacity, and that much longer every sequence
    # random: N(0, 1) vectors (far from real embeddings, slow start); sample_vocab: copies of random
    # vocabulary embeddings; text: the embeddings of init_text, repeated/cut to num_virtual_tokens.
    init: str = "sample_vocab"
    init_text: str = ""

    def check(self) -> list[tuple[str, str]]:
        problems = positive(self, "num_virtual_tokens")
        if self.init not in PROMPT_INITS:
            problems.append(("init", f"must be one of {', '.join(PROMPT_INITS)}, got {self.init!r}"))
        if self.init == "text" and not self.init_text.strip():
            problems.append(("init_text", "init=text needs the text to start from, e.g. method.init_text='Answer:'"))
        return problems


def apply(model, cfg):
    import peft

    method: PromptConfig = cfg.method
    kwargs = {}
    if method.init == "text":
        from trainers.model import resolve_model_path

        kwargs = {"prompt_tuning_init_text": method.init_text,
                  "tokenizer_name_or_path": resolve_model_path(cfg.model.name_or_path)}
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.num_virtual_tokens,
                                     prompt_tuning_init=method.init.upper(), **kwargs)
    return peft.get_peft_model(prepare_quantized_base(model, cfg), config)


def trainable_sizes(shape, method) -> list[int]:
    return [method.num_virtual_tokens * shape.hidden]


def memory_terms(shape, method):
    from trainers.memory.terms import MethodTerms

    return MethodTerms(input_grad=True)


register(MethodSpec(name="prompt", config_cls=PromptConfig, apply=apply, saves="adapter", mergeable=False,
                    virtual_tokens=lambda method: (method.num_virtual_tokens, 0),
                    trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="trainable input embeddings prepended to every sequence"))
