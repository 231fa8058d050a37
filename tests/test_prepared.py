"""Prepared data (trainers/prepared): batched tokenization equals the one-row path token for
token; a dataset is built once per distinct input and reused, never across changed inputs; a
pass that dies midway leaves nothing taken for whole; rows are read lazily from the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_templates import CHAT, CHATML, LLAMA3, NO_SYSTEM, SPECIALS, make_tokenizer
from trainers.data import DataError, load_rows, prompts_with_answers, tokenize_pairs, tokenize_split
from trainers.templates import TemplateError, chat_template

REPO = Path(__file__).resolve().parent.parent
INSTRUCT = "embedded:instruct_train.jsonl"
PREFS = "embedded:pref_train.jsonl"


def chat_tokenizers(tokenizer):
    return {"plain": (tokenizer, "plain"),
            "chatml": (make_tokenizer(CHATML, SPECIALS["chatml"], "<|im_end|>"), "model"),
            "llama3": (make_tokenizer(LLAMA3, SPECIALS["llama3"], "<|eot_id|>"), "model")}


def chat_rows(n: int) -> list[dict]:
    turns = [{"role": "user", "content": f"What is {i} plus {i % 7}?"} if k % 2 == 0 else
             {"role": "assistant", "content": f" {2 * i + k} "} for i in range(3) for k in range(2)]
    return [{"messages": ([CHAT[0]] if i % 3 == 0 else []) + turns[:2 * (1 + i % 3)]} for i in range(n)]


@pytest.mark.parametrize("style", ["plain", "chatml", "llama3"])
def test_batched_rendering_equals_the_one_row_path_token_for_token(tokenizer, style):
    tok, setting = chat_tokenizers(tokenizer)[style]
    template = chat_template(tok, setting)
    _, instruction, _ = load_rows(INSTRUCT, limit=300)
    _, pairs, _ = load_rows(PREFS, "preference", limit=100)
    for rows, fmt in ((instruction, "instruction"), (chat_rows(60), "chat")):
        batched = template.encode_many(rows, fmt, with_prompts=True)
        assert batched == [(*template.encode(row, fmt), template.prompt(row, fmt)) for row in rows]
        assert template.prompt_many(rows, fmt) == [template.prompt(row, fmt) for row in rows]
    assert template.pair_many(pairs) == [template.pair(row) for row in pairs]
    assert template.prompt_many(pairs, "preference") == [template.prompt(row, "preference") for row in pairs]


def test_a_batch_reports_each_rows_own_template_error():
    template = chat_template(make_tokenizer(NO_SYSTEM, SPECIALS["chatml"], "<|im_end|>"), "model")
    good = {"messages": CHAT[1:3]}
    results = template.encode_many([good, {"messages": CHAT}, good], "chat")
    assert isinstance(results[1], TemplateError) and "System role not supported" in str(results[1])
    assert results[0] == results[2] == (*template.encode(good, "chat"), None)


def prepare_embedded(cfg, tok, root, **changes):
    from trainers.prepared import stage_data

    for key, value in changes.items():
        setattr(cfg.data, key, value)
    return stage_data(cfg, tok, str(root))


def test_prepared_rows_are_todays_tokenization_read_lazily(make_cfg, tokenizer, tmp_path):
    from trainers.prepared import ExampleRows

    cfg = make_cfg("data.max_train_rows=500")
    data = prepare_embedded(cfg, tokenizer, tmp_path)
    fmt, rows, sources = load_rows(cfg.data.train_file, limit=500)
    expected = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, cfg.data.overlength).examples
    examples = data.train.examples()
    assert isinstance(examples, ExampleRows) and len(examples) == 500
    assert list(examples) == expected and examples[-1] == expected[-1] and examples[10:13] == expected[10:13]
    assert list(examples.lengths) == [len(e.input_ids) for e in expected]
    _, rows, sources = load_rows(cfg.data.eval_file, fmt)
    split = tokenize_split(tokenizer, rows, sources, fmt, cfg.data.max_seq_len, "error", with_prompts=True)
    evaluation = data.eval["examples+prompts"]
    assert list(evaluation.examples()) == split.examples and list(evaluation.prompts()) == split.prompts


def test_preference_and_prompt_products_match_todays(make_cfg, tokenizer, tmp_path):
    cfg = make_cfg("stage=dpo", "data=embedded_pref", "data.max_train_rows=64", "data.max_eval_rows=16")
    data = prepare_embedded(cfg, tokenizer, tmp_path)
    _, rows, sources = load_rows(cfg.data.train_file, "preference", 64)
    assert list(data.train.pairs()) == tokenize_pairs(tokenizer, rows, sources, cfg.data.max_seq_len, "error")[0]
    _, rows, sources = load_rows(cfg.data.eval_file, "preference", 16)
    assert list(data.eval["prompts"].prompts()) == prompts_with_answers(tokenizer, rows, sources, "preference",
                                                                        cfg.data.max_seq_len, "error")[0]


def test_a_changed_input_is_never_reused(make_cfg, tokenizer, tmp_path, write_jsonl):
    rows = [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(30)]
    path = write_jsonl("d.jsonl", rows)
    cfg = make_cfg(f"data.train_file={path}", "data.eval_file=null")
    root = tmp_path / "prepared"
    first = prepare_embedded(cfg, tokenizer, root)
    assert first.status == "built"
    again = prepare_embedded(cfg, tokenizer, root)
    assert again.status == "reused" and again.train.path == first.train.path
    assert again.train.examples()[0] == first.train.examples()[0]

    path.write_text(path.read_text().replace('"4"', '"four"'))  # the data file edited
    edited = prepare_embedded(cfg, tokenizer, root)
    assert edited.status == "built" and edited.train.path != first.train.path
    assert any(e.labels[-2] != f.labels[-2] for e, f in zip(edited.train.examples(), first.train.examples()))
    seen = {first.train.path, edited.train.path}
    for changes in ({"max_seq_len": 64}, {"overlength": "drop"}, {"max_train_rows": 10}):
        other = prepare_embedded(cfg, tokenizer, root, **changes)
        assert other.status == "built" and other.train.path not in seen
        seen.add(other.train.path)
    chatml = make_tokenizer(CHATML, SPECIALS["chatml"], "<|im_end|>")
    for tok, template in ((chatml, "plain"), (chatml, "model")):  # another tokenizer; another template
        other = prepare_embedded(cfg, tok, root, template=template)
        assert other.status == "built" and other.train.path not in seen
        seen.add(other.train.path)


def test_a_bad_row_stops_the_pass_naming_it_and_leaves_nothing(make_cfg, tokenizer, tmp_path, write_jsonl):
    rows = [{"instruction": f"q{n}", "output": "a"} for n in range(2500)]
    rows[1700] = {"instruction": "q", "output": ""}
    cfg = make_cfg(f"data.train_file={write_jsonl('bad.jsonl', rows)}", "data.eval_file=null")
    with pytest.raises(DataError, match=r"bad.jsonl:1701: field 'output' is empty"):
        prepare_embedded(cfg, tokenizer, tmp_path / "prepared")
    assert list((tmp_path / "prepared").iterdir()) == []  # the first batches' part is gone too


KILLED_PASS = """
import os, signal, sys
from orchestrator.compose import compose
from trainers.model import load_tokenizer
from trainers.prepared import stage_data
cfg = compose(["data.train_file=" + sys.argv[1], "data.eval_file=null"])
def die(done):
    if done >= 2000:  # two batches written: the file is half there
        os.kill(os.getpid(), signal.SIGKILL)
