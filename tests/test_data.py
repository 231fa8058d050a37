"""Data rules: every bad-row kind names file:line (source:row); loss masking covers only the response;
every kind of source (JSONL, Parquet, CSV, JSON, saved datasets, hf:) gives the same rows."""

from __future__ import annotations

import hashlib
import json

import pytest

from trainers.data import IGNORE_INDEX, DataError, encode_row, eval_prompt, load_rows, tokenize_split
from trainers.templates import format_prompt

GOOD = {"instruction": "What number comes after 4?", "output": "5"}


@pytest.mark.parametrize("bad_line,rule", [
    ('{"instruction": "x", "output": ', "invalid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"output": "y"}, "missing field 'instruction'"),
    ({"instruction": "  ", "output": "y"}, "field 'instruction' is empty"),
    ({"instruction": "x", "output": ""}, "field 'output' is empty"),
    ({"instruction": "x", "output": 5}, "must be a string"),
])
def test_bad_instruction_row_names_file_and_line(write_jsonl, bad_line, rule):
    path = write_jsonl("train.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DataError) as info:
        load_rows(str(path), "instruction")
    assert str(info.value).startswith(f"{path}:3:")
    assert rule in str(info.value)


@pytest.mark.parametrize("messages,rule", [
    ([{"role": "assistant", "content": "hi"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
      {"role": "assistant", "content": "c"}], "system message may only come first"),
    ([{"role": "user", "content": "a"}], "must end with an assistant"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "role must be one of"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}], "empty"),
    ([], "non-empty list"),
])
def test_bad_chat_rows(write_jsonl, messages, rule):
    path = write_jsonl("chat.jsonl", [{"messages": messages}])
    with pytest.raises(DataError) as info:
        load_rows(str(path), "chat")
    assert f"{path}:1" in str(info.value) and rule in str(info.value)


def test_missing_file_is_named():
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load_rows("/tmp/definitely/nope.jsonl")


def test_format_is_detected_and_blank_lines_skipped(write_jsonl):
    path = write_jsonl("mixed.jsonl", [GOOD, "", "   ", GOOD])
    fmt, rows, sources = load_rows(str(path))
    assert fmt == "instruction" and len(rows) == 2
    assert sources == [f"{path}:1", f"{path}:4"]


def test_response_only_loss_mask(tokenizer):
    row = {"instruction": "What number comes after 4?", "input": "", "output": "5"}
    ids, labels = encode_row(tokenizer, row, "instruction")
    prompt_ids, answer = eval_prompt(tokenizer, row, "instruction")
    # The prompt is exactly what generation sees, and none of it is trained on.
    assert ids[:len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in labels[:len(prompt_ids)])
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert trained == ids[len(prompt_ids):]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == "5"


def test_input_field_goes_into_the_prompt(tokenizer):
    text = format_prompt("Add the numbers.", "3 and 4")
    assert "### Input:\n3 and 4" in text and text.endswith("### Response:\n")


def test_chat_masks_everything_but_assistant_turns(tokenizer):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "after 4?"},
                        {"role": "assistant", "content": "5"}]}
    ids, labels = encode_row(tokenizer, row, "chat")
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    eos = tokenizer.eos_token_id
    assert trained.count(eos) == 2
    text = tokenizer.decode([t for t in trained if t != eos])
    assert "hello" in text and "5" in text and "hi" not in text and "brief" not in text
    prompt_ids, answer = eval_prompt(tokenizer, row, "chat")
    assert answer == "5" and ids[:len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("policy", ["error", "truncate", "drop"])
def test_overlength_policies(tokenizer, write_jsonl, policy):
    long_row = {"instruction": "count " + " ".join(str(i) for i in range(60)), "output": "done"}
    path = write_jsonl("long.jsonl", [GOOD, long_row, GOOD])
    fmt, rows, sources = load_rows(str(path))
    if policy == "error":
        with pytest.raises(DataError, match=rf"{path}:2: \d+ tokens exceeds data.max_seq_len=32"):
            tokenize_split(tokenizer, rows, sources, fmt, 32, policy)
        return
    split = tokenize_split(tokenizer, rows, sources, fmt, 32, policy)
    assert all(len(e.input_ids) <= 32 for e in split.examples)
    # A truncated long prompt keeps no response token, so it is dropped either way and counted.
    assert split.stats.rows == 2 and split.stats.dropped == 1


def test_preference_rows(write_jsonl):
    good = {"prompt": "What number comes after 4?", "chosen": "5", "rejected": "6"}
    chat = {"chosen": [{"role": "user", "content": "after 4?"}, {"role": "assistant", "content": "5"}],
            "rejected": [{"role": "user", "content": "after 4?"}, {"role": "assistant", "content": "6"}]}
    fmt, rows, _ = load_rows(str(write_jsonl("p.jsonl", [good, chat])))
    assert fmt == "preference" and rows[1]["chosen"] == "5" and rows[1]["prompt"] == chat["chosen"][:1]
    same = write_jsonl("same.jsonl", [good, {**good, "rejected": "5"}])
    with pytest.raises(DataError, match=r"same.jsonl:2: chosen and rejected are identical"):
        load_rows(str(same))
    empty = write_jsonl("empty.jsonl", [{**good, "prompt": ""}])
    with pytest.raises(DataError, match=r"empty.jsonl:1: field 'prompt' is empty"):
        load_rows(str(empty))


GOOD_PAIR = {"prompt": "What number comes after 4?", "chosen": "5", "rejected": "6"}
USER, ANSWER = {"role": "user", "content": "after 4?"}, {"role": "assistant", "content": "5"}


@pytest.mark.parametrize("row,fragment", [
    ({"prompt": "q", "chosen": "5"}, ":1: missing field 'rejected'"),
    ({**GOOD_PAIR, "chosen": "  "}, ":1: field 'chosen' is empty"),
    ({**GOOD_PAIR, "rejected": 6}, ":1: field 'rejected' must be a string, got int"),
    ({"chosen": [USER, ANSWER], "rejected": [{"role": "user", "content": "before 4?"}, ANSWER | {"content": "3"}]},
     ":1: chosen and rejected must share every message but the last"),
    ({"chosen": [USER, ANSWER], "rejected": [USER]}, ":1: rejected must end with an assistant message"),
    ({"chosen": [USER, ANSWER], "rejected": "6"}, ":1: field 'rejected' must be a non-empty list of messages"),
])
def test_bad_preference_rows_name_file_line_and_rule(write_jsonl, row, fragment):
    path = write_jsonl("bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_rows(str(path))
    assert f"{path}{fragment}" in str(err.value)


def test_long_preference_pairs_follow_overlength(write_jsonl, tokenizer):
    from trainers.data import tokenize_pairs

    long_pair = {**GOOD_PAIR, "chosen": " ".join(["5"] * 60)}
    fmt, rows, sources = load_rows(str(write_jsonl("p.jsonl", [GOOD_PAIR, long_pair])))
    with pytest.raises(DataError, match=r"p.jsonl:2: \d+ tokens exceeds data.max_seq_len=40"):
        tokenize_pairs(tokenizer, rows, sources, 40, "error")
    kept, stats = tokenize_pairs(tokenizer, rows, sources, 40, "drop")
    assert len(kept) == 1 and stats.dropped == 1
    cut, stats = tokenize_pairs(tokenizer, rows, sources, 40, "truncate")
    assert stats.truncated == 1 and all(len(e.input_ids) <= 40 for p in cut for e in (p.chosen, p.rejected))


def test_a_stage_refuses_data_of_the_wrong_kind_before_compute(write_jsonl, make_cfg):
    from trainers.trial import check_inputs

    instruction = write_jsonl("i.jsonl", [{"instruction": "a", "output": "b"}])
    cfg = make_cfg("stage=dpo", "data=embedded_pref", "data.format=auto", f"data.train_file={instruction}",
                   "data.eval_file=null")
    with pytest.raises(DataError, match=r"i.jsonl: holds instruction rows; stage dpo trains on preference data"):
        check_inputs(cfg)


# --------------------------------------------------------------------------- sources beyond JSONL

ROWS = [{"question": "What number comes after 4?", "answer": "5"}, {"question": "What is 3 plus 4?", "answer": "7"}]
COLUMNS = {"instruction": "question", "output": "answer"}


def _write_sources(tmp_path) -> dict[str, str]:
    """The same two rows as Parquet, CSV, a JSON array, a save_to_disk directory and a DatasetDict."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    with open(tmp_path / "rows.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(ROWS)
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    return {"parquet": str(tmp_path / "rows.parquet"), "csv": str(tmp_path / "rows.csv"),
            "json": str(tmp_path / "rows.json"), "saved": str(tmp_path / "saved"), "split": f"{tmp_path / 'dict'}:test"}


def test_every_source_gives_the_same_rows_with_columns_mapped(tmp_path, tokenizer):
    sources = _write_sources(tmp_path)
    expected = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in ROWS]
    for kind, uri in sources.items():
        fmt, rows, names = load_rows(uri, "auto", columns=COLUMNS)
        assert (fmt, rows) == ("instruction", expected), kind
        first = {"csv": f"{uri}:2", "split": f"{uri}:row 1"}.get(kind, f"{uri}:row 1")
        assert names[0] == first, kind
    # A CSV answer "5" stays text (no type guessing), and the tokens match the JSONL's.
    fmt, rows, names = load_rows(sources["csv"], "auto", columns=COLUMNS)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps({"instruction": r["question"], "output": r["answer"]}) + "\n" for r in ROWS))
    plain = load_rows(str(jsonl))
    assert [e.input_ids for e in tokenize_split(tokenizer, rows, names, fmt, 64, "error").examples] == \
           [e.input_ids for e in tokenize_split(tokenizer, plain[1], plain[2], plain[0], 64, "error").examples]


def test_hf_source_loads_a_local_dataset_directory(tmp_path):
    """hf:NAME goes through datasets.load_dataset; a local directory of data files needs no hub."""
    folder = tmp_path / "local_ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "test.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    fmt, rows, names = load_rows(f"hf:{folder}", "auto", columns=COLUMNS)
    assert [r["output"] for r in rows] == ["5", "7"] and names == [f"hf:{folder}:row 1", f"hf:{folder}:row 2"]
    _, rows, names = load_rows(f"hf:{folder}:test", "auto", columns=COLUMNS)
    assert [r["output"] for r in rows] == ["7"] and names == [f"hf:{folder}:test:row 1"]
    with pytest.raises(DataError, match=rf"hf:{folder}:nope: cannot load with datasets.load_dataset"):
        load_rows(f"hf:{folder}:nope")


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "saved"])
def test_bad_rows_and_missing_columns_are_named_in_every_source(tmp_path, kind):
    uri = _write_sources(tmp_path)[kind]
    with pytest.raises(DataError) as err:
        load_rows(uri, "auto", columns={"instruction": "question", "output": "reply"})
    where = f"{uri}:2" if kind == "csv" else f"{uri}:row 1"
    assert str(err.value).startswith(f"{where}: no column 'reply' (data.columns.output=reply)")
    with pytest.raises(DataError) as err:
        load_rows(uri, "auto")  # unmapped, the columns say nothing of the format
    assert str(err.value).startswith(f"{where}: cannot tell the format")


def test_a_bad_value_deep_in_a_parquet_file_is_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "a", "output": "b"}] * 3 + [{"instruction": "a", "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad.parquet'}:row 4: field 'output' is empty"):
        load_rows(str(tmp_path / "bad.parquet"))


def test_a_dataset_dict_needs_its_split_named(tmp_path):
    uri = _write_sources(tmp_path)["split"].rsplit(":", 1)[0]
    with pytest.raises(DataError, match=r"dict: a DatasetDict; name one of its splits as .*dict:SPLIT \(train, test\)"):
        load_rows(uri)


def test_columns_config_is_checked_and_fingerprints_follow_directories(make_cfg, tmp_path):
    from trainers.config import ConfigError
    from trainers.data import data_fingerprint

    with pytest.raises(ConfigError, match="data.columns.bogus"):
        make_cfg("data.columns.bogus=x")
    assert make_cfg("data.columns.output=answer").data.columns.mapping() == {"output": "answer"}
    saved = _write_sources(tmp_path)["saved"]
    cfg = make_cfg(f"data.train_file={saved}", "data.eval_file=null")
    before = data_fingerprint(cfg.data)["train"]
    import datasets

    datasets.Dataset.from_list(ROWS[:1]).save_to_disk(saved)
    assert before and data_fingerprint(cfg.data)["train"] != before


def test_a_folder_that_is_no_saved_dataset_points_to_hf(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n")
    with pytest.raises(DataError, match=rf"{tmp_path}: not a saved dataset .*loads as hf:{tmp_path}"):
        load_rows(str(tmp_path))
    assert load_rows(f"hf:{tmp_path}")[1][0]["output"] == "5"



COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
HUB_ROWS = [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(4)]


def test_a_hub_source_is_fingerprinted_by_the_commit_it_is_read_from(hub_dataset, monkeypatch):
    import trainers.sources
    from trainers.data import source_fingerprint
    from trainers.sources import hub_revision

    hub_dataset("owner/ds", COMMIT_A, HUB_ROWS)
    first = source_fingerprint("hf:owner/ds")
    assert hub_revision("hf:owner/ds") == COMMIT_A
    assert first != hashlib.sha256(b"hf:owner/ds").hexdigest()  # not the name alone
    # Pinned to the commit main resolves to: the same data, the same fingerprint; a split differs.
    assert source_fingerprint(f"hf:owner/ds@{COMMIT_A}") == first
    assert source_fingerprint(f"hf:owner/ds@{COMMIT_A}:train") == source_fingerprint("hf:owner/ds:train") != first
    assert [r["output"] for r in load_rows("hf:owner/ds")[1]] == ["1", "2", "3", "4"]

    hub_dataset("owner/ds", COMMIT_B, HUB_ROWS[:2])  # updated upstream, loaded once online since
    assert source_fingerprint("hf:owner/ds") == first  # resolved once per process: a sweep's trials agree
    monkeypatch.setattr(trainers.sources, "_revisions", {})  # the next process
    assert hub_revision("hf:owner/ds") == COMMIT_B and source_fingerprint("hf:owner/ds") != first
    assert [r["output"] for r in load_rows("hf:owner/ds")[1]] == ["1", "2"]


def test_offline_a_pin_to_another_commit_than_the_one_read_is_an_error(hub_dataset):
    hub_dataset("owner/ds", COMMIT_A, HUB_ROWS, tag="v1")
    hub_dataset("owner/ds", COMMIT_B, HUB_ROWS[:2], tag="v2")
    for pin in (COMMIT_B, COMMIT_B[:7], "v2"):  # load_dataset reads the newest build offline
        assert len(load_rows(f"hf:owner/ds@{pin}:train")[1]) == 2
    for pin in (COMMIT_A, "v1"):
        with pytest.raises(DataError, match=rf"^hf:owner/ds@{pin}:train: offline, datasets reads only the newest "
                                            rf"build of owner/ds in its cache \(commit {COMMIT_B}\), not revision {pin}"):
            load_rows(f"hf:owner/ds@{pin}:train")


def test_a_hub_source_unknown_to_hub_and_cache_is_named_and_says_so_once(hub_dataset, caplog):
    from trainers.data import source_fingerprint

    with caplog.at_level("WARNING", logger="trainers"):
        for _ in range(2):
            assert source_fingerprint("hf:owner/missing:test") == hashlib.sha256(b"hf:owner/missing:test").hexdigest()
        assert source_fingerprint("hf:owner/gone@v9") == hashlib.sha256(b"hf:owner/gone@v9").hexdigest()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("hf:owner/missing:test: neither the hub nor the datasets cache tells which "
                                  "commit of owner/missing")
    assert "by name only" in warnings[0] and warnings[1].startswith("hf:owner/gone@v9: ")


def test_a_pinned_hub_source_is_named_as_written_in_errors(hub_dataset):
    with pytest.raises(DataError, match=r"^hf:owner/missing@v1:train: cannot load with datasets.load_dataset"):
        load_rows("hf:owner/missing@v1:train")
    with pytest.raises(DataError, match=r"^hf:owner/ds@:train: expected hf:NAME, .*hf:NAME@REVISION:SPLIT"):
        load_rows("hf:owner/ds@:train")
