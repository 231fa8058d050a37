"""Every method of the registry on a tiny random Llama: trainable count = its closed form, loss
falls, frozen weights stay bit-identical, trained weights move, and the saved artifact reloads
(`trainers.methods.load_trained`) to the same logits. Quantized bases use real bitsandbytes
layers on CPU. Impossible combinations fail validation, naming the key.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from trainers.config import ConfigError
from trainers.validate import from_container
from trainers.data import Example
from trainers.methods import METHODS, load_trained
from trainers.methods.base import METHOD_CONFIG_FILE
from trainers.model import count_parameters, load_base_model
from trainers.runtime import DistInfo
from trainers.tracking import Tracker
from trainers.training import train_loop

CPU = torch.device("cpu")

# The tiny model: hidden H, feed-forward FFN, L layers; every projection has a bias (BitFit) and
# attention is grouped-query (KV = kv_heads x head_dim != H).
H, FFN, L, HEADS, KV_HEADS, V = 32, 64, 2, 4, 2, 128
HEAD_DIM = H // HEADS
KV = KV_HEADS * HEAD_DIM
# bitsandbytes' CPU 4-bit kernel splits each input row into 64-value blocks, so 4-bit tests use a
# model whose in_features are multiples of 64.
H4, FFN4 = 64, 128

# in/out features of the linear layers in one decoder layer of the tiny model.
LINEARS = {"q_proj": (H, H), "k_proj": (H, KV), "v_proj": (H, KV), "o_proj": (H, H),
           "gate_proj": (H, FFN), "up_proj": (H, FFN), "down_proj": (FFN, H)}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def tiny_config(hidden=H, intermediate=FFN):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=L,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=V,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """{"fp": dir, "4bit": dir}: tiny random-init Llamas saved as safetensors, loaded per test through
    load_base_model (so quantization goes through the real from_pretrained path)."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    dirs = {}
    for name, (hidden, intermediate) in {"fp": (H, FFN), "4bit": (H4, FFN4)}.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny_{name}")
        LlamaForCausalLM(tiny_config(hidden, intermediate)).save_pretrained(path)
        dirs[name] = path
    return dirs


def cfg_for(base_dir, method: str, precision: str = "fp32", method_fields=None, **train):
    precision_fields = {"name": precision}
    if precision.endswith("+dq"):
        precision_fields = {"name": precision[:-3], "double_quant": True}
    train = {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant",
             "log_every": 1, **train}
    return from_container({
        "model": {"name_or_path": str(base_dir)},
        "data": {"train_file": "unused.jsonl"},
        "method": {"name": method, **(method_fields or {})},
        "precision": precision_fields,
        "train": train,
        "stage": {"name": "sft"},
    })


class RecordingTracker(Tracker):
    def __init__(self):
        self.losses = []

    def log_metrics(self, metrics, step=None):
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def random_examples(n=4, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, length), generator=generator).tolist()
    return [Example(input_ids=row, labels=row) for row in ids]


def logits(model, examples):
    ids = torch.tensor([e.input_ids for e in examples])
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    return out[:, -ids.shape[1]:]  # prompt tuning prepends virtual positions


