"""The FLOPs model of a training step (trainers/flops.py) against torch's own count.

For every registered method (sft) and for the pair and RL stages, one real training step of a
tiny random Llama (forward and backward; DPO also its reference pass, RL its sampling, reward
scoring and reference) runs under torch.utils.flop_counter.FlopCounterMode, and the closed form
of the same batch lands within 5% of it. Eager attention, so that every matmul of the attention
is one the counter sees.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainers.config import DataConfig, ExperimentConfig, ModelConfig, PrecisionConfig, TrainConfig
from trainers.data import IGNORE_INDEX, EvalPrompt, Example, PairExample
from trainers.flops import Cost, StepCounter, planned_step
from trainers.methods import METHODS
from trainers.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
VOCAB = 128


def _gemm_4bit(a_shape, *args, out_shape=None, **kwargs) -> int:
    """bitsandbytes' 4-bit matmul (a QLoRA base's forward), which FlopCounterMode does not know."""
    return 2 * a_shape[-1] * int(torch.Size(out_shape).numel())


def counted(run) -> int:
    """FLOPs torch counts while `run()` executes."""
    mapping = {}
    if hasattr(torch.ops, "bitsandbytes") and hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
        mapping[torch.ops.bitsandbytes.gemm_4bit] = _gemm_4bit
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny Llama with biases (so BitFit has something to train), eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, attention_bias=True, mlp_bias=True,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def experiment(model_dir: str, method: str, stage: str = "sft", **stage_fields) -> ExperimentConfig:
    """Trial config of `method` at the first precision it accepts (fp32; QLoRA: nf4)."""
    spec = METHODS[method]
    for precision in ("fp32", "nf4"):
        cfg = ExperimentConfig(model=ModelConfig(name_or_path=model_dir, attn_implementation="eager"),
                               data=DataConfig(train_file="unused.jsonl", max_new_tokens=4),
                               method=spec.config_cls(), precision=PrecisionConfig(name=precision),
                               train=TrainConfig(batch_size=3), stage=RECIPES[stage].config_cls(**stage_fields))
        if not spec.combination_problems(cfg):
            return cfg
    raise AssertionError(f"no precision for {method}")


def load(cfg: ExperimentConfig, **kwargs):
    from trainers.model import load_base_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = METHODS[cfg.method.name].apply(load_base_model(cfg, CPU, **kwargs), cfg)
    return model.train()


def examples(lengths, seed: int = 0) -> list[Example]:
    """Random rows of these lengths, the first third of each a prompt (no loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        rows.append(Example(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    return rows


def one_step(model, loss_fn, batch) -> None:
    loss = loss_fn(model, batch)[0]
    loss.backward()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_training_step_of_every_method_costs_what_torch_counts(tiny_dir, method):
    from trainers.training import causal_lm_loss

    cfg = experiment(tiny_dir, method)
    model = load(cfg)
    batch = examples([21, 26, 17])
    measured = counted(lambda: one_step(model, causal_lm_loss(0, CPU), batch))
    cost = StepCounter(cfg, model.config)(batch)
    assert cost.flops == pytest.approx(measured, rel=0.05), (method, cost.flops, measured)
    assert cost.tokens == 3 * 26  # rows x padded width


def test_frozen_weights_cost_no_weight_gradients(tiny_dir):
    """The 5% above is tight enough to see a frozen weight's gradient: counting every base
    weight's gradient under LoRA (as if they trained) misses torch's count by far."""
    from trainers.flops import FlopsModel
    from trainers.training import causal_lm_loss

    cfg = experiment(tiny_dir, "lora")
    model = load(cfg)
    batch = examples([21, 26, 17])
    measured = counted(lambda: one_step(model, causal_lm_loss(0, CPU), batch))
    counter = StepCounter(cfg, model.config)
    rows = counter.stage.sequences(batch)
    assert counter.model.train(rows) == pytest.approx(measured, rel=0.05)
    wrong = dataclasses.replace(counter.model.terms, weights_train=True)
    assert FlopsModel(counter.model.shape, wrong).train(rows) > 1.2 * measured


def pairs(n: int) -> list[PairExample]:
    chosen, rejected = examples([18 + i for i in range(n)], 1), examples([15 + 2 * i for i in range(n)], 2)
    return [PairExample(c, r) for c, r in zip(chosen, rejected)]


def test_preference_stages_cost_both_sides_and_dpo_its_reference(tiny_dir):
    """reward (scalar head, trained), orpo and dpo (and its reference pass) on three pairs: chosen
    and rejected padded together; full fine-tuning and LoRA."""
    from transformers import AutoModelForSequenceClassification

    from trainers.recipes import dpo, orpo, reward

    batch = pairs(3)
    for method in ("lora", "full"):
        cfg = experiment(tiny_dir, method, "reward")
        model = load(cfg, model_class=AutoModelForSequenceClassification, num_labels=1)
        reward.train_head(model)
        measured = counted(lambda: one_step(model, reward.pairwise_loss(0, 1, CPU), batch))
        assert StepCounter(cfg, model.config)(batch).flops == pytest.approx(measured, rel=0.05), ("reward", method)

        cfg = experiment(tiny_dir, method, "orpo")
        model = load(cfg)
        measured = counted(lambda: one_step(model, orpo.orpo_loss(0.1, 0, CPU), batch))
        assert StepCounter(cfg, model.config)(batch).flops == pytest.approx(measured, rel=0.05), ("orpo", method)

        cfg = experiment(tiny_dir, method, "dpo")
        model = load(cfg)

        def dpo_step():
            scored = dpo.score_reference(model, batch, 0, 8, CPU)
            one_step(model, dpo.dpo_loss(0.1, 0.0, 0, CPU), list(scored))

        measured = counted(dpo_step)
        cost = StepCounter(cfg, model.config)(list(dpo.ScoredPairs(batch, [0.0] * 3, [0.0] * 3)))
        assert cost.flops == pytest.approx(measured, rel=0.05), ("dpo", method, cost.flops, measured)
        assert cost.tokens == 6 * 20  # chosen 18-20, rejected 15-19 tokens: padded to 20


class _Tokens:
    """What the RL loss reads of a tokenizer: its pad and eos ids, and decoding."""

    pad_token_id, eos_token_id = 0, VOCAB  # an eos the model cannot sample: every rollout is 4 tokens

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def test_an_rl_step_costs_its_sampling_scoring_reference_and_training(tiny_dir):
    """Two prompts x 3 rollouts of 4 new tokens (the eos is out of the vocabulary),
    scored by a reward model, the reference (LoRA's adapter off) and the trained forward."""
    from transformers import AutoModelForSequenceClassification

    from trainers.model import load_base_model
    from trainers.policy import Reference
    from trainers.recipes import rl

    cfg = experiment(tiny_dir, "lora", "rl", num_generations=3, reward_from="unused")
    model = load(cfg)
    reward_model = load_base_model(cfg, CPU, model_class=AutoModelForSequenceClassification, num_labels=1).eval()
    prompts = [EvalPrompt(e.input_ids[:n], "x") for e, n in zip(examples([12, 12]), (9, 12))]
    loss_fn = rl.grpo_loss(cfg.stage, Reference(model), reward_model, _Tokens(), 4, CPU)
    torch.manual_seed(0)
    measured = counted(lambda: one_step(model, loss_fn, prompts))
    cost = StepCounter(cfg, model.config)(prompts)
    assert cost.flops == pytest.approx(measured, rel=0.05), (cost.flops, measured)
    assert cost.tokens == 6 * (12 + 4)


def test_planned_step_follows_the_batch_virtual_tokens_and_accumulation(make_cfg):
    """The plan's per-step cost: full micro-batches of data.max_seq_len, x grad_accum; prompt
    tuning's virtual tokens cost FLOPs but are not data tokens; full fine-tuning costs more than
    LoRA (weight gradients of every weight), and about 1.5x a forward-and-input-gradient step."""
    lora = planned_step(make_cfg("method=lora"))
    assert lora.tokens == make_cfg().train.batch_size * make_cfg().data.max_seq_len
    doubled = planned_step(make_cfg("method=lora", "train.grad_accum=2"))
    assert doubled == Cost(2 * lora.flops, 2 * lora.tokens)
    prompt = planned_step(make_cfg("method=prompt"))
    assert prompt.tokens == lora.tokens and prompt.flops > planned_step(make_cfg("method=ia3")).flops
    full = planned_step(make_cfg("method=full"))
    assert 1.2 * lora.flops < full.flops < 1.6 * lora.flops
