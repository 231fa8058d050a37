"""The one generator (trainers/generation.py) against transformers' own `model.generate` on each
prompt alone: left padding, attention and position ids must not change a greedy answer, nor the
log-probs the rl stage scores a rollout with."""

from __future__ import annotations

import pytest
import torch

from trainers.data import EvalPrompt
from trainers.generation import generate
from trainers.policy import token_logprobs

CPU = torch.device("cpu")
MAX_NEW = 6
PAD = 0


class Ids:
    """What the generator needs from a tokenizer."""

    def __init__(self, eos_token_id: int):
        self.pad_token_id, self.eos_token_id = PAD, eos_token_id


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_and_prompts(request):
    """A tiny random model (Llama: rotary positions; GPT-2: learned absolute positions, where a
    position id off by the padding changes every logit) and prompts of different lengths."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if request.param == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                             tie_word_embeddings=True, pad_token_id=PAD))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=64,
                                           pad_token_id=PAD))
    generator = torch.Generator().manual_seed(1)
    prompts = [EvalPrompt(prompt_ids=torch.randint(3, 50, (n,), generator=generator).tolist(), answer="")
               for n in (3, 9, 5, 12, 1)]
    return request.param, model.eval(), prompts


def alone(model, prompt_ids: list[int], eos_id: int) -> list[int]:
    """transformers' greedy answer to one unpadded prompt, up to and including eos."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         pad_token_id=PAD, eos_token_id=eos_id)[0, len(prompt_ids):].tolist()
    return out[:out.index(eos_id) + 1] if eos_id in out else out


def test_greedy_batch_of_mixed_lengths_answers_as_each_prompt_alone(model_and_prompts):
    _, model, prompts = model_and_prompts
    # eos = the third token one prompt answers alone: that row stops early, the others run on.
    eos_id = alone(model, prompts[1].prompt_ids, eos_id=-1)[2]
    expected = [alone(model, p.prompt_ids, eos_id) for p in prompts]
    assert any(r[-1] == eos_id for r in expected) and any(len(r) == MAX_NEW for r in expected)

    rollouts = generate(model, Ids(eos_id), prompts, MAX_NEW, CPU)
    assert rollouts.responses == expected
    width = max(len(p.prompt_ids) for p in prompts)
    for row, (prompt, response) in enumerate(zip(prompts, expected)):
        real = rollouts.attention_mask[row].bool()
        assert rollouts.input_ids[row][real].tolist() == prompt.prompt_ids + response
        assert rollouts.position_ids[row][real].tolist() == list(range(len(prompt.prompt_ids) + len(response)))
        assert rollouts.labels[row, width:width + len(response)].tolist() == response


def test_rollout_logprobs_are_those_of_each_sequence_alone(model_and_prompts):
    """The rl stage scores rollouts in their padded batch; each response's log-probs must be what
    the unpadded sequence gets. With absolute positions (GPT-2), positions that count the padding
    would change them: the check has teeth there."""
    kind, model, prompts = model_and_prompts
    eos_id = 2
    rollouts = generate(model, Ids(eos_id), prompts, MAX_NEW, CPU)
    batch = (rollouts.input_ids, rollouts.attention_mask, rollouts.labels)
    with torch.no_grad():
        padded, mask = token_logprobs(model, *batch, position_ids=rollouts.position_ids)
        counting_pads = torch.arange(rollouts.input_ids.shape[1]).expand_as(rollouts.input_ids)
        shifted, _ = token_logprobs(model, *batch, position_ids=counting_pads)
    drift = 0.0
    for row, (prompt, response) in enumerate(zip(prompts, rollouts.responses)):
        ids = torch.tensor([prompt.prompt_ids + response])
        labels = torch.tensor([[-100] * len(prompt.prompt_ids) + response])
        with torch.no_grad():
            single, single_mask = token_logprobs(model, ids, torch.ones_like(ids), labels)
        ours = padded[row][mask[row]]
        assert ours.shape[0] == len(response)
        torch.testing.assert_close(ours, single[0][single_mask[0]], rtol=1e-4, atol=1e-5)
        drift = max(drift, (shifted[row][mask[row]] - ours).abs().max().item())
    if kind == "gpt2":
        assert drift > 1e-3
