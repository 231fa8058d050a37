"""Where trial outputs persist (`storage.path`): a directory every node sees, or an object store.

A location is either a local path (a local disk for one machine, NFS for a cluster) or a URI
that pyarrow or fsspec can open: `s3://bucket/prefix`, `gs://...`, `hdfs://...`, or any fsspec
protocol. Query parameters stay with the URI (`s3://b/p?endpoint_override=host:9000&scheme=http`);
credentials and endpoints otherwise come from the usual environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL_S3`, ...) of each process.

A trial whose location is remote writes into a local staging directory (`TrialStorage.local`) and
uploads what must outlive the worker: checkpoints as they are saved (trainers/checkpoint.py), and
its outputs (adapter/ or model/, metrics.json, ...) at the end (`TrialStorage.publish`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

STAGING_ENV = "FTLAB_STAGING_DIR"  # where remote trials stage their files (default: the temp dir)


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URI with a scheme other than file:// (s3://, gs://, memory://, ...)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def normalize(location: str | os.PathLike) -> str:
    """A local path made absolute (so every process means the same directory); a URI as given."""
    text = str(location)
    if is_remote(text):
        path, sep, query = text.partition("?")
        return path.rstrip("/") + sep + query
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


def join(location: str, *parts: str) -> str:
    """`location/part/...` for a path or a URI (a URI's query string stays at the end)."""
    if not is_remote(location):
        return os.path.join(location, *parts)
    path, sep, query = location.partition("?")
    return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def filesystem(uri: str):
    """(pyarrow filesystem, path inside it) of a location; fsspec serves schemes pyarrow lacks."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError as err:  # pyarrow.ArrowInvalid
        if "Unrecognized filesystem type" not in str(err):
            raise
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy a local file, or a directory tree, to `uri` (existing objects are overwritten)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    local = Path(local)
    parent = path if local.is_dir() else path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(uri: str, local: str | os.PathLike) -> bool:
    """Copy `uri` (a file or a directory tree) to `local`; False when nothing is there."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return False
    local = Path(local)
    if info.type == pafs.FileType.Directory:
        local.mkdir(parents=True, exist_ok=True)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def list_dirs(uri: str) -> list[str]:
    """Names of the directories directly under `uri` ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove(location: str) -> None:
    """Delete a directory tree (or file) at a path or URI; nothing there is not an error."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        shutil.rmtree(normalize(location), ignore_errors=True)
        return
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def staging_dir(uri: str, rank: int = 0) -> Path:
    """The local directory a trial with a remote location writes into, one per rank (ranks of one
    trial may share a machine); it ends in the location's last part, the trial key."""
    root = Path(os.environ.get(STAGING_ENV) or Path(tempfile.gettempdir()) / "finetune-lab-staging")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1] or "trial"
    return root / f"{digest}-rank{rank}" / name


class TrialStorage:
    """One trial's output location: `local` is where it writes, `uri` where the outputs persist.

    For a local location both are the same directory and publishing is a no-op.
    """

    def __init__(self, location: str | os.PathLike, rank: int = 0):
        self.uri = normalize(location)
        self.remote = is_remote(self.uri)
        self.local = staging_dir(self.uri, rank) if self.remote else Path(self.uri)
        self.local.mkdir(parents=True, exist_ok=True)

    def remote_join(self, *parts: str) -> str | None:
        """The persistent location of a part of the outputs, when it is remote; else None."""
        return join(self.uri, *parts) if self.remote else None

    def publish(self, last: tuple[str, ...] = (), exclude: tuple[str, ...] = ("checkpoints",)) -> None:
        """Upload the staged outputs (hidden files and `exclude` left out); the names in `last`
        go after the rest, in that order: their presence says the others are complete."""
        if not self.remote:
            return
        entries = [p for p in self.local.iterdir() if not p.name.startswith(".") and p.name not in exclude]
        order = {name: i + 1 for i, name in enumerate(last)}
        for entry in sorted(entries, key=lambda p: (order.get(p.name, 0), p.name)):
            target = join(self.uri, entry.name)
            if entry.is_dir():
                remove(target)  # no files of an older artifact may survive beside the new one
            upload(entry, target)

    def cleanup(self) -> None:
        """Drop the staging directory of a finished remote trial (its outputs are uploaded)."""
        if self.remote:
            shutil.rmtree(self.local.parent, ignore_errors=True)

