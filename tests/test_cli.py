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
    assert not (in_tmp / "mlflow.db").exists() and not (in_tmp / "runs").exists()


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


def test_dry_run_names_skipped_trials_and_replaced_overrides(in_tmp, capsys, nobias_model):
    args = ["+sweep=full_vs_lora", f"model.name_or_path={nobias_model}", "sweep.variants=[{method:lora},{method:bitfit}]",
            "method=full", "dry_run=true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sweep full_vs_lora: 1 trial(s) (+1 skipped as inapplicable)" in out
    assert "    bitfit: method.name: bitfit trains bias terms" in out
    assert "note: command-line method=full is replaced in 1 of 1 trial(s): the sweep sets method to lora there" in out


@pytest.mark.parametrize("extra,pickled,message", [
    ([], False, "no weights (*.safetensors) in {dir}"),
    (["model.allow_pickle=true"], False, "no weights (*.safetensors or *.bin) in {dir}"),
    ([], True, "no weights (*.safetensors) in {dir} (it has pickle *.bin weights"),
])
def test_a_model_directory_without_weights_is_refused_before_ray(in_tmp, capsys, nobias_model, extra, pickled,
                                                                 message):
    """config.json and a tokenizer but no weights: planning alone would pass, the worker would fail."""
    import shutil

    weightless = in_tmp / "weightless"
    shutil.copytree(nobias_model, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    if pickled:
        (weightless / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main([f"model.name_or_path={weightless}", "dry_run=true", *extra]) == 2
    err = capsys.readouterr().err
    assert f"error: model.name_or_path: {message.format(dir=weightless)}" in err
    assert not (in_tmp / "mlflow.db").exists()
