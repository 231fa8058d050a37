"""Prepared data: each distinct input tokenized once, into a memory-mapped Arrow file that every
trial, DDP worker and rerun opens instead of tokenizing again.

    data = stage_data(cfg, tokenizer, root)   # root: <storage.path>/prepared
    data.train.examples()                     # lazy Examples (an SFT stage), .lengths in memory
    data.eval["examples+prompts"].prompts()   # ... or .pairs(), .prompts() as the stage trains

The driver's validation (trainers.trial.check_inputs) is the one pass that builds them; a trial
finds them built and only opens them (`data/prepared` = reused), a plain-process run
(`python -m trainers`) builds what is missing itself (`built`).

One prepared dataset per (split source, product) where a product is what a stage's data kind
needs of it: `examples` (input_ids, labels), `examples+prompts` (and each row's eval prompt),
`pairs` (chosen and rejected sides), `prompts` (prompt ids and known answer). Its key hashes all
it depends on: PREPARED_VERSION (the rendering code), the tokenizer's state (vocabulary, merges,
special tokens, eos), the template (name and sha256), the source's bytes
(trainers.data.source_fingerprint), the source's name, `data.columns`, `data.max_seq_len`,
`data.overlength`, the format and the row limit. Changed inputs give another key: an edited
data file, template or tokenizer is never read from an older preparation.

    <root>/<key>/data.arrow      Arrow IPC stream, one record batch per TOKENIZE_BATCH rows
                                 (`datasets.Dataset.from_file` opens it too)
    <root>/<key>/prepared.json   format, stats, inputs; written last: a directory without it is
                                 not a prepared dataset
    <root>/<key>/last_used       empty; its mtime is the last pass or trial that built or opened
                                 the dataset (`python -m trainers.prepared list|prune`, prepared/prune.py)

Written aside (`.<key>.partial-*`) and renamed into place, so a pass killed midway leaves nothing
that is taken for whole; a pass starting removes the partials of killed passes beside it
(clean_partials: never a live writer's, on this machine or another sharing the path). On a remote root (s3://...) the pass is written in a local cache
(FTLAB_PREPARED_CACHE, default the temp dir), uploaded with prepared.json last, and a reader
downloads it into that cache once per machine, then memory-maps the local copy (a use touches
the cached copy's marker and re-uploads the remote one).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from trainers import storage
from trainers.data import (DataError, DatasetStats, EvalPrompt, Example, PairExample, TOKENIZE_BATCH, examples_of,
                           no_rows_left, pairs_of, prompts_of, row_batches, source_fingerprint)
from trainers.sources import rows_hint
from trainers.templates import chat_template

PREPARED_VERSION = 1  # bump when rendering or tokenizing rows changes what a row becomes
DATA_FILE, META_FILE, USED_FILE = "data.arrow", "prepared.json", "last_used"
CACHE_ENV = "FTLAB_PREPARED_CACHE"
log = logging.getLogger("trainers")

# What each RecipeSpec.data_kind prepares of its train and eval sources.
PRODUCTS_OF_KIND = {
    "instruction": {"train": ("examples",), "eval": ("examples+prompts",)},
    "preference": {"train": ("pairs",), "eval": ("pairs", "prompts")},
    "prompts": {"train": ("prompts",), "eval": ("prompts",)},
}


def prepared_root(storage_path: str) -> str:
    """Where a sweep's prepared datasets live: `<storage.path>/prepared`."""
    return storage.join(storage.normalize(storage_path), "prepared")


# --------------------------------------------------------------------------- the key


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its serialized state (a fast tokenizer's
    tokenizer.json: vocabulary, merges, normalizer, added tokens) and its special tokens (eos may
    have been moved to the template's end-of-turn token)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = {"special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
               "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id,
               "add_bos": bool(getattr(tokenizer, "add_bos_token", False)), "class": type(tokenizer).__name__}
    return hashlib.sha256((state + json.dumps(special, sort_keys=True)).encode()).hexdigest()


