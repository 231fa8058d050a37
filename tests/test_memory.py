"""The memory estimator and the CPU peak-memory measurement.

Closed-form trainable counts equal the real model's; the 4-bit/8-bit weight formula equals real
bitsandbytes layers; the estimate grows with batch, sequence and rank; PeakMemory counts what a
known allocation holds (and stops counting what was freed); the estimate of a tiny training run
lands near PeakMemory's measurement; the CLI answers for a known name and a config.json and
refuses an unknown model with a clear message.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from trainers import memory
from trainers.config import DataConfig, ExperimentConfig, ModelConfig, PrecisionConfig, TrainConfig
from trainers.methods import METHODS
from trainers.runtime import PeakMemory

CPU = torch.device("cpu")
MB = 10 ** 6


def tiny_config(tied=True, biases=True):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, attention_bias=biases, mlp_bias=biases,
                       tie_word_embeddings=tied)


def experiment(method: str, precision: str = "fp32", model: str = "embedded:base", **fields) -> ExperimentConfig:
    method_cfg = METHODS[method].config_cls()
    for key, value in fields.items():
        setattr(method_cfg, key, value)
    return ExperimentConfig(model=ModelConfig(name_or_path=model), data=DataConfig(train_file="unused.jsonl"),
                            method=method_cfg, precision=PrecisionConfig(name=precision))


def real_trainable(config, cfg) -> int:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = METHODS[cfg.method.name].apply(LlamaForCausalLM(config), cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --- trainable parameters: closed form == the real model


@pytest.mark.parametrize("method, fields", [
    ("full", {}), ("bitfit", {}), ("ln_tuning", {}), ("prompt", {"num_virtual_tokens": 5}),
    ("lora", {"r": 4}), ("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}),
    ("lora", {"r": 4, "use_dora": True}), ("ia3", {}), ("prefix", {"num_virtual_tokens": 3}),
    ("ptuning", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}), ("adapter", {"bottleneck_size": 8}),
])
def test_trainable_params_closed_form_matches_model(method, fields):
    config = tiny_config()
    cfg = experiment(method, **fields)
    assert memory.trainable_params(config, cfg) == real_trainable(config, cfg)


def test_full_count_untied_without_biases():
    config = tiny_config(tied=False, biases=False)
    cfg = experiment("full")
    assert memory.trainable_params(config, cfg) == real_trainable(config, cfg)
    assert memory.ModelShape.of(config).bias_params() == 0


# --- quantized weights: formula == real bitsandbytes layers


def bnb_layer_bytes(fmt: str, double_quant: bool, fan_in=256, fan_out=192) -> int:
    import bitsandbytes as bnb

    weight = torch.randn(fan_out, fan_in)
    if fmt == "int8":
        layer = bnb.nn.Linear8bitLt(fan_in, fan_out, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(fan_in, fan_out, bias=False, compress_statistics=double_quant, quant_type=fmt)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant, quant_type=fmt)
    param = layer.to("cpu").weight  # quantizes
    tensors, state = [param.data], getattr(param, "quant_state", None)
    while state is not None:
        tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
        state = state.state2
    if getattr(param, "SCB", None) is not None:
        tensors.append(param.SCB)
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("fmt, double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("int8", False)])
def test_quantized_weight_formula_matches_bitsandbytes(fmt, double_quant):
    measured = bnb_layer_bytes(fmt, double_quant)
    formula = memory.quantized_linear_bytes(256, 192, fmt, double_quant)
    assert formula == pytest.approx(measured, rel=0.02)


def test_bits_per_param_of_4bit_formats():
    n = 4096 * 4096
    assert 8 * memory.quantized_linear_bytes(4096, 4096, "nf4") / n == pytest.approx(4.5, abs=0.01)
    assert 8 * memory.quantized_linear_bytes(4096, 4096, "nf4", double_quant=True) / n == pytest.approx(4.127,
                                                                                                       abs=0.01)


# --- the estimate


def test_llama2_7b_sanity():
    shape = memory.load_shape("llama-2-7b")
    assert shape.total_params() == pytest.approx(6.74e9, rel=0.01)
    full = memory.estimate(experiment("full", "fp32", "llama-2-7b"), seq_len=512)
    states = full.weights.bytes + full.gradients.bytes + full.optimizer_states.bytes
    assert states == 16 * shape.total_params()  # fp32 AdamW: weights, grads, 2 states
    assert 105e9 < states < 130e9
    qlora = memory.estimate(experiment("qlora", "nf4", "llama-2-7b"), seq_len=512)
    assert 4e9 < qlora.weights.bytes < 5e9


def test_estimate_grows_with_batch_sequence_and_rank():
    shape = memory.load_shape("llama-3-8b")

    def peak(batch=4, seq=256, r=8, method="lora", precision="bf16"):
        cfg = experiment(method, precision, "llama-3-8b", **({"r": r} if method != "full" else {}))
        cfg.train = TrainConfig(batch_size=batch)
        cfg.data.eval_file = None  # training only: the eval pass does not depend on these
        return memory.estimate(cfg, shape, seq_len=seq).peak_bytes

    assert peak(batch=2) < peak(batch=4) < peak(batch=8)
    assert peak(seq=128) < peak(seq=256) < peak(seq=1024)
    assert peak(r=4) < peak(r=16) < peak(r=64)
    assert peak(method="qlora", precision="nf4", batch=1) < peak(method="lora", batch=1) < peak(method="full", batch=1)


def test_estimate_reads_config_json_and_table(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    cfg = experiment("lora", model=str(tmp_path))
    est = memory.estimate(cfg)
    assert est.total_bytes == est.peak_bytes + memory.RUNTIME_OVERHEAD["cpu"]
    assert est.peak_bytes > 0
    table = est.table()
    for part in ("weights", "optimizer states", "activations", "eval pass", "= peak (tensors)"):
        assert part in table


def test_unknown_model_is_refused():
    with pytest.raises(memory.UnknownModelError, match="known names"):
        memory.load_shape("no-such-model-7b")


# --- PeakMemory on CPU


def test_peak_memory_counts_a_known_allocation_and_forgets_freed_tensors():
    meter = PeakMemory(CPU)
    meter.start()
    big = torch.empty(10_000_000)  # 40 MB
    view = big[1000:]  # same storage: counted once
    del big, view
    small = torch.ones(1_000_000)  # 4 MB, allocated after the 40 MB were freed
    again = torch.zeros(2_000_000)
    assert 40 * MB <= meter.peak_bytes() < 41 * MB
    del small, again

    meter = PeakMemory(CPU)
    meter.start()
    kept = torch.empty(2_000_000)  # 8 MB
    assert 8 * MB <= meter.peak_bytes() < 9 * MB  # the freed 40 MB count no more
    del kept


def test_peak_memory_ignores_earlier_tensors_and_sees_backward():
    existing = torch.randn(3_000_000, requires_grad=True)  # 12 MB, made before start()
    meter = PeakMemory(CPU)
    meter.start()
    product = existing * 2  # 12 MB, kept alive
    product.sum().backward()  # 12 MB gradient, allocated inside autograd's backward
    peak = meter.peak_bytes()
    assert 24 * MB <= peak < 25 * MB
    assert existing.grad is not None


def test_a_meter_left_running_is_stopped_by_the_next_start():
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    PeakMemory(CPU).start()  # e.g. a trial that raised before peak_bytes()
    meter = PeakMemory(CPU)
    meter.start()
    meter.peak_bytes()
    assert _get_current_dispatch_mode() is None


def test_estimate_matches_measured_training_peak(tmp_path):
    """A tiny LoRA / full run: PeakMemory over training vs the estimate's training peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.data import Example
    from trainers.methods import METHODS
    from trainers.model import load_base_model
    from trainers.runtime import DistInfo
    from trainers.tracking import Tracker
    from trainers.training import train_loop

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 512, (8, 48), generator=generator).tolist()
    # rows of different lengths, as real data has: batches are padded and carry an attention mask
    examples = [Example(input_ids=row[:40 + i], labels=row[:40 + i]) for i, row in enumerate(rows)]
    for method in ("lora", "full"):
        cfg = experiment(method, model=str(tmp_path))
        cfg.data.eval_file = None
        cfg.train = TrainConfig(max_steps=3, batch_size=8, log_every=3)
        meter = PeakMemory(CPU)
        meter.start()
        model = METHODS[method].apply(load_base_model(cfg, CPU), cfg)
        train_loop(model, examples, cfg.train, 0, CPU, DistInfo(), Tracker())
        measured = meter.peak_bytes()
        predicted = memory.estimate(cfg, seq_len=48).train_peak_bytes
        assert predicted == pytest.approx(measured, rel=0.10), method
        del model


