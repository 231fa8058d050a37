"""Where data rows come from: the values `data.train_file` / `data.eval_file` accept.

    PATH.jsonl        JSON Lines, one object a line             rows named PATH:LINE
    PATH.json         a JSON array of objects (or JSON Lines)   PATH:row N (PATH:LINE)
    PATH.csv          a header line, then rows; cells are text  PATH:LINE
    PATH.parquet                                                PATH:row N
    DIR               a `datasets` save_to_disk directory       DIR:row N
    DIR:SPLIT         one split of a saved DatasetDict          DIR:SPLIT:row N
    hf:NAME[:SPLIT]   datasets.load_dataset(NAME, split=SPLIT or train): a hub dataset (needs the
                      hub, or offline a build of it in the datasets cache) or a local dataset
                      directory                                 hf:NAME:SPLIT:row N
    hf:NAME@REV[:SPLIT]  a hub dataset at a revision: a branch, tag or commit
                      (load_dataset's revision=)                hf:NAME@REV:SPLIT:row N
    embedded:NAME     a file shipped with the project

Row N counts from 1 (row 1 is dataset[0]). `data.columns` ({field: column}) renames columns to
the fields the formats use (instruction/input/output, messages, prompt/chosen/rejected); a
column it names that the data lacks is an error naming it.

A hub dataset is identified by the commit its rows come from (`hub_revision`), so data updated
upstream is not taken for the data prepared before: the hub's answer for the revision; offline
(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or the hub unreachable) the commit of the newest build of
it in the datasets cache, which is what load_dataset reads then, whatever the revision (a pin to
another commit is an error offline).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator


class DataError(ValueError):
    """A data source breaks a rule; the message starts with `source:row:` (or `file:line:`)."""


@dataclass
class Row:
    source: str  # "file:line" or "source:row N"
    data: dict[str, Any]


HF_PREFIX = "hf:"
HUB_TIMEOUT_S = 10.0  # asking the hub for a commit; past it the datasets cache answers, as offline

log = logging.getLogger("trainers.sources")
_revisions: dict[tuple[str, str | None], str | None] = {}


def resolve_path(uri: str) -> Path:
    """`embedded:NAME` -> a file shipped with the project; anything else is a filesystem path."""
    from trainers import embedded

    if embedded.is_embedded(uri):
        return embedded.resolve(uri)
    return Path(uri).expanduser()


def split_suffix(uri: str) -> tuple[str, str | None]:
    """`NAME:SPLIT` -> (NAME, SPLIT); a last part with a slash is a path, not a split."""
    head, sep, tail = uri.rpartition(":")
    if sep and head and tail and "/" not in tail:
        return head, tail
    return uri, None


def local_path(uri: str) -> Path | None:
    """The local file or directory a source reads (to fingerprint it); None when missing or remote."""
    if uri.startswith(HF_PREFIX):
        uri = split_suffix(uri[len(HF_PREFIX):])[0]
    for candidate in (uri, split_suffix(uri)[0]):
        path = resolve_path(candidate)
        if path.exists():
            return path
    return None


def read_rows(uri: str, columns: dict[str, str] | None = None, limit: int | None = None) -> Iterator[Row]:
    """The rows of a source (up to `limit`), columns renamed per `data.columns`."""
    rows = _raw_rows(uri)
    count = 0
    for row in rows:
        if columns:
            row = Row(row.source, _renamed(row, columns))
        yield row
        count += 1
        if limit is not None and count >= limit:
            return


def _renamed(row: Row, columns: dict[str, str]) -> dict[str, Any]:
    for field, column in columns.items():
        if column not in row.data:
            raise DataError(f"{row.source}: no column {column!r} (data.columns.{field}={column}); "
                            f"the row has {', '.join(sorted(row.data)) or 'no columns'}")
    renamed = {k: v for k, v in row.data.items() if k not in columns.values()}
    renamed.update({field: row.data[column] for field, column in columns.items()})
    return renamed


def _raw_rows(uri: str) -> Iterable[Row]:
    if uri.startswith(HF_PREFIX):
        return _dataset_rows(uri, _load_hub(uri))
    path = resolve_path(uri)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".csv":
            return read_csv(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return (Row(f"{path}:row {n}", obj) for n, obj in enumerate(pq.read_table(path).to_pylist(), start=1))
        if suffix == ".json":
            return read_json(path)
        return read_jsonl(path)
    if path.is_dir() or resolve_path(split_suffix(uri)[0]).is_dir():
        return _dataset_rows(uri, _load_saved(uri))
    raise DataError(f"{uri}: data file not found")


def rows_hint(uri: str, limit: int | None = None) -> int | None:
    """About how many rows a source holds (up to `limit`), for a progress bar's total: a local
    JSONL file's lines (a byte scan, about a second a GB; blank lines are counted too), else None."""
    path = local_path(uri)
    if path is None or not path.is_file() or path.suffix.lower() != ".jsonl":
        return None
    lines, last = 0, b"\n"
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    lines += last != b"\n"  # a last line without its newline
    return lines if limit is None else min(lines, limit)


