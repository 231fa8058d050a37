"""Typed configuration of one trial: the dataclasses behind every Hydra config group.

The same classes serve the orchestrator (registered in Hydra's ConfigStore, so composition
rejects unknown keys and wrong types) and a plain-process run (`python -m trainers --config
trial.yaml`). Value checks of one section live in its `check()` method, which returns
`(key, message)` pairs, so a bad value is reported with the dotted key the user typed, before
anything runs. Checks that need the method and stage registries, and the typed loading of a whole
config, are in trainers/validate.py (this module imports no registry, so every registry may import it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

try:
    from omegaconf import MISSING
except ImportError:  # a bare GPU box (benchmarks/gpu_throughput.py) builds these dataclasses directly
    MISSING = "???"

# The Hydra config tree of a checkout (the driver's; Ray workers get resolved configs).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4", "fp4")
QUANTIZED_PRECISIONS = ("int8", "nf4", "fp4")
OPTIMIZERS = ("adamw", "sgd", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULERS = ("cosine", "linear", "constant")
OVERLENGTH_POLICIES = ("error", "truncate", "drop")
DATA_FORMATS = ("auto", "instruction", "chat", "preference")
DATA_TEMPLATES = ("auto", "model", "plain")
PADDING_FREE = "padding_free"  # the data.packing value beside false | true
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
# Those that take a padding-free row's example boundaries (cu_seq_lens) and attend within each
# example only; the others mask the row's L x L attention block-diagonally.
VARLEN_ATTENTION = ("flash_attention_2",)


class ConfigError(ValueError):
    """One or more config values are invalid; each problem names its dotted key."""

    def __init__(self, problems: List[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{key}: {msg}" for key, msg in problems))


class InapplicableError(ConfigError):
    """A valid config whose method the model's architecture cannot take (BitFit on a model without
    biases, LoRA on layer names it does not have, 4-bit on CPU at odd layer sizes): refused in a
    single run; a comparison sweep skips that trial with these problems as its reason.
    `config` is the typed config that was refused."""

    def __init__(self, problems: List[tuple[str, str]], config: Any = None):
        super().__init__(problems)
        self.config = config


@dataclass
class ModelConfig:
    # "embedded:base" is the tiny model this project pretrains itself; else a hub id or a directory.
    name_or_path: str = "embedded:base"
    revision: Optional[str] = None
    # Runs code from the model repository: only with a pinned `revision`.
    trust_remote_code: bool = False
    # Pickle checkpoints (.bin) can execute code when loaded; safetensors cannot.
    allow_pickle: bool = False
    # The attention kernels, in training, evaluation and promotion: sdpa (torch's fused attention) |
    # eager (plain matmuls; every architecture has it) | flash_attention_2 (GPU and the flash-attn
    # package; varlen kernels skip the other examples of a packed row instead of masking them) |
    # flex_attention (torch's compiled block-sparse attention; GPU: it has no backward on CPU).
    attn_implementation: str = "sdpa"

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            problems.append(("model.attn_implementation", f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, "
                                                          f"got {self.attn_implementation!r}"))
        if not self.name_or_path:
            problems.append(("model.name_or_path", "must name a hub id, a directory or embedded:base"))
        if self.trust_remote_code and not self.revision:
            problems.append(
                ("model.trust_remote_code", "true requires a pinned model.revision (a commit hash)")
            )
        return problems


@dataclass
class ColumnsConfig:
    """The column holding each field of the formats, where it is named otherwise (null: the field's
    own name), e.g. data.columns.instruction=question data.columns.output=answer."""

    instruction: Optional[str] = None
    input: Optional[str] = None
    output: Optional[str] = None
    messages: Optional[str] = None
    prompt: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None

    def mapping(self) -> dict[str, str]:
        """{field: column} of the fields named otherwise."""
        return {name: column for name, column in dataclasses.asdict(self).items() if column}


@dataclass
class DataConfig:
    # instruction/chat JSONL for SFT, preference JSONL for reward/dpo; `embedded:` = shipped data.
    format: str = "auto"
    train_file: str = MISSING  # required: set by the data group or data.train_file=PATH
    eval_file: Optional[str] = "embedded:instruct_eval.jsonl"
    max_seq_len: int = 96  # longer rows follow `overlength`
    overlength: str = "error"
    max_train_rows: Optional[int] = None  # None = all rows
    max_eval_rows: Optional[int] = None
    max_new_tokens: int = 8  # greedy generation budget for exact-match accuracy
    # SFT: false | true: several examples per row of max_seq_len tokens (train.batch_size counts
    # rows, padded to the batch's longest), attention kept within each example | padding_free: each
    # micro-batch is ONE row of up to max_tokens_per_batch tokens, no pad at all (positions restart
    # per example; flash-attention gets the varlen boundaries). Typed Any: Hydra reads `true` as a
    # bool and `padding_free` as a string; check() allows exactly these three.
    packing: Any = False
    # data.packing=padding_free: tokens per micro-batch (per worker); null = train.batch_size x
    # max_seq_len. An example longer than it follows data.overlength.
    max_tokens_per_batch: Optional[int] = None
    # SFT, unpacked: batches of examples of similar length (less padding); batch order stays shuffled.
    group_by_length: bool = False
    # How rows become text: auto = the tokenizer's chat template when it has one, else plain;
    # model = its chat template (an instruct model trains and is evaluated in its own format);
    # plain = the project's "### Instruction:" / "### User:" headers. Logged resolved (model|plain).
    template: str = "auto"
    # The data's column names where they differ from the fields (data.columns.output=answer).
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)

    @property
    def padding_free(self) -> bool:
        return self.packing == PADDING_FREE

    @property
    def packed_rows(self) -> bool:
        """data.packing=true: rows of max_seq_len, several per micro-batch."""
        return self.packing is True

    def token_budget(self, batch_size: int) -> int:
        """Tokens per padding-free micro-batch (data.max_tokens_per_batch or its default)."""
        return self.max_tokens_per_batch or batch_size * self.max_seq_len

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not (isinstance(self.packing, bool) or self.padding_free):
            problems.append(("data.packing", f"must be false, true or {PADDING_FREE}, got {self.packing!r}"))
        if self.max_tokens_per_batch is not None:
            if self.max_tokens_per_batch <= 0:
                problems.append(("data.max_tokens_per_batch", f"must be > 0 or null, got {self.max_tokens_per_batch}"))
            elif not self.padding_free:
                problems.append(("data.max_tokens_per_batch", f"is the budget of data.packing={PADDING_FREE} "
                                                              f"micro-batches; data.packing is {self.packing!r}"))
        if self.packing and self.group_by_length:
            problems.append(("data.group_by_length", "packed rows are all about one length: use "
                                                     "data.packing or data.group_by_length=true, not both"))
        if self.format not in DATA_FORMATS:
            problems.append(("data.format", f"must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}"))
        if self.overlength not in OVERLENGTH_POLICIES:
            problems.append(
                ("data.overlength", f"must be one of {', '.join(OVERLENGTH_POLICIES)}, got {self.overlength!r}")
            )
        if self.max_seq_len < 8:
            problems.append(("data.max_seq_len", f"must be >= 8, got {self.max_seq_len}"))
        for key in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                problems.append((f"data.{key}", f"must be > 0 or null, got {value}"))
        if self.max_new_tokens <= 0:
            problems.append(("data.max_new_tokens", f"must be > 0, got {self.max_new_tokens}"))
        if self.template not in DATA_TEMPLATES:
            problems.append(("data.template", f"must be one of {', '.join(DATA_TEMPLATES)}, got {self.template!r}"))
        return problems


@dataclass
class PrecisionConfig:
    # Storage of the frozen base weights: fp32 | bf16 | fp16 | int8 | nf4 | fp4.
    name: str = "fp32"
    # Compute dtype of quantized layers and of autocast.
    compute_dtype: str = "fp32"
    # 4-bit only: quantize the quantization constants too (~0.37 bits/param saved).
    double_quant: bool = False

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.name not in PRECISIONS:
            problems.append(("precision.name", f"must be one of {', '.join(PRECISIONS)}, got {self.name!r}"))
        if self.compute_dtype not in ("fp32", "bf16", "fp16"):
            problems.append(
                ("precision.compute_dtype", f"must be fp32, bf16 or fp16, got {self.compute_dtype!r}")
            )
        if self.double_quant and self.name not in ("nf4", "fp4"):
            problems.append(("precision.double_quant", f"applies to nf4/fp4 only, precision is {self.name}"))
        return problems

    @property
    def quantized(self) -> bool:
        return self.name in QUANTIZED_PRECISIONS


@dataclass
class TrainConfig:
    max_steps: int = 250  # optimizer steps
    batch_size: int = 16  # per worker, per micro-step
    grad_accum: int = 1  # global batch = batch_size * grad_accum * num_workers
    lr: float = 2e-3  # LoRA-scale; full fine-tuning wants ~10x less
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    eval_batch_size: int = 64
    log_every: int = 10  # steps between train/* metrics
    # Steps between evaluations of eval/loss on the eval split during training (0 = only at the
    # end): what an early-stopping scheduler (sweep.scheduler=asha) decides on. Each costs a pass
    # over the eval rows (data.max_eval_rows bounds it).
    eval_every: int = 0
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    # num_workers > 1 and method=full: shard parameters, gradients and optimizer state (FSDP) instead
    # of a full replica per worker (DDP); for models whose training state does not fit one device.
    fsdp: bool = False
    # CPUs Ray reserves per worker, and its torch intra-op threads. None (auto): the whole node
    # split over the workers when the trial runs alone on a local Ray (a one-trial sweep, or
    # cluster.max_concurrent_trials=1), else 1; `python -m trainers` keeps torch's own default.
    cpus_per_worker: Optional[int] = None
    use_gpu: bool = False
    time_limit_s: Optional[float] = None  # per trial; None = no limit
    checkpoint_every: int = 50  # steps between atomic checkpoints (0 = none); a restart resumes there
    # GPU only: torch.compile the training forward/backward; faster steps after a compile of a
    # minute or more (and more at each new sequence length).
    compile: bool = False
    # GPU only: Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU, linear + cross-entropy without
    # the full logits); less memory and time, needs the liger-kernel package and a model it supports.
    liger: bool = False
    # Recompute each decoder layer's activations in backward instead of keeping them (activation
    # checkpointing): a layer keeps only its input, for ~30% more compute per step.
    gradient_checkpointing: bool = False

    def check(self) -> list[tuple[str, str]]:
        problems = []
        positive = ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "log_every", "num_workers",
                    "cpus_per_worker")
        for key in positive:
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                problems.append((f"train.{key}", f"must be > 0, got {getattr(self, key)}"))
        if not self.lr > 0:
            problems.append(("train.lr", f"must be > 0, got {self.lr}"))
        if not 0 <= self.warmup_ratio < 1:
            problems.append(("train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        if self.scheduler not in SCHEDULERS:
            problems.append(("train.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"))
        if self.optimizer not in OPTIMIZERS:
            problems.append(("train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"))
        if self.eval_every < 0:
            problems.append(("train.eval_every", f"must be >= 0, got {self.eval_every}"))
        if self.checkpoint_every < 0:
            problems.append(("train.checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"))
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            problems.append(("train.time_limit_s", f"must be > 0 or null, got {self.time_limit_s}"))
        if self.compile and not self.use_gpu:
            problems.append(("train.compile", "needs train.use_gpu=true: on CPU, inductor took ~190 s to compile "
                                              "the default tiny model on 2 CPUs and recompiles at new lengths"))
        if self.liger:
            import importlib.util

            if not self.use_gpu:
                problems.append(("train.liger", "Liger kernels are Triton GPU kernels: needs train.use_gpu=true"))
            elif importlib.util.find_spec("liger_kernel") is None:
                problems.append(("train.liger", "needs the liger-kernel package, which is not installed "
                                                "(pip install liger-kernel)"))
        return problems


@dataclass
class StorageConfig:
    # Checkpoints and adapters of every trial; a path all nodes see, or s3://bucket/prefix.
    path: str = "runs"


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Typed by the chosen method's own dataclass (trainers.methods registry).
    method: Any = None
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Typed by the chosen stage recipe's own dataclass (trainers.recipes registry).
    stage: Any = None
    # Where and how the orchestrator runs a sweep (orchestrator/config.py types them); a trial only
    # carries them along, so a logged config.yaml loads here as it was written.
    cluster: Any = None
    tracking: Any = None
    storage: StorageConfig = field(default_factory=StorageConfig)
    sweep: Any = None
    dry_run: bool = False
    # Rerunning a sweep whose last invocation did not finish continues it: finished trials are
    # kept, unfinished ones resume from their checkpoints. false: always start fresh.
    resume: bool = True
    # After a sweep whose trials all finished: register its best trial in the MLflow Model Registry
    # (orchestrator.promote with its defaults: eval/accuracy, max, merged, name SWEEP-best).
    promote: bool = False


def to_container(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """{"method": {"r": 8}} -> {"method.r": 8}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def default_choice(group: str) -> str:
    """The option of config `group` that conf/config.yaml's defaults list picks (e.g. the default
    stage), for tools that build a config without composing one."""
    from omegaconf import OmegaConf

    for entry in OmegaConf.load(CONF_DIR / "config.yaml").defaults:
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            if group in entry:
                return str(entry[group])
    raise ConfigError([(group, f"{CONF_DIR / 'config.yaml'}: its defaults list picks no {group}")])