def train_and_check(cfg, tmp_path):
    """Apply cfg's method, train, check the invariants; returns (model, artifact_dir)."""
    spec = METHODS[cfg.method.name]
    model = spec.apply(load_base_model(cfg, CPU), cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples = random_examples()
    tracker = RecordingTracker()
    torch.manual_seed(0)
    train_loop(model, examples, cfg.train, 0, CPU, DistInfo(), tracker)

    assert len(tracker.losses) == cfg.train.max_steps
    assert tracker.losses[-1] < tracker.losses[0] - 1e-3, tracker.losses
    params = dict(model.named_parameters())
    moved_frozen = [n for n, p in params.items() if not p.requires_grad and not torch.equal(p, before[n])]
    assert not moved_frozen, f"frozen weights changed: {moved_frozen[:3]}"
    still = [n for n, p in params.items() if p.requires_grad and torch.equal(p, before[n])]
    assert not still, f"trainable weights did not change: {still[:3]}"

    trained_logits = logits(model, examples)
    artifact = tmp_path / spec.saves
    spec.save(model, artifact)
    assert list(artifact.glob("*.safetensors")), "artifact must be safetensors"
    reloaded = load_trained(load_base_model(cfg, CPU), artifact)
    torch.testing.assert_close(logits(reloaded, examples), trained_logits, rtol=0, atol=1e-5)
    return model, artifact


# --- closed forms on the tiny model (H=32, FFN=64, L=2, kv = 2 heads x 8 = 16, biases everywhere)

def lora_count(r, targets=tuple(LINEARS), dora=False):
    per_layer = sum(r * (LINEARS[t][0] + LINEARS[t][1]) + (LINEARS[t][1] if dora else 0) for t in targets)
    return L * per_layer


BIASES = L * sum(out for _, out in LINEARS.values())
NORMS = (2 * L + 1) * H  # input + post-attention norm per layer, and the final norm
BASE_TOTAL = V * H + L * (sum(i * o + o for i, o in LINEARS.values()) + 2 * H) + H


def test_closed_form_constants_match_the_model():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config())
    assert count_parameters(model) == (BASE_TOTAL, BASE_TOTAL)
    assert BIASES == sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))


T = 16  # num_virtual_tokens default
E = 128  # encoder_hidden_size default
B = 16  # adapter bottleneck_size default

CASES = [
    # (id, method, method fields, train overrides, trainable closed form)
    ("full", "full", {}, {"lr": 1e-3}, BASE_TOTAL),
    ("lora", "lora", {"r": 4}, {}, lora_count(4)),
    ("lora_attention_only", "lora", {"r": 4, "target_modules": list(ATTENTION)}, {}, lora_count(4, ATTENTION)),
    ("lora_rslora", "lora", {"r": 4, "use_rslora": True}, {}, lora_count(4)),
    ("dora", "lora", {"r": 4, "use_dora": True}, {}, lora_count(4, dora=True)),  # + magnitude per out feature
    # k and v scale their outputs, down_proj (feed-forward) its input.
    ("ia3", "ia3", {}, {"lr": 5e-2}, L * (KV + KV + FFN)),
    ("prompt", "prompt", {}, {"lr": 5e-2}, T * H),
    ("ptuning", "ptuning", {}, {}, T * H + (H * E + E) + (E * E + E) + (E * H + H)),
    ("prefix", "prefix", {}, {"lr": 5e-2}, T * L * 2 * KV),  # a key and a value vector per token and layer
    ("prefix_projection", "prefix", {"prefix_projection": True}, {"lr": 1e-3},
     T * KV + (KV * E + E) + (E * L * 2 * KV + L * 2 * KV)),
    ("bitfit", "bitfit", {}, {}, BIASES),
    ("ln_tuning", "ln_tuning", {}, {}, NORMS),
    ("adapter", "adapter", {}, {}, L * 2 * (H * B + B + B * H + H)),
    ("adapter_gelu_b4", "adapter", {"bottleneck_size": 4, "nonlinearity": "gelu"}, {}, L * 2 * (H * 4 + 4 + 4 * H + H)),
]