def prepare_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def key_inputs(tokenizer, template, data, uri: str, limit: int | None, fmt: str, product: str) -> dict:
    return {"version": PREPARED_VERSION, "tokenizer": tokenizer_digest(tokenizer),
            "template": [template.name, template.sha256], "source": uri, "source_sha256": source_fingerprint(uri),
            "columns": data.columns.mapping(), "max_seq_len": data.max_seq_len, "overlength": data.overlength,
            "format": fmt, "product": product, "limit": limit}


# --------------------------------------------------------------------------- lazy rows


class ArrowRows(Sequence):
    """Rows of a memory-mapped Arrow table, built into Python objects only when indexed: what
    stays in memory is the table's mapping and, per record batch, numpy views of its list columns."""

    def __init__(self, table):
        self._batches = [b for b in table.to_batches() if b.num_rows]
        self._starts, total = [], 0
        for batch in self._batches:
            self._starts.append(total)
            total += batch.num_rows
        self._len = total
        self._lists: dict[tuple[int, str], tuple] = {}

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(index)
        b = bisect.bisect_right(self._starts, index) - 1
        return self.row(b, index - self._starts[b])

    def __iter__(self) -> Iterator:
        for b, batch in enumerate(self._batches):
            for j in range(batch.num_rows):
                yield self.row(b, j)

    def row(self, b: int, j: int):
        raise NotImplementedError

    def _list(self, b: int, name: str) -> tuple:
        if (b, name) not in self._lists:
            column = self._batches[b].column(name)
            self._lists[b, name] = (column.offsets.to_numpy(), column.values.to_numpy())
        return self._lists[b, name]

    def ints(self, b: int, j: int, name: str) -> list[int]:
        offsets, values = self._list(b, name)
        return values[offsets[j]:offsets[j + 1]].tolist()

    def text(self, b: int, j: int, name: str) -> str:
        return self._batches[b].column(name)[j].as_py()

    def list_lengths(self, name: str):
        """Length of every row's list `name`, as one int32 array (from the offsets only)."""
        import numpy as np

        return np.concatenate([np.diff(self._list(b, name)[0]) for b in range(len(self._batches))]
                              or [np.zeros(0, dtype=np.int32)])


class ExampleRows(ArrowRows):
    """Examples; `lengths` (their token counts) is what the batch planning reads instead of rows."""

    def __init__(self, table):
        super().__init__(table)
        self.lengths = self.list_lengths("input_ids")

    def row(self, b: int, j: int) -> Example:
        return Example(self.ints(b, j, "input_ids"), self.ints(b, j, "labels"), self.text(b, j, "source"))


class PromptRows(ArrowRows):
    def row(self, b: int, j: int) -> EvalPrompt:
        return EvalPrompt(self.ints(b, j, "prompt_ids"), self.text(b, j, "answer"), self.text(b, j, "source"))


class PairRows(ArrowRows):
    def row(self, b: int, j: int) -> PairExample:
        source = self.text(b, j, "source")
        sides = [Example(self.ints(b, j, f"{side}_ids"), self.ints(b, j, f"{side}_labels"), source)
                 for side in ("chosen", "rejected")]
        return PairExample(sides[0], sides[1], source)


# --------------------------------------------------------------------------- one prepared dataset


@dataclass
class Prepared:
    path: Path  # the local directory (a remote root's local copy)
    fmt: str
    stats: DatasetStats
    status: str  # "built" (by this call) or "reused"
    _table: object = field(default=None, repr=False)

    def table(self):
        """The memory-mapped table (no copy: its buffers point into the file's pages)."""
        if self._table is None:
            import pyarrow as pa

            with pa.memory_map(str(self.path / DATA_FILE)) as source:
                self._table = pa.ipc.open_stream(source).read_all()
        return self._table

    def examples(self) -> ExampleRows:
        return ExampleRows(self.table())

    def prompts(self) -> PromptRows:
        return PromptRows(self.table())

    def pairs(self) -> PairRows:
        return PairRows(self.table())


