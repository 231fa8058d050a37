"""LoRA: frozen base, trainable low-rank update B @ A (r x (in + out) per targeted linear layer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from trainers.memory.terms import MethodTerms

from trainers.methods.base import register
from trainers.methods.base import MethodConfig, MethodSpec, architecture, model_shape, peft_task_type, prepare_quantized_base
from trainers.methods.structure import ALL_LINEAR, ATTENTION


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8  # higher increases capacity, adapter size and memory
    alpha: float = 16.0  # update scale is alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0
    # Portable: [all-linear] = every linear layer but the output head, [attention] = the attention
    # block's projections on any architecture; or the model's own names, e.g. [q_proj, v_proj].
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    use_rslora: bool = False  # rank-stabilised scaling, keeps high ranks from under-training
    use_dora: bool = False  # weight-decomposed LoRA: also learns a per-column magnitude

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.r <= 0:
            problems.append(("r", f"must be > 0, got {self.r}"))
        if not self.alpha > 0:
            problems.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0 <= self.dropout < 1:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not self.target_modules:
            problems.append(("target_modules", "must name at least one module or 'all-linear'"))
        return problems


def peft_lora_config(method: LoraConfig, model, task_type: str = "CAUSAL_LM"):
    import peft

    from trainers.methods.structure import resolve_targets

    return peft.LoraConfig(
        r=method.r,
        lora_alpha=method.alpha,
        lora_dropout=method.dropout,
        target_modules=resolve_targets(model, method.target_modules),
        use_rslora=method.use_rslora,
        use_dora=method.use_dora,
        bias="none",
        task_type=task_type,
    )


def apply(model, cfg):
    import peft

    config = peft_lora_config(cfg.method, model, peft_task_type(model))
    return peft.get_peft_model(prepare_quantized_base(model, cfg), config)


def check_combination(cfg) -> list[tuple[str, str]]:
    return dora_int8_problems(cfg)


def target_problems(cfg) -> list[tuple[str, str]]:
    """Target names the architecture (a known layout) does not have: PEFT would fail on the worker."""
    from trainers.memory.counts import linear_targets
    from trainers.memory.shapes import LAYOUTS

    shape = model_shape(cfg)
    if shape is None or shape.model_type not in LAYOUTS:
        return []
    missing = [t for t in cfg.method.target_modules
               if t not in (ALL_LINEAR, ATTENTION) and not linear_targets(shape, [t])]
    if not missing:
        return []
    return [("method.target_modules", f"{cfg.method.name} on {architecture(shape)}: no layer named "
                                      f"{', '.join(missing)}; its linear layers are {', '.join(shape.linears())}, "
                                      f"or use the portable [{ATTENTION}] or [{ALL_LINEAR}]")]


def dora_int8_problems(cfg) -> list[tuple[str, str]]:
    if cfg.method.use_dora and cfg.precision.name == "int8" and not cfg.train.use_gpu:
        # PEFT dequantizes the int8 weight for DoRA's norm and, on CPU, moves it back with .to(),
        # which drops its scales: the next forward of bitsandbytes' Linear8bitLt fails (peft 0.21, bnb 0.50).
        return [("method.use_dora", "DoRA on an int8 base fails on CPU (the int8 layer loses its scales after "
                                    "the first step); on CPU use DoRA with fp32/bf16/nf4/fp4, or train.use_gpu=true")]
    return []


def lora_targets(shape, method) -> list[str]:
    """The per-layer linear names the config targets, on a ModelShape."""
    from trainers.memory.counts import linear_targets

    return linear_targets(shape, [ALL_LINEAR] if method.target_modules is None else method.target_modules)


def trainable_sizes(shape, method) -> list[int]:
    """A (r x in) and B (out x r) per targeted layer; DoRA adds a magnitude per output feature."""
    sizes = []
    for target in lora_targets(shape, method):
        fan_in, fan_out, _ = shape.linears()[target]
        sizes += [method.r * fan_in, method.r * fan_out] + ([fan_out] if method.use_dora else [])
    return sizes * shape.layers


@dataclass(frozen=True)
class LoraTerms(MethodTerms):
    """A trained low-rank branch x -> B(A(dropout(x))) beside each targeted linear layer."""

    targets: tuple[str, ...] = ()
    rank: int = 0
    dropout: float = 0.0
    dora: bool = False

    def adapts(self, target: str) -> bool:
        return target in self.targets

    def keeps_input(self, step, target: str) -> bool:
        # a same-dtype branch without dropout reads the very tensor the base layer got
        return target in self.targets and step.act == 4 and self.dropout == 0

    def branch_bytes(self, step, target: str) -> float:
        """An fp32 copy of a 2-byte input (or the dropout output and its fp32 mask), the rank-r
        intermediate; DoRA also the base output and the fp32 LoRA output."""
        if target not in self.targets:
            return 0.0
        T = step.T
        fan_in, fan_out, _ = step.shape.linears()[target]
        copy = T * fan_in * 8 if self.dropout > 0 else (T * fan_in * 4 if step.act != 4 else 0.0)
        return copy + T * self.rank * 4 + (T * fan_out * (step.act + 4) if self.dora else 0.0)

    def eval_mlp_bytes(self, shape, tokens: int, act: int, plain: float) -> float:
        """A branch on the MLP's up projection adds its fp32 output and scaled output (DoRA: the
        base output, its rescaling, the branch's), and an fp32 copy of a 2-byte input."""
        if shape.layout.mlp_in[-1] not in self.targets:
            return plain
        widest = tokens * shape.intermediate * (3 * act + 16 if self.dora else 2 * act + 8)
        return widest + (tokens * shape.hidden * 4 if act != 4 else 0)


    def branch_flops(self, shape, target: str, tokens: int, input_grad: bool) -> tuple[float, float]:
        """x -> A -> B: two rank-r matmuls forward; backward both weight gradients, B's input
        gradient (A trains), A's where the layer's input wants one. DoRA also runs the identity
        through the branch each forward for the weight norm (detached: no backward)."""
        if target not in self.targets:
            return 0.0, 0.0
        fan_in, fan_out, _ = shape.linears()[target]
        a, b = 2.0 * tokens * fan_in * self.rank, 2.0 * tokens * self.rank * fan_out
        norm = 2.0 * fan_in * self.rank * (fan_in + fan_out) if self.dora else 0.0
        return a + b + norm, a + 2 * b + (a if input_grad else 0.0)


def memory_terms(shape, method) -> LoraTerms:
    return LoraTerms(targets=tuple(lora_targets(shape, method)), rank=method.r, dropout=method.dropout,
                     dora=method.use_dora)


register(MethodSpec(name="lora", config_cls=LoraConfig, apply=apply, saves="adapter", check_combination=check_combination,
                    check_architecture=target_problems, trainable_sizes=trainable_sizes, memory_terms=memory_terms,
                    summary="low-rank update on frozen linear layers"))