def test_estimate_of_a_padding_free_run_follows_its_token_budget(tmp_path):
    """data.packing=padding_free: the estimate is of one row of the token budget, whatever
    train.batch_size says, and lands within 10% of PeakMemory's measurement of such a run."""
    from trainers.data import DatasetStats, padding_free_rows
    from trainers.model import load_base_model
    from trainers.runtime import DistInfo
    from trainers.tracking import Tracker
    from trainers.training import train_loop

    examples = _tiny_llama_and_examples(tmp_path, hidden=64, mlp=128, layers=2, rows=24, width=48, shortest=25)
    budget = 384
    free = padding_free_rows(examples, budget, "error", seed=0, stats=DatasetStats())
    for method in ("lora", "full"):
        cfg = experiment(method, model=str(tmp_path))
        cfg.data.eval_file, cfg.data.packing, cfg.data.max_tokens_per_batch = None, "padding_free", budget
        cfg.train = TrainConfig(max_steps=3, batch_size=8, log_every=3)
        meter = PeakMemory(CPU)
        meter.start()
        model = METHODS[method].apply(load_base_model(cfg, CPU), cfg)
        train_loop(model, free, TrainConfig(max_steps=3, batch_size=1, log_every=3), 0, CPU, DistInfo(), Tracker())
        measured = meter.peak_bytes()
        predicted = memory.estimate(cfg)  # default: one row of the budget
        assert predicted.seq_len == budget
        assert predicted.train_peak_bytes == pytest.approx(measured, rel=0.10), method
        for batch_size in (1, 32):  # the budget, not the row count, sizes a padding-free batch
            cfg.train.batch_size = batch_size
            assert memory.estimate(cfg).train_peak_bytes == predicted.train_peak_bytes
        del model


