"""data.template: with a model's chat template, trained ids are exactly apply_chat_template's, labels
cover exactly the assistant turns (content through the end-of-turn token), prompts are exactly the
generation prompts; a template that cannot render a row is refused naming the row.

Tokenizers are the embedded BPE tokenizer given the special tokens and a chat template written
here in the style of Qwen2 (ChatML) and Llama 3; no downloads.
"""

from __future__ import annotations

import json

import pytest

from trainers.data import IGNORE_INDEX, DataError, encode_row, eval_prompt, load_rows, tokenize_pairs, tokenize_split
from trainers.templates import chat_template

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# As some instruct models ship: no system role.
NO_SYSTEM = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Rewrites earlier turns once later ones follow (as templates that drop past reasoning do).
REWRITES = NO_SYSTEM.replace("message['content'] +", "(message['content'] if loop.last or message['role'] != "
                             "'assistant' else '(earlier answer)') +").replace(
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}", "")
STYLES = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>")}
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}

SYSTEM = {"role": "system", "content": "Answer with one word."}
CHAT = [SYSTEM, {"role": "user", "content": "Where does rona live?"}, {"role": "assistant", "content": "vodadul"},
        {"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}]


def make_tokenizer(template: str, specials: list[str], eos: str):
    """The embedded tokenizer's BPE model as a fresh PreTrainedTokenizerFast with chat specials."""
    from transformers import PreTrainedTokenizerFast

    from trainers.config import ModelConfig
    from trainers.model import load_tokenizer

    backend = load_tokenizer(ModelConfig()).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend.__class__.from_str(backend.to_str()),
                                        pad_token="<pad>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token = eos
    if "<|begin_of_text|>" in specials:
        tokenizer.bos_token = "<|begin_of_text|>"
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(params=sorted(STYLES))
def styled(request):
    template, end = STYLES[request.param]
    return make_tokenizer(template, SPECIALS[request.param], end), end


def trained_runs(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of each maximal run of trained positions; a trained label is always its own id."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def test_chat_ids_labels_and_prompt_are_the_templates(styled):
    tokenizer, end = styled
    for messages in (CHAT, CHAT[1:], CHAT[1:3]):
        ids, labels = encode_row(tokenizer, {"messages": messages}, "chat", template="model")
        assert ids == tokenizer.apply_chat_template(messages)["input_ids"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert trained_runs(tokenizer, ids, labels) == [a + end for a in answers]
        prompt, answer = eval_prompt(tokenizer, {"messages": messages}, "chat", template="model")
        assert prompt == tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
        assert answer == messages[-1]["content"] and ids[:len(prompt)] == prompt
        # What follows the prompt in training is the answer, trained, through the end-of-turn token.
        assert labels[len(prompt) - 1] == IGNORE_INDEX and labels[len(prompt)] == ids[len(prompt)]


def test_instruction_rows_are_one_turn_conversations(styled):
    tokenizer, end = styled
    row = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7"}
    turn = [{"role": "user", "content": "Add the numbers.\n\n3 and 4"}, {"role": "assistant", "content": "7"}]
    ids, labels = encode_row(tokenizer, row, "instruction", template="model")
    assert ids == tokenizer.apply_chat_template(turn)["input_ids"]
    assert trained_runs(tokenizer, ids, labels) == ["7" + end]
    prompt, answer = eval_prompt(tokenizer, row, "instruction", template="model")
    assert prompt == tokenizer.apply_chat_template(turn[:1], add_generation_prompt=True)["input_ids"]
    assert answer == "7"


def test_preference_pairs_share_the_templates_prompt(styled, write_jsonl):
    tokenizer, end = styled
    user = {"role": "user", "content": "Where does rona live?"}
    rows = [{"prompt": "Where does rona live?", "chosen": "vodadul", "rejected": "tolo"},
            {"chosen": [SYSTEM, user, {"role": "assistant", "content": "vodadul"}],
             "rejected": [SYSTEM, user, {"role": "assistant", "content": "tolo"}]}]
    fmt, rows, sources = load_rows(str(write_jsonl("p.jsonl", rows)))
    pairs, _ = tokenize_pairs(tokenizer, rows, sources, 256, "error", template="model")
    for pair, history in zip(pairs, ([user], [SYSTEM, user])):
        for example, text in ((pair.chosen, "vodadul"), (pair.rejected, "tolo")):
            conversation = history + [{"role": "assistant", "content": text}]
            assert example.input_ids == tokenizer.apply_chat_template(conversation)["input_ids"]
            assert trained_runs(tokenizer, example.input_ids, example.labels) == [text + end]


def test_auto_picks_the_models_template_and_plain_without_one(tokenizer):
    chatml = make_tokenizer(CHATML, SPECIALS["chatml"], "<|im_end|>")
    assert chat_template(chatml, "auto").name == "model"
    assert chat_template(chatml, "plain").name == "plain"
    assert chat_template(tokenizer, "auto").name == "plain"  # the embedded tokenizer has none
    from trainers.config import ConfigError

    with pytest.raises(ConfigError, match="data.template"):
        chat_template(tokenizer, "model")
    row = {"instruction": "What number comes after 4?", "input": "", "output": "5"}
    # plain on a tokenizer that has a template ignores it: the project's headers, eos trained.
    ids, _ = encode_row(chatml, row, "instruction", template="plain")
    assert chatml.decode(ids).startswith("### Instruction:") and ids[-1] == chatml.eos_token_id
    assert chat_template(chatml, "auto").sha256 != chat_template(tokenizer, "auto").sha256


def test_a_template_that_refuses_a_row_is_named_with_the_row(write_jsonl):
    tokenizer = make_tokenizer(NO_SYSTEM, SPECIALS["chatml"], "<|im_end|>")
    path = write_jsonl("chat.jsonl", [{"messages": CHAT[1:3]}, {"messages": CHAT}])
    fmt, rows, sources = load_rows(str(path))
    with pytest.raises(DataError) as err:
        tokenize_split(tokenizer, rows, sources, fmt, 256, "error", template="auto")
    assert str(err.value).startswith(f"{path}:2: ") and "System role not supported" in str(err.value)


def test_a_template_that_rewrites_earlier_turns_is_refused(write_jsonl):
    tokenizer = make_tokenizer(REWRITES, SPECIALS["chatml"], "<|im_end|>")
    path = write_jsonl("chat.jsonl", [{"messages": CHAT[1:3]}, {"messages": CHAT[1:]}])
    fmt, rows, sources = load_rows(str(path))
    with pytest.raises(DataError, match=rf"{path}:2: .*rewrites earlier turns"):
        tokenize_split(tokenizer, rows, sources, fmt, 256, "error", template="model")
    # one-turn rows render the same alone and whole: fine
    assert len(tokenize_split(tokenizer, rows[:1], sources[:1], fmt, 256, "error", template="model").examples) == 1


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random Llama saved with the ChatML tokenizer, and chat data for it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chatml")
    tokenizer = make_tokenizer(CHATML, SPECIALS["chatml"], "<|im_end|>")
    tokenizer.save_pretrained(root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    rows = [{"messages": [{"role": "user", "content": f"What is {n} plus 1?"},
                          {"role": "assistant", "content": str(n + 1)}]} for n in range(12)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_a_trial_checks_resolves_and_tags_the_models_template(make_cfg, chat_model, tmp_path):
    from trainers.templates import _sha256
    from trainers.trial import check_inputs, environment, run_trial

    data = chat_model / "chat.jsonl"
    cfg = make_cfg(f"model.name_or_path={chat_model / 'model'}", "data=chat", f"data.train_file={data}",
                   f"data.eval_file={data}", "data.max_seq_len=64", "data.max_new_tokens=4", "train.max_steps=2",
                   "train.batch_size=4", "train.checkpoint_every=0", "method=lora")
    assert cfg.data.template == "auto"
    counts = check_inputs(cfg)
    assert cfg.data.template == "model" and counts["data/train_rows"] == 12
    assert environment(cfg)["data.template_sha256"] == _sha256(CHATML)
    metrics = run_trial(cfg, str(tmp_path / "out"))
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and metrics["eval/loss"] > 0


def test_the_command_line_refuses_a_row_the_template_cannot_render(chat_model, tmp_path, monkeypatch, capsys):
    from orchestrator.__main__ import main

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "nosys"
    tokenizer = make_tokenizer(NO_SYSTEM, SPECIALS["chatml"], "<|im_end|>")
    tokenizer.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    code = main(["+sweep=lora_rank", f"model.name_or_path={model}", "data=chat", f"data.train_file={data}",
                 "data.max_seq_len=256"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{data}:1: the model's chat template" in err and "System role not supported" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_the_plan_logs_the_resolved_template_and_keeps_its_trial_keys(chat_model):
    from orchestrator.__main__ import check_plan_inputs
    from orchestrator.plan import make_plan
    from orchestrator.tracking import config_params

    data = chat_model / "chat.jsonl"
    for model, resolved in ((str(chat_model / "model"), "model"), ("embedded:base", "plain")):
        data_args = [f"data.train_file={data}", "data=chat", "data.max_seq_len=64"] if resolved == "model" else []
        plan = make_plan(["+sweep=lora_rank", f"model.name_or_path={model}", "data.eval_file=null", *data_args])
        keys = [t.key for t in plan.trials]
        check_plan_inputs(plan)
        assert {config_params(t.config)["data.template"] for t in plan.trials} == {resolved}
        assert [t.key for t in plan.trials] == keys


def test_generation_stops_at_the_templates_end_of_turn(make_cfg, tmp_path):
    """A base model's eos (<|end_of_text|>) is not where its chat template ends a turn (<|eot_id|>):
    with the model's template, eos becomes the end-of-turn token that training teaches."""
    from trainers.templates import load_chat_tokenizer

    base = make_tokenizer(LLAMA3, SPECIALS["llama3"] + ["<|end_of_text|>"], "<|end_of_text|>")
    base.save_pretrained(tmp_path / "base")
    cfg = make_cfg(f"model.name_or_path={tmp_path / 'base'}")
    assert load_chat_tokenizer(cfg).eos_token == "<|eot_id|>"
    cfg = make_cfg(f"model.name_or_path={tmp_path / 'base'}", "data.template=plain")
    assert load_chat_tokenizer(cfg).eos_token == "<|end_of_text|>"
    assert load_chat_tokenizer(make_cfg()).eos_token == "</s>"  # embedded: plain, unchanged