@pytest.mark.parametrize("method,fields,train,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_method_trains_frozen_stays_and_round_trips(base_dirs, tmp_path, method, fields, train, expected):
    cfg = cfg_for(base_dirs["fp"], method, method_fields=fields, **train)
    model = METHODS[method].apply(load_base_model(cfg, CPU), cfg)
    trainable, total = count_parameters(model)
    assert trainable == expected
    assert total >= BASE_TOTAL

    _, artifact = train_and_check(cfg, tmp_path)
    if method == "full":
        assert (artifact / "config.json").is_file()
    elif method in ("bitfit", "adapter"):
        record = json.loads((artifact / METHOD_CONFIG_FILE).read_text())
        assert record["method"] == method and record["config"]["name"] == method
    else:  # the contract: a PEFT adapter loadable with PeftModel.from_pretrained
        assert (artifact / "adapter_config.json").is_file()
        assert (artifact / "adapter_model.safetensors").is_file()


def test_every_registered_method_has_a_case_and_a_config():
    from orchestrator.compose import CONF_DIR, compose

    covered = {c[1] for c in CASES} | {"qlora"}
    assert covered == set(METHODS)
    for name in METHODS:
        assert (CONF_DIR / "method" / f"{name}.yaml").is_file()
        extra = ["precision=nf4"] if name == "qlora" else []
        assert compose([f"method={name}", *extra]).method.name == name


def test_adapter_leaves_the_model_unchanged_at_init(base_dirs):
    cfg = cfg_for(base_dirs["fp"], "adapter")
    examples = random_examples()
    plain = logits(load_base_model(cfg, CPU), examples)
    adapted = METHODS["adapter"].apply(load_base_model(cfg, CPU), cfg)
    torch.testing.assert_close(logits(adapted, examples), plain, rtol=0, atol=0)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert all(".self_attn.bottleneck_adapter." in n or ".mlp.bottleneck_adapter." in n for n in names)


def test_bitfit_refuses_a_model_without_biases(tmp_path):
    """Validation reads config.json and refuses before anything runs; apply() still refuses a
    model whose config could not be read up front."""
    from transformers import LlamaForCausalLM

    config = tiny_config()
    config.attention_bias = config.mlp_bias = False
    LlamaForCausalLM(config).save_pretrained(tmp_path / "nobias")
    with pytest.raises(ConfigError, match="model_type llama"):
        cfg_for(tmp_path / "nobias", "bitfit")
    cfg = cfg_for(tmp_path / "unreadable", "bitfit")
    with pytest.raises(ValueError, match="no bias terms"):
        METHODS["bitfit"].apply(LlamaForCausalLM(config), cfg)


def test_load_trained_rejects_a_directory_that_is_no_artifact(base_dirs, tmp_path):
    cfg = cfg_for(base_dirs["fp"], "lora")
    with pytest.raises(FileNotFoundError, match="not a saved adapter"):
        load_trained(load_base_model(cfg, CPU), tmp_path)


# --- quantized bases: real bitsandbytes layers on CPU

def bnb_linear_classes(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}


@pytest.mark.parametrize("precision", ["fp32", "int8", "nf4", "fp4", "nf4+dq"])
def test_quantized_weights_count_the_parameters_they_encode(base_dirs, precision):
    base = load_base_model(cfg_for(base_dirs["4bit"], "lora", precision), CPU)
    reference = load_base_model(cfg_for(base_dirs["4bit"], "lora", "fp32"), CPU)
    assert count_parameters(base)[1] == count_parameters(reference)[1]


def test_qlora_nf4_double_quant_paged_adamw_8bit_trains(base_dirs, tmp_path):
    cfg = cfg_for(base_dirs["4bit"], "qlora", "nf4+dq", method_fields={"r": 4}, optimizer="paged_adamw_8bit")
    assert cfg.precision.double_quant
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        model, _ = train_and_check(cfg, tmp_path)
    assert "Linear4bit" in bnb_linear_classes(model)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"
                 and type(m).__module__.startswith("bitsandbytes")]
    assert len(quantized) == L * len(LINEARS)
    assert all(m.weight.quant_state.nested for m in quantized)  # double quantization
    assert all(m.weight.quant_state.quant_type == "nf4" for m in quantized)


def test_int8_lora_trains(base_dirs, tmp_path):
    cfg = cfg_for(base_dirs["4bit"], "lora", "int8", method_fields={"r": 4}, optimizer="paged_adamw_32bit")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        model, _ = train_and_check(cfg, tmp_path)
    assert "Linear8bitLt" in bnb_linear_classes(model)


# What sits on a quantized base: everything but full fine-tuning (and DoRA on int8 on CPU).
ON_QUANTIZED = [("fp4", "lora", {"use_dora": True}), ("nf4", "qlora", {"use_dora": True}),
                ("fp4", "qlora", {}), ("nf4", "adapter", {}), ("int8", "adapter", {}),
                ("nf4", "bitfit", {}), ("int8", "bitfit", {}), ("nf4", "ln_tuning", {}), ("int8", "ln_tuning", {}),
                ("nf4", "ia3", {}), ("int8", "ia3", {}), ("nf4", "prefix", {}), ("int8", "prompt", {}),
                ("nf4", "ptuning", {})]