def _tiny_llama_and_examples(path, hidden: int, mlp: int, layers: int, rows: int, width: int,
                             shortest: int) -> list:
    """A random tiny Llama (vocab 512) saved in `path`, and `rows` random examples of lengths
    shortest, shortest + 1, ... (at most `width`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.data import Example

    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    ids = torch.randint(3, 512, (rows, width), generator=torch.Generator().manual_seed(0)).tolist()
    return [Example(input_ids=row[:shortest + i], labels=row[:shortest + i], source=str(i)) for i, row in enumerate(ids)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_estimate_of_a_checkpointed_run_matches_its_measured_peak(tmp_path, padding_free):
    """train.gradient_checkpointing: layers keep only their inputs, one is recomputed at a time.
    Six layers wide enough that activations, not logits, make the peak: the estimate without
    checkpointing is far above what such a run measures, the checkpointed one within 10%."""
    from trainers.data import DatasetStats, padding_free_rows
    from trainers.model import load_base_model
    from trainers.runtime import DistInfo
    from trainers.tracking import Tracker
    from trainers.training import train_loop

    examples = _tiny_llama_and_examples(tmp_path, hidden=128, mlp=384, layers=6, rows=8, width=64, shortest=57)
    for method in ("lora", "full"):
        cfg = experiment(method, model=str(tmp_path))
        cfg.data.eval_file = None
        cfg.train = TrainConfig(max_steps=3, batch_size=8, log_every=3, gradient_checkpointing=True)
        items, loop = examples, cfg.train
        if padding_free:
            cfg.data.packing, cfg.data.max_tokens_per_batch = "padding_free", 512
            items = padding_free_rows(examples, 512, "error", seed=0, stats=DatasetStats())
            loop = TrainConfig(max_steps=3, batch_size=1, log_every=3)
        meter = PeakMemory(CPU)
        meter.start()
        model = METHODS[method].prepare(load_base_model(cfg, CPU), cfg)
        train_loop(model, items, loop, 0, CPU, DistInfo(), Tracker())
        measured = meter.peak_bytes()
        seq_len = None if padding_free else 64
        predicted = memory.estimate(cfg, seq_len=seq_len).train_peak_bytes
        assert predicted == pytest.approx(measured, rel=0.10), method
        cfg.train.gradient_checkpointing = False
        assert memory.estimate(cfg, seq_len=seq_len).train_peak_bytes > 1.5 * measured, method
        del model


def test_a_planned_run_watches_the_first_step_and_one_step_per_uncovered_shape():
    from trainers.runtime import steps_to_watch

    # steps 1-5 (index 0-4): (8, 20) first, then (8, 25) twice, (8, 22), a last short batch (3, 30)
    shapes = [(8, 20), (8, 25), (8, 22), (8, 25), (3, 30)]
    assert steps_to_watch(shapes) == {0, 1, 4}  # (8, 22) is covered by (8, 25); (3, 30) is wider
    assert steps_to_watch([(8, 27), (8, 20), (8, 21)]) == {0, 2}  # the widest later step, not the first
    assert steps_to_watch([(8, 20), None, (8, 19)]) == {0, 1, 2}  # unknown shapes are watched
    assert steps_to_watch([(4, 9)]) == {0} and steps_to_watch([]) == set()


def test_a_planned_meter_skips_what_the_plan_leaves_out():
    meter = PeakMemory(CPU)
    meter.start()
    meter.plan([(4, 10), (4, 9), (4, 12)])  # step 2 is covered by step 3
    meter.begin_step()
    first = torch.empty(1_000_000)  # 4 MB
    meter.end_step()
    meter.begin_step()
    skipped = torch.empty(10_000_000)  # 40 MB the meter does not see
    meter.end_step()
    del skipped
    meter.begin_step()
    third = torch.empty(2_000_000)  # 8 MB
    meter.end_step()
    assert 12 * MB <= meter.peak_bytes() < 13 * MB
    assert meter.steps_watched == 2
    del first, third


def test_watching_only_the_steps_that_can_raise_it_finds_the_same_training_peak(tmp_path):
    """Rows of 8-39 tokens in shuffled batches: the watched steps' peak is the every-step peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.data import Example
    from trainers.model import load_base_model
    from trainers.runtime import DistInfo
    from trainers.tracking import Tracker
    from trainers.training import train_loop

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    rows = torch.randint(3, 512, (32, 40), generator=torch.Generator().manual_seed(0)).tolist()
    examples = [Example(input_ids=row[:8 + i], labels=row[:8 + i]) for i, row in enumerate(rows)]
    cfg = experiment("lora", model=str(tmp_path))
    cfg.train = TrainConfig(max_steps=16, batch_size=4, log_every=16, checkpoint_every=0)
    peaks, watched = {}, {}
    for sampled in (False, True):
        meter = PeakMemory(CPU)
        meter.start()
        model = METHODS["lora"].apply(load_base_model(cfg, CPU), cfg)
        train_loop(model, examples, cfg.train, 0, CPU, DistInfo(), Tracker(), memory=meter if sampled else None)
        peaks[sampled], watched[sampled] = meter.peak_bytes(), meter.steps_watched
        del model
    assert peaks[True] == pytest.approx(peaks[False], rel=0.01)
    assert watched[True] == 2 and watched[False] == 0  # the first step and the widest later one