def read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of a JSONL file; blank lines are skipped, anything else must be a JSON object."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield Row(where, obj)


def read_json(path: Path) -> Iterator[Row]:
    """A JSON array of objects; a .json file that holds JSON Lines is read as such."""
    try:
        whole = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        yield from read_jsonl(path)
        return
    if isinstance(whole, dict):
        yield Row(f"{path}:row 1", whole)
        return
    if not isinstance(whole, list):
        raise DataError(f"{path}: expected a JSON array of objects or JSON Lines, got {type(whole).__name__}")
    for n, obj in enumerate(whole, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}:row {n}: expected a JSON object, got {type(obj).__name__}")
        yield Row(f"{path}:row {n}", obj)


def read_csv(path: Path) -> Iterator[Row]:
    """Header + rows; every cell is text (no type guessing: an answer "5" stays "5")."""
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        for record in reader:
            if None in record:
                raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns")
            yield Row(f"{path}:{reader.line_num}", dict(record))


def _load_saved(uri: str):
    import datasets

    path = resolve_path(uri)
    split = None
    if not path.is_dir():
        head, split = split_suffix(uri)
        path = resolve_path(head)
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{uri}: not a saved dataset (datasets save_to_disk; a folder of data files "
                        f"loads as hf:{uri}): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return _one_split(uri, loaded, split)


def _load_hub(uri: str):
    import datasets

    name, revision, split = hub_parts(uri)
    if not name or revision == "":
        raise DataError(f"{uri}: expected hf:NAME, hf:NAME:SPLIT, hf:NAME@REVISION or hf:NAME@REVISION:SPLIT")
    if revision and _hub_offline():
        _check_offline_pin(uri, name, revision)
    try:
        return datasets.load_dataset(name, split=split or "train", revision=revision)
    except Exception as err:  # hub, network, builder and split errors alike: all mean "cannot read this source"
        raise DataError(f"{uri}: cannot load with datasets.load_dataset: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None


def hub_parts(uri: str) -> tuple[str, str | None, str | None]:
    """`hf:NAME[@REVISION][:SPLIT]` -> (NAME, REVISION, SPLIT); a local directory whose name holds
    an "@" is a name (hub names never do)."""
    spec, split = split_suffix(uri[len(HF_PREFIX):])
    name, at, revision = spec.partition("@")
    if not at or resolve_path(spec).exists():
        return spec, None, split
    return name, revision, split


def hub_revision(uri: str) -> str | None:
    """The commit a hub source's rows come from (see the module docstring); None, with a warning
    once per process, when neither the hub nor the datasets cache tells. Resolved once per source
    per process: a sweep's trials share it."""
    name, revision, _ = hub_parts(uri)
    if (name, revision) not in _revisions:
        commit = _ask_hub(name, revision) or _built_commit(name)
        if commit is None:
            log.warning("%s: neither the hub nor the datasets cache tells which commit of %s it reads; its "
                        "data is told apart by name only, so an update upstream reuses data prepared from "
                        "the old one", uri, name)
        _revisions[name, revision] = commit
    return _revisions[name, revision]


def _hub_offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)  # HF_DATASETS_OFFLINE, else HF_HUB_OFFLINE: as load_dataset


def _ask_hub(name: str, revision: str | None) -> str | None:
    if _hub_offline():
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(name, revision=revision, timeout=HUB_TIMEOUT_S).sha
    except Exception:  # unreachable, unknown, gated alike: load_dataset then reads the cache too
        return None


def _built_commit(name: str) -> str | None:
    """The commit of the build load_dataset reads without the hub: the newest one of `name` in
    the datasets cache, whose folder is named by its commit (found by datasets' own lookup)."""
    try:
        from datasets.packaged_modules.cache.cache import _find_hash_in_cache

        return _find_hash_in_cache(name, None, None, {}, None)[2]
    except Exception:  # none built here (loading offline fails too), or datasets moved its lookup
        return None


def _check_offline_pin(uri: str, name: str, revision: str) -> None:
    """Offline, load_dataset ignores revision= and reads the newest build: a pin to another
    commit would read other data than it names. A branch or tag pin is matched through the
    commit the hub cache's ref for it holds."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    built = _built_commit(name)
    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type="dataset") / "refs" / revision
    pinned = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    if built and not built.startswith(pinned):
        raise DataError(f"{uri}: offline, datasets reads only the newest build of {name} in its cache "
                        f"(commit {built}), not revision {revision}: pin that commit, or load it once online")


def _one_split(uri: str, loaded, split: str | None):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            wanted = f"no split {split!r}" if split else "a DatasetDict"
            raise DataError(f"{uri}: {wanted}; name one of its splits as {uri.rsplit(':', 1)[0] if split else uri}"
                            f":SPLIT ({', '.join(loaded)})")
        return loaded[split]
    if split is not None:
        raise DataError(f"{uri}: a single dataset has no splits; drop ':{split}'")
    return loaded


def _dataset_rows(uri: str, dataset) -> Iterator[Row]:
    for n, obj in enumerate(dataset, start=1):
        yield Row(f"{uri}:row {n}", obj)