@pytest.mark.parametrize("precision,method,fields", ON_QUANTIZED,
                         ids=[f"{m}{'_dora' if f else ''}-{p}" for p, m, f in ON_QUANTIZED])
def test_method_trains_on_a_quantized_base(base_dirs, tmp_path, precision, method, fields):
    lr = {"prefix": 5e-2, "prompt": 5e-2, "ia3": 5e-2}.get(method, 1e-2)
    cfg = cfg_for(base_dirs["4bit"], method, precision, method_fields=fields, lr=lr)
    model, _ = train_and_check(cfg, tmp_path)
    assert {"Linear4bit", "Linear8bitLt"} & bnb_linear_classes(model)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# --- refused combinations: validation fails before anything runs, naming the key

REFUSED = [
    ("qlora", "fp32", {}, {}, "precision.name", "qlora needs a 4-bit base"),
    ("qlora", "int8", {}, {}, "precision.name", "precision=nf4 or precision=fp4"),
    ("full", "int8", {}, {}, "precision.name", "cannot update int8"),
    ("full", "nf4", {}, {}, "precision.name", "cannot update nf4"),
    ("full", "fp4", {}, {}, "precision.name", "cannot update fp4"),
    ("lora", "fp16", {}, {}, "precision.name", "needs a GPU"),
    ("adapter", "nf4", {}, {}, None, None),  # allowed: the control case
    ("lora", "int8", {"use_dora": True}, {}, "method.use_dora", "DoRA on an int8 base fails on CPU"),
    ("full", "fp16", {}, {"use_gpu": True}, "precision.name", "inf"),
    ("bitfit", "fp16", {}, {"use_gpu": True}, "precision.name", "bitfit trains fp16 tensors"),
    ("ln_tuning", "fp16", {}, {"use_gpu": True}, "precision.name", "ln_tuning trains fp16 tensors"),
    ("prompt", "fp32", {"init": "text"}, {}, "method.init_text", "init=text needs"),
    ("prompt", "fp32", {"init": "zeros"}, {}, "method.init", "random, sample_vocab, text"),
    ("prefix", "fp32", {"num_virtual_tokens": 0}, {}, "method.num_virtual_tokens", "> 0"),
    ("ptuning", "fp32", {"encoder_type": "gru"}, {}, "method.encoder_type", "mlp, lstm"),
    ("ia3", "fp32", {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}, {},
     "method.feedforward_modules", "down_proj"),
    ("adapter", "fp32", {"bottleneck_size": 0}, {}, "method.bottleneck_size", "> 0"),
    ("adapter", "fp32", {"nonlinearity": "swish"}, {}, "method.nonlinearity", "relu"),
    ("prefix", "fp32", {}, {"gradient_checkpointing": True}, "train.gradient_checkpointing", "key/value cache"),
    ("prompt", "fp32", {}, {"gradient_checkpointing": True}, None, None),  # virtual tokens in the input: allowed
]


@pytest.mark.parametrize("method,precision,fields,train,key,fragment", REFUSED,
                         ids=[f"{r[0]}-{r[1]}-{r[4]}" for r in REFUSED])
def test_impossible_combination_is_refused_naming_the_key(tmp_path, method, precision, fields, train, key, fragment):
    if key is None:
        cfg_for(tmp_path, method, precision, method_fields=fields, **train)
        return
    with pytest.raises(ConfigError) as info:
        cfg_for(tmp_path, method, precision, method_fields=fields, **train)
    assert key in [k for k, _ in info.value.problems], info.value.problems
    assert fragment in str(info.value)


def test_fp16_compute_on_cpu_is_refused_and_allowed_on_gpu(tmp_path):
    raw = {"model": {"name_or_path": str(tmp_path)}, "data": {"train_file": "x.jsonl"}, "method": {"name": "lora"},
           "precision": {"name": "nf4", "compute_dtype": "fp16"}, "stage": {"name": "sft"}}
    with pytest.raises(ConfigError) as info:
        from_container(raw)
    assert [k for k, _ in info.value.problems] == ["precision.compute_dtype"]
    from_container({**raw, "train": {"use_gpu": True}})