# --- the command line


def test_cli_known_name(capsys):
    assert memory.main(["llama-2-7b", "--methods", "full,lora,qlora", "--precisions", "bf16,nf4"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in
             (["full"], ["lora"], ["qlora"])}
    assert lines["full"][1] == "n/a" and lines["qlora"][0] == "n/a"  # full on nf4, qlora on bf16
    assert float(lines["qlora"][1]) < float(lines["lora"][0]) < float(lines["full"][0])


def test_cli_config_json_with_breakdown(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config().to_dict()))
    assert memory.main([str(path), "--precisions", "fp32", "--methods", "lora", "--breakdown"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "optimizer states" in out and "activations" in out


def test_cli_stage_defaults_to_the_configured_one(capsys):
    """--stage estimates another stage with its recipe's terms; without it, conf/config.yaml's
    stage (sft: one sequence per row, no stage note)."""
    args = ["llama-3-8b", "--precisions", "bf16", "--methods", "lora", "--breakdown"]
    assert memory.main(args) == 0
    default = capsys.readouterr().out
    assert memory.main(args + ["--stage", "dpo"]) == 0
    dpo = capsys.readouterr().out
    assert "chosen + rejected" in dpo and "chosen + rejected" not in default
    assert memory.main(args + ["--stage", "sft"]) == 0
    assert capsys.readouterr().out == default


def test_a_stage_adds_to_memory_what_its_recipe_entry_says(monkeypatch):
    """A new stage's memory is its RecipeSpec.memory_terms: no name is known to the estimator."""
    from dataclasses import dataclass

    from trainers.memory.terms import StageTerms
    from trainers.recipes import RECIPES, RecipeSpec, StageConfig

    @dataclass
    class ProbeConfig(StageConfig):
        name: str = "probe"

    def terms(cfg, method_terms):
        return StageTerms(sequences_per_row=2, model_copies=2, scalar_head=True, note="probe: two of everything")

    monkeypatch.setitem(RECIPES, "probe", RecipeSpec(name="probe", config_cls=ProbeConfig, run=lambda ctx: {},
                                                      memory_terms=terms))
    plain, probe = experiment("lora", model="llama-3-8b"), experiment("lora", model="llama-3-8b")
    plain.stage, probe.stage = RECIPES["sft"].config_cls(), ProbeConfig()
    before, after = memory.estimate(plain, seq_len=128), memory.estimate(probe, seq_len=128)
    assert after.weights.bytes == 2 * before.weights.bytes
    assert "128,256 vocab" in before.logits.note and " 1 vocab" in after.logits.note
    assert after.activations.bytes > 1.9 * before.activations.bytes
    assert after.notes == ["probe: two of everything"] and before.notes == []


def test_cli_unknown_model_exits_nonzero_with_message():
    result = subprocess.run([sys.executable, "-m", "trainers.memory", "no-such-model-7b"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "unknown model 'no-such-model-7b'" in result.stderr and "llama-2-7b" in result.stderr


# --- the preference stages: dpo, orpo and rl, estimate vs measured


def test_estimate_matches_measured_peak_of_dpo_orpo_and_rl(make_cfg, tmp_path):
    """Real dpo, orpo and rl trials (embedded model and pairs, 2 steps, with evaluation): the
    estimate at the trial's sequence lengths lands within 10% of mem/peak_bytes. DPO and ORPO score
    chosen and rejected together; RL trains on prompt + max_new_tokens rollouts and holds a reward model, and
    with full fine-tuning a frozen reference copy too; with train.gradient_checkpointing the policy's
    layers keep only their inputs."""
    from trainers.data import load_rows, prompts_with_answers
    from trainers.model import load_tokenizer
    from trainers.context import TrialContext
    from trainers.recipes.base import load_preference_splits
    from trainers.trial import run_trial

    common = ["data=embedded_pref", "train.checkpoint_every=0", "train.log_every=1", "train.max_steps=2",
              "data.max_train_rows=4", "data.max_eval_rows=8", "train.batch_size=4", "train.eval_batch_size=8"]
    reward = make_cfg(*common, "stage=reward", "method=lora")
    run_trial(reward, tmp_path / "reward")
    tokenizer = load_tokenizer(reward.model)
    splits = load_preference_splits(TrialContext(reward, tmp_path / "splits", CPU), tokenizer, with_prompts=True)
    fmt, rows, sources = load_rows(reward.data.train_file, "preference", reward.data.max_train_rows)
    prompts, _ = prompts_with_answers(tokenizer, rows, sources, fmt, reward.data.max_seq_len, "error")
    longest_pair = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in splits.train)
    eval_pair = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in splits.eval_pairs)
    lengths = {"dpo": (longest_pair, eval_pair), "orpo": (longest_pair, eval_pair),
               "rl": (max(len(p.prompt_ids) for p in prompts), max(len(p.prompt_ids) for p in splits.eval_prompts))}
    checkpointed = ["train.gradient_checkpointing=true"]
    for stage, method, extra in (("dpo", "lora", []), ("orpo", "lora", []), ("rl", "lora", []), ("rl", "full", []),
                                 ("dpo", "full", checkpointed), ("rl", "lora", checkpointed)):
        if stage == "rl":
            extra = extra + ["stage.num_generations=4", f"stage.reward_from={tmp_path / 'reward'}"]
        cfg = make_cfg(*common, f"stage={stage}", f"method={method}", *extra)
        measured = run_trial(cfg, tmp_path / f"{stage}_{method}_{len(extra)}")["mem/peak_bytes"]
        seq, eval_seq = lengths[stage]
        predicted = memory.estimate(cfg, seq_len=seq, eval_seq_len=eval_seq).peak_bytes
        assert predicted == pytest.approx(measured, rel=0.10), (stage, method, predicted, measured)
