"""The command line without Ray: dry runs print the plan; bad input exits 2 before anything runs."""

from __future__ import annotations

import json

import pytest

from orchestrator.__main__ import main


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dry_run_prints_plan_and_starts_nothing(in_tmp, capsys):
    assert main(["+sweep=lora_rank", "dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "sweep lora_rank: 6 trial(s)" in out
    for r in (1, 2, 4, 8, 16, 32):
        assert f"lora r={r} " in out
    # Its validation is the data's preparation pass: the tokenized data is all it leaves, for the
    # real run to reuse (issue #20); no MLflow store, no trial output.
    assert "data (sft): built" in out
    assert not (in_tmp / "mlflow.db").exists() and [p.name for p in (in_tmp / "runs").iterdir()] == ["prepared"]


def test_help_lists_sweeps(capsys):
    assert main(["--help"]) == 0
    assert "lora_rank" in capsys.readouterr().out


@pytest.mark.parametrize("rows,where", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a", "output": '], ":2: invalid JSON"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], ":2: missing field 'output'"),
    (['{"instruction": "", "output": "b"}'], ":1: field 'instruction' is empty"),
])
def test_bad_rows_exit_2_naming_file_line_with_no_mlflow_run(in_tmp, capsys, rows, where):
    bad = in_tmp / "bad.jsonl"
    bad.write_text("\n".join(rows) + "\n")
    code = main(["+sweep=lora_rank", f"data.train_file={bad}", "data.eval_file=null"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}{where}" in err
    assert not (in_tmp / "mlflow.db").exists(), "no MLflow store may be touched before input is valid"


@pytest.mark.parametrize("args,fragment", [
    (["+sweep=lora_rank", "method=nope"], "error: method:"),
    (["+sweep=nope"], "error: sweep:"),
    (["+sweep=lora_rank", "train.lr=-1"], "error: train.lr: must be > 0"),
    (["+sweep=lora_rank", "data.train_file=/no/such/file.jsonl"], "/no/such/file.jsonl: data file not found"),
    (["+sweep=lora_rank", "sweep.axes={method.r:[2,0]}"], "error: method.r: must be > 0, got 0"),
])
def test_bad_config_exits_2_naming_the_key(in_tmp, capsys, args, fragment):
    assert main(args) == 2
    assert fragment in capsys.readouterr().err
    assert not (in_tmp / "mlflow.db").exists()


def test_overlength_rows_are_refused_before_compute(in_tmp, capsys):
    long_row = {"instruction": "count " + " ".join(str(i) for i in range(200)), "output": "done"}
    data = in_tmp / "long.jsonl"
    data.write_text(json.dumps(long_row) + "\n")
    assert main(["+sweep=lora_rank", f"data.train_file={data}", "data.eval_file=null"]) == 2
    assert f"{data}:1:" in capsys.readouterr().err