def test_fp16_weights_validate_on_gpu_with_an_optimizer_that_keeps_fp32_math(tmp_path):
    # Config validation only: fp16 training needs a GPU (refused on CPU above), so no step runs here.
    for method in ("full", "bitfit", "ln_tuning"):
        cfg_for(tmp_path, method, "fp16", use_gpu=True, optimizer="adamw_8bit")


def test_hydra_refuses_qlora_without_a_4bit_precision(make_cfg):
    with pytest.raises(ConfigError) as info:
        make_cfg("method=qlora")
    assert ("precision.name" in [k for k, _ in info.value.problems]) and "precision=nf4" in str(info.value)
    assert make_cfg("method=qlora", "precision=fp4", "precision.double_quant=true").precision.double_quant


# --- sweeps

def test_peft_methods_sweep_covers_every_method_with_its_own_lr():
    from orchestrator.plan import make_plan

    plan = make_plan(["+sweep=peft_methods"])
    by_method = {}
    for trial in plan.trials:
        by_method.setdefault(trial.cfg.method.name, trial.cfg)
    assert set(by_method) == set(METHODS)
    lora_lr = by_method["lora"].train.lr
    assert by_method["full"].train.lr < lora_lr < by_method["prompt"].train.lr
    assert by_method["qlora"].precision.name == "nf4"
    assert len({t.cfg.train.max_steps for t in plan.trials}) == 1


def test_precision_and_qlora_sweeps_expand_as_documented():
    from orchestrator.plan import make_plan

    precision = make_plan(["+sweep=precision"])
    assert [(t.cfg.precision.name, t.cfg.precision.double_quant) for t in precision.trials] == [
        ("fp32", False), ("bf16", False), ("int8", False), ("nf4", False), ("fp4", False),
        ("nf4", True), ("fp4", True)]
    assert {t.cfg.method.name for t in precision.trials} == {"lora"}
    qlora = make_plan(["+sweep=qlora"])
    assert sorted((t.cfg.method.r, t.cfg.precision.name) for t in qlora.trials) == [
        (4, "fp4"), (4, "nf4"), (16, "fp4"), (16, "nf4")]
    assert all(t.cfg.train.optimizer == "paged_adamw_8bit" and t.cfg.precision.double_quant for t in qlora.trials)


# --- evaluation with virtual tokens

class DigitTokenizer:
    """What generate_answers needs from a tokenizer."""
    pad_token_id, eos_token_id = 0, 1

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
def test_batched_generation_matches_one_prompt_at_a_time(base_dirs, method):
    """Prompts of different lengths in one eval batch must not change the answers: virtual tokens
    placed before left padding would (prefix tuning's logits move by ~0.4 on this model)."""
    from trainers.data import EvalPrompt
    from trainers.evaluate import generate_answers

    cfg = cfg_for(base_dirs["fp"], method)
    model = METHODS[method].apply(load_base_model(cfg, CPU), cfg)
    generator = torch.Generator().manual_seed(1)
    prompts = [EvalPrompt(prompt_ids=torch.randint(3, V, (n,), generator=generator).tolist(), answer="")
               for n in (5, 9, 5, 12, 9, 7)]
    batched = generate_answers(model, DigitTokenizer(), prompts, 8, 4, CPU)
    single = [generate_answers(model, DigitTokenizer(), [p], 1, 4, CPU)[0] for p in prompts]
    assert batched == single