def _schema(product: str):
    import pyarrow as pa

    ints, text = pa.list_(pa.int32()), pa.string()
    columns = {
        "examples": [("input_ids", ints), ("labels", ints), ("source", text)],
        "examples+prompts": [("input_ids", ints), ("labels", ints), ("source", text), ("prompt_ids", ints),
                             ("answer", text)],
        "pairs": [("chosen_ids", ints), ("chosen_labels", ints), ("rejected_ids", ints), ("rejected_labels", ints),
                  ("source", text)],
        "prompts": [("prompt_ids", ints), ("answer", text), ("source", text)],
    }[product]
    return pa.schema(columns)


def _columns(product: str, template, rows: list[dict], sources: list[str], fmt: str, data,
             stats: DatasetStats) -> dict[str, list]:
    """One batch of rows as the product's columns; the first bad row raises DataError (source:row)."""
    limit, rule = data.max_seq_len, data.overlength
    if product in ("examples", "examples+prompts"):
        kept = examples_of(template, rows, sources, fmt, limit, rule, product == "examples+prompts", stats)
        columns = {"input_ids": [e.input_ids for e, _ in kept], "labels": [e.labels for e, _ in kept],
                   "source": [e.source for e, _ in kept]}
        if product == "examples+prompts":
            columns.update(prompt_ids=[p.prompt_ids for _, p in kept], answer=[p.answer for _, p in kept])
        return columns
    if product == "pairs":
        pairs = pairs_of(template, rows, sources, limit, rule, stats)
        return {"chosen_ids": [p.chosen.input_ids for p in pairs], "chosen_labels": [p.chosen.labels for p in pairs],
                "rejected_ids": [p.rejected.input_ids for p in pairs],
                "rejected_labels": [p.rejected.labels for p in pairs], "source": [p.source for p in pairs]}
    prompts = prompts_of(template, rows, sources, fmt, limit, rule, stats)
    return {"prompt_ids": [p.prompt_ids for p in prompts], "answer": [p.answer for p in prompts],
            "source": [p.source for p in prompts]}


NO_ROWS_WHAT = {"examples": "rows", "examples+prompts": "rows", "pairs": "preference pairs", "prompts": "prompts"}


# A source of more batches than this is encoded on worker processes after its first ones: a
# smaller one is done before a pool would have started.
POOL_AFTER_BATCHES = 4
_job_context: tuple = ()  # (template, data) of the pass under way; forked workers inherit it


def _encode_job(job: tuple) -> tuple:
    """One batch of rows -> ("ok", record batch, stats, rows) or ("error", message, None, rows):
    the same on a worker as here."""
    import pyarrow as pa

    product, fmt, rows, sources = job
    template, data = _job_context
    stats, schema = DatasetStats(), _schema(product)
    try:
        columns = _columns(product, template, rows, sources, fmt, data, stats)
    except DataError as err:
        return "error", str(err), None, len(rows)
    batch = pa.record_batch([pa.array(columns[f.name], f.type) for f in schema], schema=schema)
    return "ok", batch, stats, len(rows)


def pass_workers() -> int:
    """Processes a long pass encodes on: the CPUs this process may use, at most 8."""
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


