"""Loading a base model and its tokenizer: the embedded default, a local directory or a hub id.

Every source goes through the same `from_pretrained` path. Safetensors only unless
`model.allow_pickle=true`; remote code only with `model.trust_remote_code=true` and a pinned
`model.revision`. Precision decides how the frozen base weights are stored.
"""

from __future__ import annotations

from pathlib import Path

from trainers.config import ExperimentConfig, ModelConfig, PrecisionConfig

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_model_path(name_or_path: str) -> str:
    from trainers import embedded

    if embedded.is_embedded(name_or_path):
        return str(embedded.resolve(name_or_path))
    return name_or_path


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def quantization_config(precision: PrecisionConfig):
    """bitsandbytes settings for int8 / nf4 / fp4 bases; None for float precisions."""
    if not precision.quantized:
        return None
    from transformers import BitsAndBytesConfig

    if precision.name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=precision.name,
        bnb_4bit_use_double_quant=precision.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(precision.compute_dtype),
    )


def _common_kwargs(model_cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.revision:
        kwargs["revision"] = model_cfg.revision
    return kwargs


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.name_or_path), **_common_kwargs(model_cfg))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model.name_or_path={model_cfg.name_or_path}: tokenizer has no eos token")
    tokenizer.padding_side = "left"  # generation appends on the right
    return tokenizer


def weights_problems(model_cfg: ModelConfig) -> list[tuple[str, str]]:
    """A local model directory without weights the loader may read (*.safetensors; *.bin too with
    model.allow_pickle=true): its config and tokenizer pass every check, and only the worker's
    from_pretrained would fail. A hub id is not looked at: its download says what is missing."""
    path = Path(resolve_model_path(model_cfg.name_or_path))
    if not path.is_dir():
        return []
    patterns = ("*.safetensors", "*.bin") if model_cfg.allow_pickle else ("*.safetensors",)
    if any(next(path.glob(pattern), None) for pattern in patterns):
        return []
    message = f"no weights ({' or '.join(patterns)}) in {path}"
    if not model_cfg.allow_pickle and next(path.glob("*.bin"), None):
        message += (" (it has pickle *.bin weights, which can run code when loaded: model.allow_pickle=true "
                    "loads them)")
    return [("model.name_or_path", message)]


def load_base_model(cfg: ExperimentConfig, device, model_class=None, **from_pretrained_kwargs):
    """The base model at the configured precision, on `device`, not yet adapted by a method.
    `model_class` (default AutoModelForCausalLM) and extra kwargs (e.g. num_labels=1) choose the head."""
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    path = resolve_model_path(cfg.model.name_or_path)
    kwargs = _common_kwargs(cfg.model)
    kwargs["use_safetensors"] = None if cfg.model.allow_pickle else True
    kwargs["attn_implementation"] = cfg.model.attn_implementation
    kwargs.update(from_pretrained_kwargs)
    quant = quantization_config(cfg.precision)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
        kwargs["dtype"] = torch_dtype(cfg.precision.compute_dtype)
    else:
        kwargs["dtype"] = torch_dtype(cfg.precision.name)
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "attention" not in str(err) and "attn" not in str(err):
            raise
        # transformers' own refusal (e.g. Gemma 2 has no sdpa path: its logits are soft-capped)
        raise ValueError(f"model.attn_implementation={cfg.model.attn_implementation}: {cfg.model.name_or_path} "
                         f"cannot use it ({str(err).splitlines()[0][:200]}); set model.attn_implementation=eager, "
                         "which every architecture has") from None
    except OSError as err:
        problems = weights_problems(cfg.model)
        if problems:
            raise OSError(f"model.name_or_path={cfg.model.name_or_path}: {problems[0][1]}") from err
        raise
    if quant is None:
        model.to(device)
    else:
        keep_4bit_layout_trainable(model)
    model.config.use_cache = False  # training; generation turns it back on
    if cfg.train.liger:
        apply_liger(model, cfg.model.name_or_path)
    return model


def keep_4bit_layout_trainable(model) -> None:
    """bitsandbytes repacks a CPU 4-bit weight for its AVX512-BF16 inference kernel the first time
    the layer runs in eval mode without grad, and its training path cannot use that layout after
    ("a view of a leaf Variable ... in-place"): a trial that evaluates mid-training
    (train.eval_every, RL rollouts) failed its next step. Trials keep the training layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def apply_liger(model, name: str) -> None:
    """Swap in Liger's fused Triton kernels (train.liger; the config check made sure the package
    is installed and a GPU is used). Patches this instance, before any method wraps it."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # liger would only log this and go on
        raise ValueError(f"train.liger=true: liger-kernel has no kernels for {name} (model_type {model_type}); "
                         f"it supports {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
    _apply_liger_kernel_to_instance(model=model)


def encoded_numel(param) -> int:
    """Parameters a tensor encodes: a quantized 4-bit weight packs two per uint8 element (its
    quant_state keeps the original shape); int8 (LLM.int8) weights hold one per element."""
    if param.__class__.__name__ == "Params4bit" and getattr(param, "bnb_quantized", False):
        state = getattr(param, "quant_state", None)
        return int(state.shape.numel()) if state is not None else param.numel() * 2
    return param.numel()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor once; quantized weights count as the
    parameters they encode, so a 4-bit model reports the same total as its fp32 original."""
    trainable = total = 0
    for param in model.parameters():
        n = encoded_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def check_packed_attention(model, key: str = "data.packing") -> None:
    """Refuse a model that would let a packed row's examples attend to each other.

    Packing (data.packing=true|padding_free) relies on the architecture building its attention
    mask from position_ids that restart per example (transformers 5's find_packed_sequence_indices);
    an architecture that does not (OPT derives positions from an attention mask and masks causally
    over the whole row) would silently train on the wrong context. The probe: two 3-token examples
    as one row, whose second example's logits must equal those of it run alone (a leak moves them
    by far more than rounding does, in any precision).
    """
    import torch

    device = next(model.parameters()).device
    first, second = [3, 4, 5], [6, 7, 8]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            row = torch.tensor([first + second], device=device)
            positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
            packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, 3:].float()
            alone = model(input_ids=row[:, 3:], use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    leak = (packed - alone).abs().max().item()
    if leak > 1e-2 * max(alone.abs().max().item(), 1.0):
        raise ValueError(f"{key}: {type(model).__name__} ignores the restarting position_ids of a packed row "
                         f"(an example's logits change by {leak:.3g} beside another), so its examples would attend "
                         f"to each other; set {key}=false for this architecture")