def test_prefix_tuned_generation_matches_a_manual_greedy_loop():
    """generate() with a KV cache ignores the prefix (transformers 5 + peft 0.21); the evaluator
    must decode prefix models so that the prefix counts."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.data import EvalPrompt
    from trainers.evaluate import generate_answers
    from trainers.methods import METHODS

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        tie_word_embeddings=True))

    from trainers.config import ExperimentConfig, PrecisionConfig
    from trainers.methods.prefix import PrefixConfig

    cfg = ExperimentConfig(method=PrefixConfig(num_virtual_tokens=4), precision=PrecisionConfig())
    model = METHODS["prefix"].apply(base, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)

    class Tok:
        pad_token_id, eos_token_id = 0, 63

        @staticmethod
        def decode(ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    prompt = [5, 9, 13, 2, 7]
    got = generate_answers(model, Tok, [EvalPrompt(prompt, "")], 8, 4, torch.device("cpu"))[0]
    cur = torch.tensor([prompt])
    model.eval()
    with torch.no_grad():
        for _ in range(4):
            nxt = model(input_ids=cur, attention_mask=torch.ones_like(cur)).logits[:, -1].argmax(-1, keepdim=True)
            cur = torch.cat([cur, nxt], 1)
    manual = cur[0, len(prompt):].tolist()
    if 63 in manual:
        manual = manual[:manual.index(63)]
    assert got == " ".join(map(str, manual))


# --- train.gradient_checkpointing: the same gradients, the layers really recomputed

def checkpointed_gradients(method: str, fields: dict, checkpointing: bool) -> tuple[dict, int]:
    """(gradients of one batch's loss on the embedded model, attention forwards run for it)."""
    cfg = from_container({"model": {"name_or_path": "embedded:base"}, "data": {"train_file": "unused.jsonl"},
                          "method": {"name": method, **fields}, "train": {"gradient_checkpointing": checkpointing},
                          "stage": {"name": "sft"}})
    torch.manual_seed(0)  # the same initial adapter both times
    model = METHODS[method].prepare(load_base_model(cfg, CPU), cfg)
    model.train()
    attention_calls = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module.register_forward_hook(lambda *_: attention_calls.append(1))
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(attention_calls)


# One case per method that can checkpoint (prefix cannot: refused above).
CHECKPOINTED = [c for c in CASES if c[1] != "prefix" and c[0] == c[1]] + [("dora", "lora", {"use_dora": True})]


@pytest.mark.parametrize("method,fields", [c[1:3] for c in CHECKPOINTED], ids=[c[0] for c in CHECKPOINTED])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(method, fields):
    plain, plain_calls = checkpointed_gradients(method, fields, False)
    checkpointed, calls = checkpointed_gradients(method, fields, True)
    assert calls == 2 * plain_calls  # each layer's forward runs again in backward
    assert plain.keys() == checkpointed.keys()
    assert sum(g.abs().sum() for g in plain.values()) > 0  # (LoRA's A alone gets none: B starts at 0)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, f"{name} got no gradient with checkpointing"
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("method,precision,fields", [("lora", "fp32", {"r": 4}), ("full", "fp32", {}),
                                                     ("qlora", "nf4", {"r": 4})])
def test_training_with_gradient_checkpointing_learns_and_generates_with_the_cache(base_dirs, tmp_path, method,
                                                                                  precision, fields):
    cfg = cfg_for(base_dirs["fp" if precision == "fp32" else "4bit"], method, precision, method_fields=fields,
                  max_steps=4, lr=1e-2 if method != "full" else 1e-3, gradient_checkpointing=True)
    model = METHODS[method].prepare(load_base_model(cfg, CPU), cfg)
    losses = RecordingTracker()
    torch.manual_seed(0)
    train_loop(model, random_examples(), cfg.train, 0, CPU, DistInfo(), losses)
    assert losses.losses[-1] < losses.losses[0] - 1e-3, losses.losses
    # evaluation and generation after training: no grad, so the layers run once with their cache
    model.eval()
    prompt = torch.tensor([random_examples(1, 6)[0].input_ids])
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                do_sample=False, use_cache=True)
        uncached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                  do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_4bit_base_trains_on_after_a_mid_training_evaluation(base_dirs):
    """bitsandbytes repacks a CPU 4-bit weight for its inference kernel when the layer runs in eval
    mode without grad; training must go on after such an evaluation (train.eval_every for ASHA)."""
    cfg = cfg_for(base_dirs["4bit"], "qlora", "nf4", max_steps=4, eval_every=2)
    model = METHODS["qlora"].apply(load_base_model(cfg, CPU), cfg)
    examples = random_examples()

    def evaluate(m):
        m.eval()
        with torch.no_grad():
            loss = m(input_ids=torch.tensor([examples[0].input_ids]), labels=torch.tensor([examples[0].input_ids])).loss
        m.train()
        return {"eval/loss": float(loss)}

    tracker = RecordingTracker()
    train_loop(model, examples, cfg.train, 0, CPU, DistInfo(), tracker, evaluate=evaluate)
    assert len(tracker.losses) == 4 and all(math.isfinite(x) for x in tracker.losses)
