"""The preference stages (reward, dpo, orpo, rl) without Ray, on a tiny random Llama and a toy task where
a positive word (good, fine, nice) is preferred to a negative one (bad, poor, awful), and `good`
is the known right answer: the reward model learns to rank the pairs, DPO's margin grows, RL's
mean reward grows. Each stage starts from a shared SFT output
(`stage.init_from`) that answers `good` or `bad` about equally, so the chain is exercised too:
lineage, merging the upstream adapter, reloading a trained reward model.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from trainers.tracking import Tracker

CPU = torch.device("cpu")
N_TRAIN, N_EVAL = 48, 16  # prompts "pick a word N": N < N_TRAIN train, the next N_EVAL held out
VOCAB = (["<pad>", "<s>", "</s>", "[UNK]", "###", "Instruction", "Response", ":", "pick", "a", "word", "good", "fine", "nice", "bad", "poor", "awful"]
         + [str(n) for n in range(N_TRAIN + N_EVAL)])


class RecordingTracker(Tracker):
    def __init__(self):
        self.steps: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step=None):
        if step is not None:
            self.steps.append((step, dict(metrics)))

    def series(self, name: str) -> list[float]:
        return [m[name] for _, m in self.steps if name in m]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """{"model": dir, "sft": jsonl, "pref_train": jsonl, "pref_eval": jsonl}: a word-level tokenizer
    and a tiny random Llama saved together, and the toy data."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("toy")
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="[UNK]")
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(VOCAB), tie_word_embeddings=True,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(root / "model")

    def write(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(root / name)

    prompt = "pick a word {}".format

    def pair(n, chosen):
        return {"prompt": prompt(n), "chosen": chosen, "rejected": ("bad", "poor", "awful")[n // 3 % 3]}

    return {
        "model": str(root / "model"),
        # Each prompt answered bad, bad, good: the SFT policy says `bad` greedily and `good` a third
        # of the time when sampling, which leaves RL something to find.
        "sft": write("sft.jsonl", [{"instruction": prompt(n), "output": word}
                                   for n in range(N_TRAIN) for word in ("bad", "bad", "good")]),
        "pref_train": write("pref_train.jsonl", [pair(n, ("good", "fine", "nice")[n % 3]) for n in range(N_TRAIN)]),
        "pref_eval": write("pref_eval.jsonl", [pair(n, "good") for n in range(N_TRAIN, N_TRAIN + N_EVAL)]),
        "root": root,
    }


def stage_cfg(make_cfg, toy, *overrides):
    return make_cfg(f"model.name_or_path={toy['model']}", "train.checkpoint_every=0", "train.log_every=1",
                    "train.eval_batch_size=32", "train.warmup_ratio=0", "train.scheduler=constant",
                    "data.max_new_tokens=2", *overrides)


def pref_data(toy):
    return ["data=embedded_pref", f"data.train_file={toy['pref_train']}", f"data.eval_file={toy['pref_eval']}"]


@pytest.fixture(scope="module")
def sft_dir(toy):
    """A policy that answers `bad` (two thirds) or `good` (a third): the start of every stage.
    Fully fine-tuned (its artifact is model/), so the stages after it merge a full model and put
    LoRA adapters of their own on top."""
    from orchestrator.compose import compose
    from trainers.trial import run_trial

    cfg = compose([f"model.name_or_path={toy['model']}", "train.checkpoint_every=0", f"data.train_file={toy['sft']}",
                   "data.eval_file=null", "method=full", "train.max_steps=150", "train.lr=1e-2", "train.log_every=50"])
    out = toy["root"] / "sft"
    run_trial(cfg, out)
    return str(out)


@pytest.fixture(scope="module")
def reward_run(toy, sft_dir):
    from orchestrator.compose import compose
    from trainers.trial import run_trial

    cfg = compose([f"model.name_or_path={toy['model']}", "train.checkpoint_every=0", *pref_data(toy),
                   "stage=reward", f"stage.init_from={sft_dir}", "train.max_steps=60", "train.lr=1e-2",
                   "train.log_every=1"])
    tracker = RecordingTracker()
    out = toy["root"] / "reward"
    metrics = run_trial(cfg, out, tracker=tracker)
    return cfg, str(out), metrics, tracker


def test_reward_model_ranks_held_out_pairs_above_chance(reward_run):
    _, out, metrics, tracker = reward_run
    assert metrics["eval/pairwise_accuracy"] >= 0.9 and metrics["eval/reward_margin"] > 1.0
    margins = tracker.series("reward/margin")
    assert abs(margins[0]) < 0.5 < margins[-1]  # a fresh head barely separates; the trained one does
    assert sum(tracker.series("reward/accuracy")[-5:]) / 5 >= 0.9
    lineage = json.loads(open(f"{out}/lineage.json").read())
    assert lineage["task"] == "sequence_classification" and lineage["stage"] == "reward"


def test_a_recipe_without_its_own_estimate_gets_the_trials(reward_run):
    _, _, metrics, _ = reward_run
    assert metrics["mem/estimated_peak_bytes"] > 0


def test_saved_reward_model_reloads_to_the_logged_scores(reward_run, toy):
    """The adapter (with its score head) and the upstream SFT adapter merge back into the model
    that was evaluated: the reloaded reward model reproduces the logged eval numbers."""
    from trainers.data import load_rows, tokenize_pairs
    from trainers.model import load_tokenizer
    from trainers.recipes.inputs import load_reward_model
    from trainers.recipes.reward import evaluate_pairs

    cfg, out, metrics, _ = reward_run
    tokenizer = load_tokenizer(cfg.model)
    model = load_reward_model(cfg, out, CPU, tokenizer.pad_token_id)
    assert not any(p.requires_grad for p in model.parameters())
    _, rows, sources = load_rows(toy["pref_eval"], "preference")
    pairs, _ = tokenize_pairs(tokenizer, rows, sources, cfg.data.max_seq_len, "error")
    again = evaluate_pairs(model, pairs, tokenizer.pad_token_id, tokenizer.eos_token_id, 32, CPU)
    assert again["eval/pairwise_accuracy"] == metrics["eval/pairwise_accuracy"]
    assert again["eval/reward_margin"] == pytest.approx(metrics["eval/reward_margin"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_dpo_margin_grows_and_held_out_pairs_rank_right(make_cfg, toy, sft_dir, tmp_path, nll_weight):
    from trainers.trial import run_trial

    cfg = stage_cfg(make_cfg, toy, *pref_data(toy), "stage=dpo", f"stage.init_from={sft_dir}", "train.max_steps=60",
                    "train.lr=5e-3", "stage.beta=0.5", f"stage.nll_weight={nll_weight}")
    tracker = RecordingTracker()
    metrics = run_trial(cfg, tmp_path / "dpo", tracker=tracker)
    margins = tracker.series("dpo/reward_margin")
    assert margins[0] == pytest.approx(0.0, abs=1e-4)  # the untrained policy is the reference
    # One step's margin is one batch of 8 pairs (it swings by +-1 here): the mean of the last 10 steps.
    assert statistics.fmean(margins[-10:]) > margins[0] + 0.25, margins
    if not nll_weight:
        assert metrics["eval/reward_margin"] > 0.5 and metrics["eval/pairwise_accuracy"] == 1.0
    else:  # RPO also makes the chosen answers likely: the greedy answer turns from bad to good
        nll = tracker.series("dpo/chosen_nll")
        assert nll[-1] < nll[0] / 2
        assert metrics["eval/accuracy_init"] == 0.0 and metrics["eval/accuracy"] == 1.0


def test_rl_mean_reward_grows_against_the_trained_reward_model(make_cfg, toy, sft_dir, reward_run, tmp_path):
    from trainers.trial import run_trial

    _, reward_dir, _, _ = reward_run
    cfg = stage_cfg(make_cfg, toy, *pref_data(toy), "stage=rl", f"stage.init_from={sft_dir}",
                    f"stage.reward_from={reward_dir}", "train.max_steps=15", "train.batch_size=8", "train.lr=3e-3",
                    "stage.num_generations=4")
    tracker = RecordingTracker()
    metrics = run_trial(cfg, tmp_path / "rl", tracker=tracker)
    rewards = tracker.series("rl/reward_mean")
    assert len(rewards) == 15 and all(name in tracker.steps[0][1] for name in ("rl/kl", "rl/response_length"))
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.5, rewards
    accuracy = tracker.series("rl/accuracy")  # rollouts that say `good`
    assert sum(accuracy[-3:]) > sum(accuracy[:3]), accuracy
    assert metrics["eval/accuracy_init"] == 0.0 and metrics["eval/accuracy"] == 1.0  # greedy: bad -> good
    assert metrics["eval/reward_mean"] > metrics["eval/reward_mean_init"]


def test_continued_sft_starts_from_the_merged_upstream(make_cfg, toy, sft_dir):
    """stage.init_from: the starting model is the upstream's, its adapter merged into the weights."""
    from trainers.methods import load_trained
    from trainers.model import load_base_model
    from trainers.recipes.inputs import load_start
    from trainers.trial import run_trial

    lora = stage_cfg(make_cfg, toy, f"data.train_file={toy['sft']}", "data.eval_file=null", f"stage.init_from={sft_dir}",
                     "train.max_steps=5", "train.lr=1e-2")
    metrics = run_trial(lora, toy["root"] / "sft_continued")
    assert metrics["mem/estimated_peak_bytes"] > 0  # the recipe's estimate, for the batch shapes it had
    cfg = stage_cfg(make_cfg, toy, f"data.train_file={toy['sft']}", f"stage.init_from={toy['root'] / 'sft_continued'}")
    start = load_start(cfg, CPU)
    upstream = load_trained(load_base_model(lora, CPU), f"{sft_dir}/model")
    reference = load_trained(upstream, toy["root"] / "sft_continued" / "adapter")
    ids = torch.tensor([[1, 4, 5, 7, 8, 9, 10, 20, 4, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(start(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)
    assert type(start).__name__ == "LlamaForCausalLM"  # merged: no adapter left around it


def test_stage_inputs_must_be_finished_outputs_of_the_right_kind(make_cfg, toy, sft_dir, tmp_path):
    from trainers.recipes.inputs import load_reward_model, load_start

    cfg = stage_cfg(make_cfg, toy, *pref_data(toy), "stage=dpo", f"stage.init_from={tmp_path}")
    with pytest.raises(FileNotFoundError, match="stage.init_from=.*no lineage.json"):
        load_start(cfg, CPU)
    with pytest.raises(ValueError, match="stage.reward_from=.*needs a reward model"):
        load_reward_model(cfg, sft_dir, CPU, 0)


@pytest.mark.parametrize("overrides,key,fragment", [
    (["stage=rl", "data=embedded_pref"], "stage.reward_from", "required"),
    (["stage=rl", "data=embedded_pref", "stage.reward_from=x", "stage.num_generations=1"], "stage.num_generations",
     ">= 2"),
    (["stage=dpo"], "data.format", "trains on preference data"),
    (["stage=dpo", "data=embedded_pref", "stage.beta=0"], "stage.beta", "must be > 0"),
    (["stage=orpo", "data=embedded_pref", "stage.beta=0"], "stage.beta", "must be > 0"),
    (["stage=orpo", "data=embedded_pref", "method=prefix"], "method.name", "merges into the model"),
    (["stage=reward", "data=embedded_pref", "method=prefix"], "method.name", "merges into the model"),
])
def test_stage_configs_are_checked_naming_the_key(make_cfg, overrides, key, fragment):
    from trainers.config import ConfigError

    with pytest.raises(ConfigError) as err:
        make_cfg(*overrides)
    assert any(k == key and fragment in msg for k, msg in err.value.problems), err.value.problems


def test_dpo_loss_and_margins_match_trl_dpo_trainer(toy, sft_dir, tmp_path):
    """The dpo stage runs its own loss inside trainers' loop (checkpoints, faults, DDP, MLflow
    names); TRL's DPOTrainer is the reference it must agree with: same pairs, same policy and
    reference model, same beta -> the same sigmoid loss, implicit reward margin and accuracy."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trainers.data import IGNORE_INDEX, load_rows, pad_batch, tokenize_pairs
    from trainers.recipes.dpo import dpo_loss, score_reference

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    _, rows, sources = load_rows(toy["pref_train"], "preference", 8)
    pairs, _ = tokenize_pairs(tokenizer, rows, sources, 64, "error")
    reference = AutoModelForCausalLM.from_pretrained(f"{sft_dir}/model").eval()
    policy = AutoModelForCausalLM.from_pretrained(f"{sft_dir}/model")
    torch.manual_seed(3)
    with torch.no_grad():  # a policy that has moved away from the reference, both ways per pair
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    policy.eval()
    beta, cpu = 0.1, torch.device("cpu")

    scored = score_reference(reference, pairs, tokenizer.pad_token_id, 8, cpu)
    ours, _, logs = dpo_loss(beta, 0.0, tokenizer.pad_token_id, cpu)(policy, scored)

    # TRL 1.16 defaults to bf16 autocast (on its reference model too): compare in fp32
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows))
    batch = pad_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE_INDEX).long()}
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    assert abs(ours.item() - 0.6931) > 1e-3  # the policy differs from the reference: a real comparison
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert logs["dpo/reward_margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert logs["dpo/chosen_reward"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert logs["dpo/reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)


def test_orpo_loss_log_odds_and_rewards_match_trl_orpo_trainer(toy, sft_dir, tmp_path):
    """The orpo stage's loss against TRL's ORPOTrainer (trl.experimental) on one batch: same pairs,
    same model, same beta -> the same odds-ratio term, log odds, rewards and accuracy. One term is
    ours by choice: TRL's NLL counts the prompt tokens too, ours the response only (as the paper and
    the sft stage); it is checked against transformers' own loss on the labelled tokens, and the
    total is TRL's with that one term exchanged."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from trainers.data import load_rows, pad_batch, tokenize_pairs
    from trainers.recipes.orpo import orpo_loss

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    _, rows, sources = load_rows(toy["pref_train"], "preference", 8)
    pairs, _ = tokenize_pairs(tokenizer, rows, sources, 64, "error")
    policy = AutoModelForCausalLM.from_pretrained(f"{sft_dir}/model").eval()
    beta = 0.25

    ours, _, logs = orpo_loss(beta, tokenizer.pad_token_id, CPU)(policy, pairs)

    # TRL's ORPOConfig defaults to bf16 autocast: compare in fp32
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], use_cpu=True, bf16=False,
                      per_device_train_batch_size=len(pairs), max_length=64)
    trainer = ORPOTrainer(model=policy, args=args, processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list(rows))
    inputs = {}
    for side in ("chosen", "rejected"):
        batch = pad_batch([getattr(p, side) for p in pairs], tokenizer.pad_token_id)
        inputs.update({f"{side}_{name}": tensor for name, tensor in batch.items()})
    chosen = pad_batch([p.chosen for p in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
        response_nll = policy(**chosen).loss  # transformers' mean cross-entropy over the labelled tokens
    metrics = {name: values[-1] for name, values in trainer._stored_metrics["train"].items()}

    assert abs(metrics["log_odds_chosen"]) > 0.3  # the sides differ: a real comparison
    assert logs["orpo/log_odds_ratio"] == pytest.approx(metrics["log_odds_ratio"], abs=1e-5)
    assert logs["orpo/log_odds_chosen"] == pytest.approx(metrics["log_odds_chosen"], abs=1e-5)
    assert logs["orpo/chosen_reward"] == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert logs["orpo/rejected_reward"] == pytest.approx(metrics["rewards/rejected"], abs=1e-5)
    assert logs["orpo/reward_margin"] == pytest.approx(metrics["rewards/margins"], abs=1e-5)
    assert logs["orpo/reward_accuracy"] == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    assert logs["orpo/chosen_nll"] == pytest.approx(response_nll.item(), abs=1e-5)
    assert abs(metrics["nll_loss"] - response_nll.item()) > 1e-2  # TRL's counts the prompt: the one difference
    assert ours.item() == pytest.approx(theirs.item() - metrics["nll_loss"] + response_nll.item(), abs=1e-5)


def test_orpo_log_odds_are_exact_and_stay_finite_when_a_side_is_certain():
    """log(p / (1 - p)) of p = exp(x) on both sides of the log1mexp branch point, against float64;
    a response the model is certain of (mean log-prob 0, which float32 log-softmax reaches) keeps
    the loss and its gradient finite."""
    import math

    from trainers.recipes.orpo import log_odds

    x = torch.tensor([-30.0, -5.0, -0.7, -0.69, -0.1, -1e-3], requires_grad=True)
    expected = [math.log(math.exp(v) / -math.expm1(v)) for v in x.tolist()]
    assert log_odds(x).tolist() == pytest.approx(expected, rel=1e-5)
    certain = torch.tensor([0.0, -2.0], requires_grad=True)
    odds = log_odds(certain)
    (odds[0] - odds[1]).backward()
    assert torch.isfinite(odds).all() and torch.isfinite(certain.grad).all()


@pytest.mark.usefixtures("one_thread")
def test_orpo_trains_lora_on_the_embedded_model_from_the_base(make_cfg, tmp_path):
    """ORPO from the base (no upstream stage, no reference): the loss falls, the held-out pairs rank
    right, only the adapter trains, and the saved adapter reloads to the logged eval margin."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from trainers.model import load_base_model, load_tokenizer
    from trainers.context import TrialContext
    from trainers.recipes.base import load_preference_splits
    from trainers.recipes.orpo import evaluate_margins
    from trainers.trial import run_trial

    cfg = make_cfg("stage=orpo", "data=embedded_pref", "method=lora", "train.max_steps=20", "train.log_every=1",
                   "train.checkpoint_every=0", "data.max_train_rows=160", "data.max_eval_rows=16")
    tracker = RecordingTracker()
    metrics = run_trial(cfg, tmp_path / "orpo", tracker=tracker)
    loss = tracker.series("train/loss")
    assert statistics.fmean(loss[-5:]) < loss[0] / 2, loss
    assert tracker.series("orpo/log_odds_chosen")[-1] > 0 and metrics["eval/pairwise_accuracy"] >= 0.75
    assert {"eval/accuracy_init", "eval/accuracy", "eval/reward_margin"} <= set(metrics)

    adapter = load_file(tmp_path / "orpo" / "adapter" / "adapter_model.safetensors")
    assert sum(t.numel() for t in adapter.values()) == metrics["model/trainable_params"]  # nothing else trained
    assert all(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at 0: it moved
    tokenizer = load_tokenizer(cfg.model)
    model = PeftModel.from_pretrained(load_base_model(cfg, CPU), tmp_path / "orpo" / "adapter")
    pairs = load_preference_splits(TrialContext(cfg, tmp_path / "splits", CPU), tokenizer).eval_pairs
    again = evaluate_margins(model, pairs, cfg.stage.beta, tokenizer.pad_token_id, 16, CPU)
    assert again["eval/reward_margin"] == pytest.approx(metrics["eval/reward_margin"], rel=1e-4, abs=1e-5)


def _grads(model, loss) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_grpo_policy_gradient_and_kl_match_trl_grpo_trainer(toy, sft_dir, tmp_path):
    """The rl stage's loss against TRL's GRPOTrainer on one batch: same prompts, sampled responses,
    rewards, reference model and kl_coef (TRL: loss_type="grpo", scale_rewards="group", one
    iteration per batch, use_bias_correction_kl off). Ours is written as REINFORCE (value -A log pi),
    TRL's as the PPO ratio, which is 1 on-policy (value -A): the gradients must agree, and so must
    the KL they log."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from trainers.data import load_rows, prompts_with_answers
    from trainers.generation import generate
    from trainers.policy import Reference
    from trainers.recipes.rl import group_advantages, policy_loss

    group_size, kl_coef, temperature = 4, 0.3, 0.9
    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    _, rows, sources = load_rows(toy["pref_train"], "preference", 3)
    prompts, _ = prompts_with_answers(tokenizer, rows, sources, "preference", 64, "error")
    prompts[1].prompt_ids = prompts[1].prompt_ids[1:]  # prompts of different lengths: left padding counts too
    reference = AutoModelForCausalLM.from_pretrained(f"{sft_dir}/model").eval()
    policy = AutoModelForCausalLM.from_pretrained(f"{sft_dir}/model")
    torch.manual_seed(3)
    with torch.no_grad():  # a policy that has moved away from the reference: the KL term is not 0
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    policy.eval()
    group = [p for p in prompts for _ in range(group_size)]
    rollouts = generate(policy, tokenizer, group, 3, CPU, sample=True, temperature=temperature)
    rewards = torch.randn(len(group), generator=torch.Generator().manual_seed(0))

    advantages = group_advantages(rewards, group_size, scale_rewards=True)
    for i in range(0, len(group), group_size):  # TRL's: (r - group mean) / (group sample std + 1e-4)
        block = rewards[i:i + group_size].tolist()
        expected = [(r - statistics.fmean(block)) / (statistics.stdev(block) + 1e-4) for r in block]
        assert advantages[i:i + group_size, 0].tolist() == pytest.approx(expected, abs=1e-5)
    ours, kl, mask = policy_loss(policy, Reference(reference), rollouts, advantages, kl_coef, temperature)
    our_grads = _grads(policy, ours)

    args = GRPOConfig(output_dir=str(tmp_path / "trl"), beta=kl_coef, temperature=temperature, loss_type="grpo",
                      scale_rewards="group", num_generations=group_size, per_device_train_batch_size=len(group),
                      max_completion_length=3, report_to=[], use_cpu=True, bf16=False,
                      use_bias_correction_kl=False)  # rl.py's KL term: see policy_loss
    trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          processing_class=tokenizer,
                          train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows]))
    width = max(len(p.prompt_ids) for p in group)  # TRL takes the left-padded prompts and the responses apart
    inputs = {"prompt_ids": rollouts.input_ids[:, :width], "prompt_mask": rollouts.attention_mask[:, :width],
              "completion_ids": rollouts.input_ids[:, width:], "completion_mask": rollouts.attention_mask[:, width:],
              "advantages": advantages[:, 0]}
    # TRL's reference: the policy's checkpoint loaded again (the SFT model, as `reference` above).
    with torch.no_grad():
        inputs["ref_per_token_logps"], _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.ref_model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1])
    theirs = trainer.compute_loss(trainer.model, inputs)
    their_grads = _grads(policy, theirs)

    assert len(our_grads) == len(their_grads) and max(g.abs().max().item() for g in our_grads) > 1e-4
    for mine, other in zip(our_grads, their_grads):
        torch.testing.assert_close(mine, other, rtol=1e-4, atol=1e-6)
    our_kl = (kl.sum() / mask.sum()).item()
    assert our_kl > 1e-4 and our_kl == pytest.approx(trainer._metrics["eval"]["kl"][-1], rel=1e-4)


def test_reward_loss_and_metrics_match_trl_reward_trainer(toy, sft_dir, tmp_path):
    """The reward stage's Bradley-Terry loss against TRL's RewardTrainer (no reward centering:
    center_rewards_coefficient=None, which the reward stage does not do either) on the same pairs,
    model and head; sequences as the reward stage reads them (no final eos, trainers/policy.py)."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from trainers.data import Example, load_rows, pad_batch, tokenize_pairs
    from trainers.policy import reward_sequence
    from trainers.recipes.reward import pair_scores, pairwise_loss

    tokenizer = AutoTokenizer.from_pretrained(toy["model"])
    _, rows, sources = load_rows(toy["pref_train"], "preference", 8)
    pairs, _ = tokenize_pairs(tokenizer, rows, sources, 64, "error")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(f"{sft_dir}/model", num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # a head that ranks some pairs each way: a real comparison
    model.eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ours, _, logs = pairwise_loss(pad, eos, CPU)(model, pairs)

    args = RewardConfig(output_dir=str(tmp_path / "trl"), center_rewards_coefficient=None, report_to=[],
                        use_cpu=True, bf16=False, per_device_train_batch_size=len(pairs))
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=datasets.Dataset.from_list(rows))
    sides = [reward_sequence([], side.input_ids, eos) for side in [p.chosen for p in pairs] + [p.rejected for p in pairs]]
    batch = pad_batch([Example(ids, ids) for ids in sides], pad)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"],
                                                      "attention_mask": batch["attention_mask"]})
    metrics = {name: values[-1] for name, values in trainer._metrics["eval"].items()}
    chosen, rejected, _ = pair_scores(model, pairs, pad, eos, CPU)
    assert 0 < (chosen > rejected).float().mean().item() < 1
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert logs["reward/accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert logs["reward/margin"] == pytest.approx(metrics["margin"], abs=1e-6)