def _encoded(jobs: Iterator[tuple], workers: int) -> Iterator[tuple]:
    """_encode_job of each job, in order: the first POOL_AFTER_BATCHES here, the rest on `workers`
    forked processes (rendering is Python, one core a process), a few batches ahead of the writer."""
    import itertools
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    yield from map(_encode_job, itertools.islice(jobs, POOL_AFTER_BATCHES))
    if workers < 2:
        yield from map(_encode_job, jobs)
        return
    # Set, the variable keeps the tokenizers library from printing a warning in every forked
    # worker (each then encodes on one thread, as it would anyway after a fork).
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    pending: deque = deque()
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            try:
                for job in jobs:
                    pending.append(pool.submit(_encode_job, job))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            except DataError:  # a row read after batches still encoding: theirs come first
                while pending:
                    yield pending.popleft().result()
                raise
            except BaseException:  # the writer stopped (a bad row, a signal): what is queued is not wanted
                for future in pending:
                    future.cancel()
                raise
    finally:
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def build(directory: Path, tokenizer, template, data, uri: str, limit: int | None, fmt: str, product: str,
          check_format: Callable[[str], None] | None = None, progress: Callable[[int], None] | None = None,
          workers: int | None = None, inputs: dict | None = None) -> str:
    """Tokenize the source into `directory` (data.arrow, then prepared.json, which records the
    key's `inputs` for `python -m trainers.prepared list`); returns the format.
    Reads and validates rows here, renders and tokenizes them in batches (on `workers` processes,
    default pass_workers(), for a long source) and writes them in order: memory holds a few
    batches, not the source. The first bad row in source order raises."""
    import pyarrow as pa

    global _job_context
    formats = [fmt]

    def jobs() -> Iterator[tuple]:
        for batch_fmt, rows, sources in row_batches(uri, fmt, limit, data.columns.mapping(), TOKENIZE_BATCH):
            if formats[-1] == "auto" and check_format is not None:
                check_format(batch_fmt)
            formats.append(batch_fmt)
            yield product, batch_fmt, rows, sources

    schema, stats, done = _schema(product), DatasetStats(), 0
    _job_context = (template, data)
    try:
        with pa.OSFile(str(directory / DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for status, batch, batch_stats, rows in _encoded(jobs(), pass_workers() if workers is None else workers):
                if status == "error":
                    raise DataError(batch)
                writer.write_batch(batch)
                stats.truncated += batch_stats.truncated
                stats.dropped += batch_stats.dropped
                done += rows
                if progress is not None:
                    progress(done)
    finally:
        _job_context = ()
    fmt = formats[-1]
    stats.rows = done - stats.dropped
    if not stats.rows:
        raise DataError(no_rows_left(NO_ROWS_WHAT[product], data.overlength, data.max_seq_len))
    meta = {"format": fmt, "product": product, "stats": vars(stats), "source_rows": done}
    if inputs is not None:
        meta["inputs"] = inputs
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return fmt


def _open(directory: Path, status: str) -> Prepared:
    meta = json.loads((directory / META_FILE).read_text())
    return Prepared(directory, meta["format"], DatasetStats(**meta["stats"]), status)


def _complete(directory: Path) -> bool:
    return (directory / META_FILE).is_file()


# A partial directory is a pass under way, or one that died. Its owner file names its writer's
# machine (host and pid namespace) and pid: one of this machine is gone when that process no
# longer runs (a reused pid keeps it, which is the safe side). One of another machine (a shared
# storage path), or one without an owner file, is taken for dead once nothing in it changed for
# STALE_PARTIAL_S: a live pass writes a batch every few seconds.
OWNER_FILE = "owner.json"
STALE_PARTIAL_S = 24 * 3600


def _machine() -> str:
    """This machine as its processes see it: the host name and the pid namespace (containers that
    share a host name but not their pids are different machines to a pid)."""
    import socket

    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _writer_gone(partial: Path, now: float) -> bool:
    try:
        owner = json.loads((partial / OWNER_FILE).read_text())
        if owner["machine"] == _machine():
            return not _alive(int(owner["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no owner (killed as it began, or renaming) or another format: its age decides
    try:
        changed = max([partial.stat().st_mtime] + [p.stat().st_mtime for p in partial.iterdir()])
    except OSError:  # gone meanwhile (renamed into place, or another cleaner)
        return False
    return now - changed > STALE_PARTIAL_S


def clean_partials(directory: Path) -> None:
    """Remove the partial directories in `directory` whose writer is gone (killed passes); a live
    writer's, here or on another machine, is kept."""
    now = time.time()
    for partial in directory.glob(".*.partial-*"):
        if partial.is_dir() and _writer_gone(partial, now):
            shutil.rmtree(partial, ignore_errors=True)


def _aside(final: Path) -> Path:
    """A new partial directory beside `final`, owned by this process; the killed passes' partials
    there are removed first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(final.parent)
    partial = _partial_of(final)
    partial.mkdir()
    _own(partial)
    return partial


def _partial_of(final: Path) -> Path:
    return final.parent / f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _own(partial: Path) -> None:
    owner = {"machine": _machine(), "pid": os.getpid(), "started": time.time()}
    (partial / OWNER_FILE).write_text(json.dumps(owner) + "\n")


def retire(final: Path) -> bool:
    """Delete a prepared dataset (python -m trainers.prepared prune): renamed to a partial of this
    process first, so a reader never opens it half deleted (it finds none, and a pass builds it
    again) and a deleter killed midway leaves a partial that clean_partials removes. False when
    it was gone already."""
    partial = _partial_of(final)
    try:
        os.rename(final, partial)
    except FileNotFoundError:
        return False
    try:
        _own(partial)
    except OSError:  # another pass's clean_partials took the unowned partial already
        pass
    shutil.rmtree(partial, ignore_errors=True)
    return True


def _into_place(partial: Path, final: Path) -> None:
    """Rename a finished directory into place; one already there (another process's pass of the
    same inputs) is kept and ours dropped."""
    (partial / OWNER_FILE).unlink(missing_ok=True)
    try:
        os.rename(partial, final)
    except OSError:
        if not _complete(final):
            raise
        shutil.rmtree(partial, ignore_errors=True)


def local_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "finetune-lab-prepared")


def prepare(tokenizer, template, data, uri: str, limit: int | None, fmt: str, product: str, root: str,
            check_format: Callable[[str], None] | None = None,
            progress: Callable[[int], None] | None = None) -> Prepared:
    """The prepared dataset of (source, product) under `root`: opened when it exists, else built
    (written aside, renamed into place; on a remote root also uploaded, prepared.json last: a
    copy this machine's cache holds is uploaded too, so other nodes find it)."""
    inputs = key_inputs(tokenizer, template, data, uri, limit, fmt, product)
    key = prepare_key(inputs)
    remote = storage.is_remote(root)
    final = (local_cache() if remote else Path(storage.normalize(root))) / key
    location = storage.join(root, key) if remote else None
    uploaded = remote and storage.exists(storage.join(root, key, META_FILE))
    if _complete(final):
        if remote and not uploaded:
            _upload(final, location)
        return _used(_open(final, "reused"), location)
    if uploaded:
        partial = _aside(final)
        if all(storage.download(storage.join(root, key, name), partial / name) for name in (DATA_FILE, META_FILE)):
            _into_place(partial, final)
            return _used(_open(final, "reused"), location)
        shutil.rmtree(partial, ignore_errors=True)  # pruned since (prepared/prune.py): built again, as if never uploaded
    partial = _aside(final)
    try:
        build(partial, tokenizer, template, data, uri, limit, fmt, product, check_format, progress, inputs=inputs)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if remote:
        _upload(partial, location)
    _into_place(partial, final)
    return _used(_open(final, "built"), location)


def _used(prepared: Prepared, location: str | None) -> Prepared:
    """Record that `prepared` was used now (the mtime of its USED_FILE, and of the remote one at
    `location`), for pruning the least recently used. Storage that refuses the write (read-only, a
    remote without write access) only loses that record: the trial goes on."""
    marker = prepared.path / USED_FILE
    try:
        marker.touch()
    except OSError as err:
        log.debug("prepared data: could not record the use of %s: %s", prepared.path, err)
    if location is not None:
        try:
            storage.upload(marker, storage.join(location, USED_FILE))
        except Exception as err:  # pyarrow and fsspec raise their own kinds: any is only a lost record
            log.debug("prepared data: could not record the use of %s: %s", location, err)
    return prepared


def _upload(directory: Path, location: str) -> None:
    for name in (DATA_FILE, META_FILE):  # the marker last: a reader never sees data without it whole
        storage.upload(directory / name, storage.join(location, name))


# --------------------------------------------------------------------------- a stage's data


@dataclass
class StageData:
    """What a stage trains and evaluates on, prepared: the train source's product and the eval
    source's products (empty without data.eval_file)."""

    train: Prepared
    eval: dict[str, Prepared]
    started: float  # perf_counter when loading began

    @property
    def status(self) -> str:
        """`built` when this process tokenized any of it, else `reused` (tag data/prepared)."""
        built = any(p.status == "built" for p in (self.train, *self.eval.values()))
        return "built" if built else "reused"

    def counts(self) -> dict[str, int]:
        counts = self.train.stats.as_metrics("train")
        if self.eval:
            counts.update(next(iter(self.eval.values())).stats.as_metrics("eval"))
        return counts

    def describe(self) -> str:
        """One line for the plan: built or reused, rows, where."""
        parts = [f"train {self.train.stats.rows:,} rows"]
        parts += [f"eval {p.stats.rows:,} {product}" for product, p in self.eval.items()]
        took = time.perf_counter() - self.started
        return f"{self.status} in {took:.1f}s ({', '.join(parts)}) under {self.train.path.parent}"

    def ready(self, first_batch: Callable[[], object] | None = None) -> dict[str, float]:
        """`time/data_s`: from the start of loading until the first training item is built."""
        if first_batch is not None:
            first_batch()
        return {"time/data_s": time.perf_counter() - self.started}


def stage_data(cfg, tokenizer, root: str | None = None,
               progress: Callable[[str, Callable[[], int | None]], Callable[[int], None]] | None = None,
               started: float | None = None) -> StageData:
    """The prepared data of the trial's stage (its RecipeSpec.data_kind says which products), under
    `root` (default `<storage.path>/prepared`). A format the stage does not train on is a
    DataError naming the source; `progress(label, total)` gives a rows-done callback per pass
    (`total()`: about how many rows it will read, or None; asked only if a bar is shown)."""
    from trainers.recipes.base import RECIPES  # filled as trainers.recipes (imported first) registers

    started = time.perf_counter() if started is None else started
    recipe = RECIPES[cfg.stage.name]
    data, products = cfg.data, PRODUCTS_OF_KIND[recipe.data_kind]
    template = chat_template(tokenizer, data.template)
    root = root or prepared_root(cfg.storage.path)

    def formats(uri: str) -> Callable[[str], None]:
        def check(fmt: str) -> None:
            if fmt not in recipe.data_formats:
                raise DataError(f"{uri}: holds {fmt} rows; stage {recipe.name} trains on "
                                f"{' or '.join(recipe.data_formats)} data (set data.train_file/data.eval_file, "
                                "or data=...)")
        return check

    def one(split: str, uri: str, limit: int | None, fmt: str, product: str) -> Prepared:
        report = None
        if progress is not None:
            report = progress(f"{split} {uri} ({product})", lambda: rows_hint(uri, limit))
        prepared = prepare(tokenizer, template, data, uri, limit, fmt, product, root, formats(uri), report)
        formats(uri)(prepared.fmt)  # a reused one was checked for another stage, perhaps
        return prepared

    train = one("train", data.train_file, data.max_train_rows, data.format, products["train"][0])
    evaluation = {}
    if data.eval_file:
        for product in products["eval"]:
            evaluation[product] = one("eval", data.eval_file, data.max_eval_rows, train.fmt, product)
    return StageData(train, evaluation, started)

