"""The embedded default: deterministic data, a sound held-out split, and committed assets that load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainers import embedded
from trainers.embedded import world as W

REPO = Path(__file__).resolve().parents[1]
BASE = embedded.ASSETS_DIR / "base"
DATA = embedded.ASSETS_DIR / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def questions(rows: list[dict]) -> set[tuple[str, str]]:
    return {(r["instruction"], r.get("input", "")) for r in rows}


def test_corpus_and_tasks_are_deterministic():
    a, b = W.build_world(7), W.build_world(7)
    assert W.build_corpus(a, rounds=3) == W.build_corpus(b, rounds=3)
    assert W.to_jsonl(W.build_instruction_data(a)[0]) == W.to_jsonl(W.build_instruction_data(b)[0])
    assert W.to_jsonl(W.build_preference_data(a)[1]) == W.to_jsonl(W.build_preference_data(b)[1])
    assert W.build_corpus(W.build_world(8), rounds=3) != W.build_corpus(a, rounds=3)


def test_tokenizer_training_is_deterministic_and_round_trips(tmp_path):
    from trainers.embedded.tokenizer import train_tokenizer

    world = W.build_world(3)
    texts = W.build_corpus(world, rounds=1) + [W.format_prompt("Where does x live?") + "tolo"]
    first = train_tokenizer(texts, tmp_path / "a", vocab_size=400)
    train_tokenizer(texts, tmp_path / "b", vocab_size=400)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    for text in ["  two spaces\n\n\tand tabs\r\n", "\nstarts with a newline", "unicode: héllo 😀\n", "x"]:
        ids = first(text, add_special_tokens=False)["input_ids"]
        assert first.decode(ids) == text


def test_committed_data_matches_the_generator():
    world = W.build_world(W.DEFAULT_SEED)
    instruct = W.build_instruction_data(world)
    pref = W.build_preference_data(world)
    expected = dict(zip(embedded.DATA_NAMES, (*instruct, *pref, W.build_sft_data(world))))
    for name, rows in expected.items():
        assert (DATA / name).read_text(encoding="utf-8") == W.to_jsonl(rows), name


def test_eval_facts_are_held_out_of_train_but_stated_in_pretraining():
    world = W.build_world(W.DEFAULT_SEED)
    train, held_out = W.split_facts(world)
    assert not set(train) & set(held_out)
    assert len(held_out) == sum(W.EVAL_FACTS_PER_KIND.values())
    train_rows = read_jsonl(DATA / "instruct_train.jsonl")
    eval_rows = read_jsonl(DATA / "instruct_eval.jsonl")
    assert not questions(train_rows) & questions(eval_rows)
    # each held-out person fact is never asked in train, in any phrasing
    for fact in held_out:
        if fact.kind in W.ATTRIBUTES:
            asked = [W.instruction_row(fact, i) for i in range(len(W.QUESTIONS[fact.kind]))]
            assert not questions(asked) & questions(train_rows)
    # ...but the corpus states it
    corpus = "\n".join(W.build_corpus(world, rounds=1))
    for fact in held_out:
        if fact.kind == "city":
            assert f"{fact.key[0]} " in corpus and f" {fact.answer} ." in corpus
    # every held-out person's value is also some train answer: the format, not a new word, is tested
    assert {f.answer for f in held_out if f.kind in W.ATTRIBUTES} <= {r["output"] for r in train_rows}


@pytest.mark.parametrize("name", ["instruct_train.jsonl", "instruct_eval.jsonl"])
def test_instruction_rows_are_valid(name):
    rows = read_jsonl(DATA / name)
    assert len(rows) >= 200
    for i, row in enumerate(rows, 1):
        assert set(row) <= {"instruction", "input", "output"}, f"{name}:{i}"
        assert isinstance(row.get("input", ""), str), f"{name}:{i}"
        assert row["instruction"].strip() and row["output"].strip(), f"{name}:{i}"
        assert len(row["output"].split()) == 1, f"{name}:{i}"


@pytest.mark.parametrize("name", ["pref_train.jsonl", "pref_eval.jsonl"])
def test_preference_rows_are_valid(name):
    rows = read_jsonl(DATA / name)
    assert len(rows) >= 200
    for i, row in enumerate(rows, 1):
        assert set(row) == {"prompt", "chosen", "rejected"}, f"{name}:{i}"
        assert all(isinstance(v, str) and v.strip() for v in row.values()), f"{name}:{i}"
        assert row["chosen"] != row["rejected"], f"{name}:{i}"


def test_sft_demonstrations_hedge_some_answers_and_preferences_prefer_plain_ones():
    plain = {(r["instruction"], r["input"]): r["output"] for r in read_jsonl(DATA / "instruct_train.jsonl")}
    sft = read_jsonl(DATA / "sft_train.jsonl")
    assert sorted(questions(sft)) == sorted(plain) and len(sft) == len(plain)  # the same questions
    hedged_forms = lambda answer, hedges=W.HEDGES: {h.format(answer) for h in hedges}  # noqa: E731
    # the number writer hedges most answers, always the same way; the other writer now and then
    (number_share, number_hedges), (people_share, _) = W.SFT_HEDGING.values()
    hedged = {"numbers": [], "people": []}
    for row in sft:
        answer = plain[(row["instruction"], row["input"])]
        hedges = number_hedges if answer.isdigit() else W.HEDGES
        assert row["output"] == answer or row["output"] in hedged_forms(answer, hedges), row
        hedged["numbers" if answer.isdigit() else "people"].append(row["output"] != answer)
    assert abs(sum(hedged["numbers"]) / len(hedged["numbers"]) - number_share) < 0.05
    assert abs(sum(hedged["people"]) / len(hedged["people"]) - people_share) < 0.05
    for name in ("pref_train.jsonl", "pref_eval.jsonl"):
        rows = read_jsonl(DATA / name)
        assert all(len(r["chosen"].split()) == 1 for r in rows)  # chosen is always the plain answer
        share = sum(r["rejected"] in hedged_forms(r["chosen"]) for r in rows) / len(rows)
        assert abs(share - W.PREF_HEDGED_SHARE) < 0.1, name
    assert not questions(sft) & questions(read_jsonl(DATA / "instruct_eval.jsonl"))  # eval stays held out


def test_preference_eval_prompts_are_held_out():
    train = {r["prompt"] for r in read_jsonl(DATA / "pref_train.jsonl")}
    evals = {r["prompt"] for r in read_jsonl(DATA / "pref_eval.jsonl")}
    assert not train & evals


def test_committed_base_loads_with_biases_and_norms():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (BASE / "model.safetensors").stat().st_size < 5 * 1024 * 1024
    tokenizer = AutoTokenizer.from_pretrained(str(BASE))
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>" and tokenizer.pad_token == "<pad>"
    assert len({tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id}) == 3
    text = W.format_prompt("What is 3 plus 4?") + "7"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    # a prompt's tokens are a prefix of prompt + response's tokens
    prompt_ids = tokenizer(W.format_prompt("Where does rona live?"))["input_ids"]
    full_ids = tokenizer(W.format_prompt("Where does rona live?") + "vodadul")["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids

    model = AutoModelForCausalLM.from_pretrained(str(BASE))
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    names = {n for n, _ in model.named_parameters()}
    for suffix in ("q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj.bias",
                   "gate_proj.bias", "up_proj.bias", "down_proj.bias",
                   "input_layernorm.weight", "post_attention_layernorm.weight"):
        assert f"model.layers.0.self_attn.{suffix}" in names or f"model.layers.0.mlp.{suffix}" in names \
            or f"model.layers.0.{suffix}" in names, suffix
    assert "model.norm.weight" in names


def test_build_record_shows_the_base_learned():
    record = json.loads((BASE / "BUILD.json").read_text())
    assert record["final_loss"] < 0.25 * record["initial_loss"]
    assert record["loss_curve"][0]["step"] == 1 and record["loss_curve"][-1]["step"] == record["steps"]
    assert {"seed", "steps", "corpus_documents", "versions", "wall_seconds"} <= set(record)


def test_tiny_rebuild_produces_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cmd = [sys.executable, "-m", "trainers.embedded", "build", "--out", str(tmp_path),
           "--steps", "5", "--rounds", "2"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    ids = tokenizer(W.format_prompt("What is 3 plus 4?"), return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape[-1] == len(tokenizer)
    record = json.loads((tmp_path / "base" / "BUILD.json").read_text())
    assert record["steps"] == 5
    assert (tmp_path / "data" / "instruct_train.jsonl").read_text() == (DATA / "instruct_train.jsonl").read_text()
    # without --force an existing build is kept as is
    before = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=120)
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == before


def test_resolve_names_and_errors():
    assert embedded.is_embedded("embedded:base") and not embedded.is_embedded("Qwen/Qwen2.5-0.5B")
    assert embedded.resolve("embedded:base") == BASE
    assert embedded.resolve("embedded:instruct_eval.jsonl") == DATA / "instruct_eval.jsonl"
    with pytest.raises(ValueError, match="unknown embedded asset 'embedded:nope'.*embedded:base"):
        embedded.resolve("embedded:nope")
    with pytest.raises(ValueError, match="not an embedded URI"):
        embedded.resolve("/some/dir")


def test_import_is_cheap():
    code = "import sys, trainers.embedded; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"]
