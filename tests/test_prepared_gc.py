"""Pruning prepared data (trainers/prepared/prune.py, `python -m trainers.prepared list|prune`): every
build or reuse records its use, the listing says what each dataset is, pruning removes the ones
unused for long or beyond the most recent, whole and only them, and the next pass rebuilds them."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainers.prepared.prune import main

REPO = Path(__file__).resolve().parent.parent
DAY = 86400


@pytest.fixture
def source(write_jsonl):
    return write_jsonl("qa.jsonl", [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(30)])


def prepare(make_cfg, tokenizer, source, root, rows=None):
    """The train dataset of `rows` rows of `source` under `root`, by the real pass."""
    from trainers.prepared import stage_data

    cfg = make_cfg(f"data.train_file={source}", "data.eval_file=null", f"data.max_train_rows={rows or 'null'}")
    return stage_data(cfg, tokenizer, str(root)).train


def used_at(directory: Path, stamp: float) -> None:
    os.utime(directory / "last_used", (stamp, stamp))


def cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().out


def test_a_reuse_records_its_use_and_rewrites_no_data(make_cfg, tokenizer, source, tmp_path):
    root = tmp_path / "prepared"
    built = prepare(make_cfg, tokenizer, source, root)
    assert built.status == "built" and time.time() - (built.path / "last_used").stat().st_mtime < 60
    assert json.loads((built.path / "prepared.json").read_text())["inputs"]["source"] == str(source)
    week_ago = time.time() - 7 * DAY
    for name in ("data.arrow", "prepared.json", "last_used"):
        os.utime(built.path / name, (week_ago, week_ago))
    again = prepare(make_cfg, tokenizer, source, root)
    assert again.status == "reused" and again.path == built.path
    assert time.time() - (built.path / "last_used").stat().st_mtime < 60
    assert [int((built.path / n).stat().st_mtime) for n in ("data.arrow", "prepared.json")] == [int(week_ago)] * 2


def test_a_use_that_cannot_be_recorded_opens_the_data_anyway(make_cfg, tokenizer, source, tmp_path, caplog):
    root = tmp_path / "prepared"
    built = prepare(make_cfg, tokenizer, source, root)
    marker = built.path / "last_used"
    marker.unlink()
    marker.symlink_to(tmp_path / "not-there" / "marker")  # touching it fails, as on read-only storage
    with caplog.at_level(logging.DEBUG, logger="trainers"):
        again = prepare(make_cfg, tokenizer, source, root)
    assert again.status == "reused" and len(again.examples()) == 30
    assert "could not record the use" in caplog.text


def test_list_shows_each_dataset_and_the_totals_and_prune_leaves_what_is_not_one(make_cfg, tokenizer, source,
                                                                                   tmp_path, capsys):
    storage_path = tmp_path / "runs"
    sets = [prepare(make_cfg, tokenizer, source, storage_path / "prepared", rows) for rows in (10, 20, None)]
    used_at(sets[0].path, time.time() - 3 * DAY)
    writing = storage_path / "prepared" / f".{'0' * 24}.partial-1-ab"  # a pass under way
    stray = storage_path / "prepared" / "stray"
    for directory in (writing, stray):
        directory.mkdir()
        (directory / "data.arrow").write_bytes(b"x" * 50_000)
    code, out = cli(capsys, "--storage", str(storage_path), "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:5] == ["key", "product", "format", "rows", "size"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == {p.path.name[:12] for p in sets}
    for prepared, count in zip(sets, (10, 20, 30)):
        row = rows[prepared.path.name[:12]].split()
        assert row[1:4] == ["examples", "instruction", str(count)] and row[-1] == str(source)
    assert "(3d ago)" in rows[sets[0].path.name[:12]] and lines[3].startswith(sets[0].path.name[:12])
    total = sum(f.stat().st_size for p in sets for f in p.path.iterdir())
    assert lines[4].startswith("3 prepared datasets, ") and str(storage_path / "prepared") in lines[4]
    assert total > 10 * 1024 and f"{total / 1024:.1f} KiB" in lines[4]
    assert lines[5].startswith("1 not listed") and lines[5].endswith(": stray") and len(lines) == 6
    code, out = cli(capsys, "--storage", str(storage_path), "prune", "--keep", "0")
    assert code == 0 and "removed 3 of 3" in out
    assert sorted(p.name for p in (storage_path / "prepared").iterdir()) == [writing.name, "stray"]


def test_prune_by_age_removes_only_the_long_unused_and_the_next_pass_rebuilds(make_cfg, tokenizer, source,
                                                                              tmp_path, capsys):
    root = tmp_path / "prepared"
    old, recent, fresh = (prepare(make_cfg, tokenizer, source, root, rows) for rows in (10, 20, None))
    used_at(old.path, time.time() - 40 * DAY)
    used_at(recent.path, time.time() - 10 * DAY)
    before = sorted(p.name for p in root.iterdir())
    code, out = cli(capsys, "--storage", str(tmp_path), "prune", "--older-than", "30d", "--dry-run")
    assert code == 0 and old.path.name[:12] in out and recent.path.name[:12] not in out
    assert "would remove 1 of 3" in out and sorted(p.name for p in root.iterdir()) == before

    code, out = cli(capsys, "prune", "--storage", str(tmp_path), "--older-than", "30d")
    assert code == 0 and "removed 1 of 3" in out
    assert sorted(p.name for p in root.iterdir()) == sorted([recent.path.name, fresh.path.name])
    assert recent.examples()[0] == prepare(make_cfg, tokenizer, source, root, 20).examples()[0]
    rebuilt = prepare(make_cfg, tokenizer, source, root, 10)
    assert rebuilt.status == "built" and rebuilt.path == old.path and len(rebuilt.examples()) == 10


def test_prune_keeps_the_most_recently_used(make_cfg, tokenizer, source, tmp_path, capsys):
    root = tmp_path / "prepared"
    sets = [prepare(make_cfg, tokenizer, source, root, rows) for rows in (10, 20, None)]
    for prepared, days in zip(sets, (1, 50, 5)):
        used_at(prepared.path, time.time() - days * DAY)
    code, out = cli(capsys, "--storage", str(tmp_path), "prune", "--keep", "2", "--older-than", "60d")
    assert code == 0 and "removed 0 of 3" in out and len(list(root.iterdir())) == 3  # both must hold
    code, out = cli(capsys, "--storage", str(tmp_path), "prune", "--keep", "2", "--dry-run")
    assert "would remove 1 of 3" in out and len(list(root.iterdir())) == 3
    code, out = cli(capsys, "--storage", str(tmp_path), "prune", "--keep", "2")
    assert code == 0 and sorted(p.name for p in root.iterdir()) == sorted([sets[0].path.name, sets[2].path.name])
    cli(capsys, "--storage", str(tmp_path), "prune", "--keep", "0")
    assert list(root.iterdir()) == []


KILLED_PRUNE = """
import os, shutil, signal, sys
from trainers.prepared.prune import main
shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed as it deletes
main(["--storage", sys.argv[1], "prune", "--keep", "0"])
"""


def test_a_prune_killed_midway_leaves_no_dataset_taken_for_whole(make_cfg, tokenizer, source, tmp_path):
    root = tmp_path / "prepared"
    first = prepare(make_cfg, tokenizer, source, root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILLED_PRUNE, str(tmp_path)], env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    (aside,) = root.iterdir()
    assert aside.name.startswith(f".{first.path.name}.partial-") and (aside / "data.arrow").is_file()
    again = prepare(make_cfg, tokenizer, source, root)
    assert again.status == "built" and [p.name for p in root.iterdir()] == [first.path.name]


def test_a_remote_root_records_uses_and_is_listed_and_pruned_there(make_cfg, tokenizer, source, tmp_path,
                                                                   monkeypatch, capsys):
    """`local://` is a remote URI to trainers.storage (pyarrow.fs, no renames), with real mtimes."""
    monkeypatch.setenv("FTLAB_PREPARED_CACHE", str(tmp_path / "cache"))
    storage_uri = f"local://{tmp_path}/bucket/runs"
    root = tmp_path / "bucket" / "runs" / "prepared"
    old, kept = (prepare(make_cfg, tokenizer, source, f"{storage_uri}/prepared", rows) for rows in (10, None))
    assert old.path.parent == tmp_path / "cache" and (root / old.path.name / "last_used").is_file()
    used_at(root / kept.path.name, time.time() - DAY)
    assert prepare(make_cfg, tokenizer, source, f"{storage_uri}/prepared").status == "reused"  # from the cache
    assert time.time() - (root / kept.path.name / "last_used").stat().st_mtime < 60
    used_at(root / old.path.name, time.time() - 40 * DAY)
    code, out = cli(capsys, "--storage", storage_uri, "list")
    assert code == 0 and "(40d ago)" in out and "2 prepared datasets" in out
    code, out = cli(capsys, "--storage", storage_uri, "prune", "--older-than", "30d")
    assert code == 0 and "removed 1 of 2" in out and sorted(p.name for p in root.iterdir()) == [kept.path.name]
    assert (old.path / "data.arrow").is_file()  # this machine's copy is pruned with --cache
    used_at(old.path, time.time() - 40 * DAY)
    code, out = cli(capsys, "--cache", "prune", "--keep", "1")
    assert code == 0 and sorted(p.name for p in (tmp_path / "cache").iterdir()) == [kept.path.name]


@pytest.mark.parametrize("argv, message", [
    (["prune", "--older-than", "3x"], "--older-than: '3x' is not an age"),
    (["prune", "--keep", "-1"], "--keep: must be >= 0"),
    (["prune"], "give --older-than AGE, --keep N or both"),
    (["--storage", "{tmp}/missing", "list"], "--storage: {tmp}/missing is not a directory"),
])
def test_bad_arguments_name_the_argument_and_exit_2(tmp_path, capsys, argv, message):
    storage_path = tmp_path / "runs"
    storage_path.mkdir()
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--storage" not in argv:
        argv[1:1] = ["--storage", str(storage_path)]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message.format(tmp=tmp_path) in capsys.readouterr().err


def test_the_module_runs_as_a_command(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "trainers.prepared", "--storage", str(tmp_path)]
    listed = subprocess.run(command + ["list"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "0 prepared datasets" in listed.stdout
    bad = subprocess.run(command + ["prune", "--older-than", "30 days"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--older-than: '30 days' is not an age" in bad.stderr


def test_a_reader_that_saw_a_remote_dataset_just_pruned_builds_it_again(make_cfg, tokenizer, source, tmp_path,
                                                                         monkeypatch, capsys):
    """The race a remote prune leaves open: a pass saw prepared.json, then the pruner removed the
    dataset before the download. The pass must build it, not keep a copy without prepared.json."""
    from trainers import prepared as module

    monkeypatch.setenv("FTLAB_PREPARED_CACHE", str(tmp_path / "cache"))
    storage_uri = f"local://{tmp_path}/bucket/runs"
    first = prepare(make_cfg, tokenizer, source, f"{storage_uri}/prepared")
    cli(capsys, "--storage", storage_uri, "prune", "--keep", "0")
    cli(capsys, "--cache", "prune", "--keep", "0")
    assert not first.path.exists()
    monkeypatch.setattr(module.storage, "exists", lambda uri: True)  # what the pass saw before the prune
    again = prepare(make_cfg, tokenizer, source, f"{storage_uri}/prepared")
    assert again.status == "built" and again.path == first.path and len(again.examples()) == 30
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.path.name]


def test_on_s3_a_reuse_is_recorded_there_and_prune_removes_there(make_cfg, tokenizer, source, tmp_path,
                                                                  monkeypatch, capsys):
    """A real S3 endpoint (moto_server): an object's mtime is its upload time, so a use re-uploads
    the marker; the key's `directory` is only a prefix of objects."""
    import pyarrow.fs as pafs
    from servers import s3_server

    from trainers import storage

    with s3_server(tmp_path, "prepared-gc") as env:
        for name, value in {**env, "FTLAB_PREPARED_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(name, value)
        root = "s3://prepared-gc/runs/prepared"
        older, newer = (prepare(make_cfg, tokenizer, source, root, rows) for rows in (10, None))
        time.sleep(1.1)  # S3 times are whole seconds
        assert prepare(make_cfg, tokenizer, source, root, 10).status == "reused"
        code, out = cli(capsys, "--storage", "s3://prepared-gc/runs", "prune", "--keep", "1")
        assert code == 0 and "removed 1 of 2" in out and newer.path.name[:12] in out
        assert storage.list_dirs(root) == [older.path.name]
        fs, path = storage.filesystem(root)
        left = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        assert not [i.path for i in left if newer.path.name in i.path]