stage_data(cfg, load_tokenizer(cfg.model), sys.argv[2], progress=lambda label, total: die)
"""


def test_a_pass_killed_midway_is_never_taken_for_whole(make_cfg, tokenizer, tmp_path, write_jsonl):
    rows = [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(3000)]
    path, root = write_jsonl("d.jsonl", rows), tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", KILLED_PASS, str(path), str(root)], env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    (partial,) = root.iterdir()
    assert partial.name.startswith(".") and (partial / "data.arrow").stat().st_size > 0
    cfg = make_cfg(f"data.train_file={path}", "data.eval_file=null")
    data = prepare_embedded(cfg, tokenizer, root)
    assert data.status == "built" and len(data.train.examples()) == 3000
    assert [p.name for p in root.iterdir()] == [data.train.path.name]  # the killed pass's partial is gone


def test_a_pass_removes_only_the_partials_whose_writer_is_gone(make_cfg, tokenizer, tmp_path):
    """Two drivers may prepare on one shared path: a partial is removed when its writer was of
    this machine and has exited, or when nothing in it changed for STALE_PARTIAL_S (another
    machine's, or one killed before it named its owner); a live writer's is kept."""
    from trainers import prepared

    root = tmp_path / "prepared"
    root.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here, day_ago = prepared._machine(), time.time() - prepared.STALE_PARTIAL_S - 60
    partials = {"live here": (here, live.pid, False), "exited here": (here, int(exited.stdout), False),
                "other machine": ("elsewhere/1", int(exited.stdout), False),
                "other machine, a day untouched": ("elsewhere/1", live.pid, True),
                "no owner": (None, None, False), "no owner, a day untouched": (None, None, True)}
    try:
        for n, (name, (machine, pid, old)) in enumerate(partials.items()):
            partial = root / f".k{n}.partial-{name.replace(' ', '_').replace(',', '')}"
            partial.mkdir()
            (partial / "data.arrow").write_bytes(b"half")
            if machine is not None:
                (partial / "owner.json").write_text(json.dumps({"machine": machine, "pid": pid}))
            if old:
                for path in (*partial.iterdir(), partial):
                    os.utime(path, (day_ago, day_ago))
        cfg = make_cfg("data.max_train_rows=20", "data.eval_file=null")
        data = prepare_embedded(cfg, tokenizer, root)
        left = sorted(p.name for p in root.iterdir())
    finally:
        live.kill()
        live.wait()
    assert left == sorted([".k0.partial-live_here", ".k2.partial-other_machine", ".k4.partial-no_owner",
                           data.train.path.name])


def test_a_remote_root_is_uploaded_once_and_read_from_a_local_copy(make_cfg, tokenizer, tmp_path, monkeypatch):
    from trainers import storage

    monkeypatch.setenv("FTLAB_PREPARED_CACHE", str(tmp_path / "node1"))
    root = f"memory://prepared-test-{os.getpid()}/prepared"
    cfg = make_cfg("data.max_train_rows=200", "data.eval_file=null")
    built = prepare_embedded(cfg, tokenizer, root)
    assert built.status == "built" and storage.exists(storage.join(root, built.train.path.name, "prepared.json"))
    monkeypatch.setenv("FTLAB_PREPARED_CACHE", str(tmp_path / "node2"))  # another machine
    fetched = prepare_embedded(cfg, tokenizer, root)
    assert fetched.status == "reused" and fetched.train.path.parent == tmp_path / "node2"
    assert list(fetched.train.examples()) == list(built.train.examples())


def test_batches_from_prepared_rows_equal_those_from_a_list(make_cfg, tokenizer, tmp_path):
    from trainers.data import pack_examples
    from trainers.runtime import DistInfo
    from trainers.training import micro_batches

    data = prepare_embedded(make_cfg("data.max_train_rows=300"), tokenizer, tmp_path)
    lazy = data.train.examples()
    eager = list(lazy)
    for group in (False, True):
        streams = [micro_batches(rows, 8, seed=1, dist=DistInfo(), group_by_length=group) for rows in (lazy, eager)]
        assert [next(streams[0]) for _ in range(60)] == [next(streams[1]) for _ in range(60)]
    assert pack_examples(lazy, 96, seed=0) == pack_examples(eager, 96, seed=0)


def test_a_trial_reuses_what_validation_prepared_and_says_so(make_cfg, tmp_path):
    from trainers.tracking import Tracker
    from trainers.trial import prepare_inputs, run_trial

    class Recording(Tracker):
        def __init__(self):
            self.tags, self.metrics = {}, {}

        def set_tags(self, tags):
            self.tags.update(tags)

        def log_metrics(self, metrics, step=None):
            self.metrics.update(metrics)

    cfg = make_cfg("data.max_train_rows=64", "data.max_eval_rows=8", "train.max_steps=1", "train.batch_size=4",
                   "train.checkpoint_every=0", "data.max_new_tokens=2", f"storage.path={tmp_path}")
    assert prepare_inputs(cfg).status == "built"
    markers = list((tmp_path / "prepared").glob("*/last_used"))
    for marker in markers:  # last used a week ago: the trial's use is recorded (pruning goes by it)
        os.utime(marker, (marker.stat().st_mtime - 7 * 86400,) * 2)
    tracker = Recording()
    run_trial(cfg, tmp_path / "out", tracker=tracker)
    assert tracker.tags == {"data/prepared": "reused"} and 0 < tracker.metrics["time/data_s"] < 60
    assert len(markers) == 2 and all(time.time() - m.stat().st_mtime < 600 for m in markers)
    assert json.loads(next((tmp_path / "prepared").glob("*/prepared.json")).read_text())["stats"]["rows"] in (8, 64)


def test_a_pass_on_worker_processes_writes_the_same_and_reports_the_first_bad_row(make_cfg, tokenizer, tmp_path,
                                                                                   write_jsonl, monkeypatch):
    from trainers import prepared

    monkeypatch.setattr(prepared, "TOKENIZE_BATCH", 50)
    monkeypatch.setattr(prepared, "POOL_AFTER_BATCHES", 1)
    rows = [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(600)]
    rows[99]["output"] = "one two three " * 30  # over max_seq_len: dropped, counted
    cfg = make_cfg(f"data.train_file={write_jsonl('d.jsonl', rows)}", "data.overlength=drop")
    template = chat_template(tokenizer, "auto")
    built = []
    for workers in (1, 2):
        directory = tmp_path / f"w{workers}"
        directory.mkdir()
        prepared.build(directory, tokenizer, template, cfg.data, cfg.data.train_file, None, "auto", "examples",
                       workers=workers)
        built.append((prepared._open(directory, "built").examples(), (directory / "prepared.json").read_text()))
    assert list(built[0][0]) == list(built[1][0]) and len(built[0][0]) == 599 and built[0][1] == built[1][1]

    # Now row 100 (a worker's batch) is an error, and row 180 breaks a row rule: read while row
    # 100's batch is still on a worker, it must not be the one reported.
    cfg.data.overlength = "error"
    rows[179] = {"instruction": "q"}
    path = write_jsonl("bad.jsonl", rows)
    for workers in (1, 2):
        directory = tmp_path / f"bad{workers}"
        directory.mkdir()
        with pytest.raises(DataError, match=r"bad.jsonl:100: \d+ tokens exceeds data.max_seq_len"):
            prepared.build(directory, tokenizer, template, cfg.data, str(path), None, "auto", "examples",
                           workers=workers)


def test_the_drivers_pass_returns_what_stops_a_sweep_as_data(make_cfg, write_jsonl, tmp_path):
    """What a cluster's Ray task hands back to the driver (orchestrator/prepare.py): plain data."""
    from orchestrator.prepare import prepare_here
    from trainers.config import to_container

    bad = write_jsonl("bad.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    result = prepare_here(to_container(make_cfg(f"data.train_file={bad}", "data.eval_file=null")), str(tmp_path))
    assert result == {"error": f"{bad}:2: missing field 'output'"}
    missing = to_container(make_cfg(f"model.name_or_path={tmp_path / 'nope'}"))
    assert prepare_here(missing, str(tmp_path))["problems"][0][0] == "model.name_or_path"
    good = prepare_here(to_container(make_cfg("data.max_train_rows=20")), str(tmp_path))
    assert good["template"] == "plain" and good["status"] == "built" and "train 20 rows" in good["line"]


def test_a_cached_copy_missing_from_the_remote_root_is_uploaded(make_cfg, tokenizer, tmp_path, monkeypatch):
    from trainers import storage

    monkeypatch.setenv("FTLAB_PREPARED_CACHE", str(tmp_path / "node"))
    cfg = make_cfg("data.max_train_rows=50", "data.eval_file=null")
    first = prepare_embedded(cfg, tokenizer, f"memory://prepared-a-{os.getpid()}/prepared")
    other = f"memory://prepared-b-{os.getpid()}/prepared"  # another sweep's storage, same machine
    again = prepare_embedded(cfg, tokenizer, other)
    assert first.status == "built" and again.status == "reused"
    assert storage.exists(storage.join(other, again.train.path.name, "prepared.json"))


def test_packed_and_padding_free_rows_read_only_what_they_build(make_cfg, tokenizer, tmp_path):
    """Planned from the prepared dataset's lengths: packing reads no example, a packed row reads
    just its own, and the rows equal those packed from a list of the same examples."""
    from packing_reference import eager_pack, eager_padding_free
    from trainers.data import DatasetStats, pack_examples, padding_free_rows
    from trainers.prepared import ExampleRows

    class Counted(ExampleRows):
        def row(self, b, j):
            self.reads += 1
            return super().row(b, j)

    data = prepare_embedded(make_cfg("data.max_train_rows=300"), tokenizer, tmp_path)
    lazy = Counted(data.train.table())
    lazy.reads = 0
    eager = list(lazy)
    lazy.reads = 0
    packed = pack_examples(lazy, 96, seed=0)
    free = padding_free_rows(lazy, 256, "error", seed=0, stats=DatasetStats())
    assert lazy.reads == 0
    row = packed[3]
    assert lazy.reads == len(row.source.split(","))
    assert list(packed) == eager_pack(eager, 96, 0) and list(free) == eager_padding_free(eager, 256, "error", 0,
                                                                                       DatasetStats())


def drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pty's controller side until its terminal side is closed."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal side is closed and all was read
            return
        if not chunk:
            return
        chunks.append(chunk)


def test_a_slow_pass_shows_a_progress_bar_of_rows_done_on_a_terminal(make_cfg, write_jsonl, tmp_path, monkeypatch):
    """The driver's bar (orchestrator/prepare.py), drawn by rich on a real terminal (a pty): with
    the threshold at 0 the pass shows its source and the rows done; a quick pass shows nothing."""
    import pty
    import re
    import threading

    from orchestrator import prepare
    from trainers import prepared
    from trainers.config import to_container

    monkeypatch.setattr(prepared, "TOKENIZE_BATCH", 500)  # a few updates
    monkeypatch.setenv("COLUMNS", "80")
    rows = [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(2400)]
    path = write_jsonl("d.jsonl", rows)
    shown = {}
    for threshold in (0.0, 60.0):  # 60: a pass quicker than the threshold, even on a loaded machine
        monkeypatch.setattr(prepare, "PROGRESS_AFTER_S", threshold)
        controller, terminal = pty.openpty()
        chunks: list[bytes] = []
        reader = threading.Thread(target=drain, args=(controller, chunks))  # a full terminal would block rich
        reader.start()
        with open(terminal, "w") as stream:
            progress = prepare.PassProgress(stream)
            rows_taken = 2400 if threshold == 0 else 40
            cfg = make_cfg(f"data.train_file={path}", "data.eval_file=null", f"data.max_train_rows={rows_taken}")
            result = prepare.prepare_here(to_container(cfg), str(tmp_path / "prepared"), progress)
            progress.close()
        reader.join()
        os.close(controller)
        assert result["status"] == "built"
        shown[threshold] = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "preparing train /" in shown[0.0] and "2,400 rows" in shown[0.0]  # a long path cut, not the count
    assert "100%" in shown[0.0]  # its total: the file's 2,400 lines
    assert shown[60.0] == ""


def test_a_bars_total_is_the_jsonl_files_lines_up_to_the_limit(tmp_path):
    from trainers.sources import rows_hint

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n' * 3 + b'{"a": 3}')  # no newline at the end
    assert rows_hint(str(path)) == 10 and rows_hint(str(path), limit=4) == 4
    (tmp_path / "d.csv").write_text("a\n1\n")
    assert rows_hint(str(tmp_path / "d.csv")) is None and rows_hint(str(tmp_path / "missing.jsonl")) is None


def test_a_hub_dataset_updated_upstream_is_prepared_again(make_cfg, tokenizer, tmp_path, hub_dataset, monkeypatch):
    import trainers.sources

    rows = [{"instruction": f"What is {n} plus 1?", "output": str(n + 1)} for n in range(6)]
    hub_dataset("owner/qa", "a" * 40, rows)
    cfg = make_cfg("data.train_file=hf:owner/qa", "data.eval_file=null")
    root = tmp_path / "prepared"
    first = prepare_embedded(cfg, tokenizer, root)
    assert first.status == "built" and len(first.train.examples()) == 6
    assert prepare_embedded(cfg, tokenizer, root).status == "reused"

    hub_dataset("owner/qa", "b" * 40, rows[:4])  # a new commit upstream, loaded once online since
    monkeypatch.setattr(trainers.sources, "_revisions", {})  # the user's next sweep: a new process
    updated = prepare_embedded(cfg, tokenizer, root)
    assert updated.status == "built" and updated.train.path != first.train.path
    assert len(updated.train.examples()) == 4
