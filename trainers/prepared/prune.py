"""Listing and pruning the prepared datasets of a storage path (`<storage.path>/prepared`): one is
kept per distinct input, so changing `data.max_seq_len` or the template a few times at 1M rows
leaves GBs there until pruned.

    python -m trainers.prepared list                              # storage.path of conf/config.yaml
    python -m trainers.prepared --storage s3://bucket/runs list
    python -m trainers.prepared prune --older-than 30d --dry-run  # unused for 30 days: what would go
    python -m trainers.prepared prune --keep 3                    # all but the 3 most recently used
    python -m trainers.prepared --cache list                      # this machine's copies of remote ones

A dataset's last use is the mtime of its `last_used` marker (touched by every pass and trial that
builds or opens it, trainers.prepared._used); a dataset of an older version without one counts
from when it was built. Local and remote roots are listed alike through pyarrow.fs. Removing a
local dataset renames it to a partial of this process first, so no reader takes a half-deleted
one for whole and a pruner killed midway leaves what the next pass's clean_partials removes; a
remote one loses its prepared.json first (readers then see it as not uploaded), then the rest.
Partials (passes under way) are never listed or pruned here.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from trainers import storage
from trainers.memory.sizes import format_size
from trainers.prepared import CACHE_ENV, META_FILE, USED_FILE, local_cache, prepared_root, retire

AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """Seconds of `30d`, `12h`, `90m`, `2w` or `45s`; ValueError saying what is accepted otherwise."""
    match = AGE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not an age; write a number and a unit: 30d, 12h, 90m, 2w or 45s")
    return float(match.group(1)) * AGE_UNITS[match.group(2)]


@dataclass
class Dataset:
    """One prepared dataset as listed: its directory (a path or URI), prepared.json and disk use."""

    key: str
    location: str
    meta: dict
    size: int
    built: float | None  # prepared.json's mtime (None where the filesystem gives none)
    last_used: float | None  # the marker's mtime; None without one

    @property
    def used(self) -> float | None:
        """When it was last built or opened, as far as is known."""
        return self.last_used if self.last_used is not None else self.built

    def source(self) -> str:
        inputs = self.meta.get("inputs")
        return inputs["source"] if inputs else "? (prepared before sources were recorded)"


def _mtime(info) -> float | None:
    return info.mtime.timestamp() if info.mtime is not None else None


def scan(root: str) -> tuple[list[Dataset], list[str]]:
    """(complete datasets under `root`, names of its directories without prepared.json), from one
    recursive listing; hidden names (partials, passes under way) are left out."""
    import pyarrow.fs as pafs

    fs, base = storage.filesystem(root)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=True))
    groups: dict[str, list] = {}
    for info in infos:
        relative = info.path[len(base):].lstrip("/")
        name = relative.split("/", 1)[0]
        if name.startswith(".") or "/" not in relative and info.type != pafs.FileType.Directory:
            continue
        groups.setdefault(name, []).append(info)
    datasets, incomplete = [], []
    for key, files in sorted(groups.items()):
        by_name = {f.path[len(base):].lstrip("/").partition("/")[2]: f for f in files}
        try:
            with fs.open_input_stream(by_name[META_FILE].path) as stream:
                meta = json.loads(stream.read().decode())
        except (KeyError, OSError, ValueError):  # none, removed since the listing, or not ours
            incomplete.append(key)
            continue
        marker = by_name.get(USED_FILE)
        size = sum(f.size or 0 for f in files if f.type == pafs.FileType.File)
        datasets.append(Dataset(key, storage.join(root, key), meta, size, _mtime(by_name[META_FILE]),
                                _mtime(marker) if marker is not None else None))
    return datasets, incomplete


def to_prune(datasets: list[Dataset], older_than: float | None, keep: int | None, now: float) -> list[Dataset]:
    """Those that go: not among the `keep` most recently used, and unused for more than
    `older_than` seconds (either condition alone when only one is given). One whose last use is
    unknown is never taken for old."""
    ranked = sorted(datasets, key=lambda d: d.used or 0.0, reverse=True)
    candidates = ranked[keep:] if keep is not None else ranked
    if older_than is None:
        return candidates
    return [d for d in candidates if d.used is not None and now - d.used > older_than]


def remove(root: str, dataset: Dataset) -> bool:
    """Delete one dataset, never leaving a half-deleted one that looks whole; False when it was
    gone already (another pruner)."""
    if not storage.is_remote(root):
        return retire(Path(dataset.location))
    if not storage.exists(storage.join(dataset.location, META_FILE)):
        return False
    storage.remove(storage.join(dataset.location, META_FILE))  # first: readers then see no dataset
    storage.remove(dataset.location)
    return True


def _when(stamp: float | None, now: float) -> str:
    if stamp is None:
        return "-"
    ago = now - stamp
    age = (f"{ago / 86400:.0f}d" if ago >= 86400 else f"{ago / 3600:.0f}h" if ago >= 3600
           else f"{ago / 60:.0f}m" if ago >= 60 else "now")
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) + f" ({age} ago)" * (age != "now")


def table(datasets: list[Dataset], now: float) -> str:
    """One row per dataset, most recently used first."""
    rows = [("key", "product", "format", "rows", "size", "seq", "template", "built", "last used", "source")]
    for d in sorted(datasets, key=lambda d: d.used or 0.0, reverse=True):
        inputs = d.meta.get("inputs") or {}
        template = inputs.get("template") or ["?"]
        rows.append((d.key[:12], d.meta.get("product", "?"), d.meta.get("format", "?"),
                     f"{d.meta.get('stats', {}).get('rows', 0):,}", format_size(d.size),
                     str(inputs.get("max_seq_len", "?")), template[0], _when(d.built, now),
                     _when(d.last_used, now), d.source()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    numeric = {3, 4, 5}
    return "\n".join("  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     + "  " + r[-1] for r in rows)


def default_storage() -> str:
    """storage.path as conf/config.yaml sets it (relative: from the working directory)."""
    from omegaconf import OmegaConf

    from trainers.config import CONF_DIR

    return str(OmegaConf.load(CONF_DIR / "config.yaml").storage.path)


def _where(parser: argparse.ArgumentParser, default) -> None:
    """--storage and --cache, taken before or after the command (`default` SUPPRESS after it, so a
    command without them keeps what came before)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--storage", metavar="PATH", default=default,
                       help="storage.path of the sweeps (a directory or s3://...; default: conf/config.yaml's)")
    where.add_argument("--cache", action="store_true", default=default,
                       help=f"this machine's local copies of remote datasets (${CACHE_ENV}, default the temp dir)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.prepared",
        description="List or prune the prepared (tokenized) datasets under <storage.path>/prepared.")
    _where(parser, None)
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="one row per prepared dataset: what, its size, when built and last used")
    prune = sub.add_parser("prune", help="remove the datasets unused for long, or all but the most recently used")
    for command in (listing, prune):
        _where(command, argparse.SUPPRESS)
    prune.add_argument("--older-than", metavar="AGE", help="unused for longer than AGE: 30d, 12h, 2w, ...")
    prune.add_argument("--keep", metavar="N", type=int, help="keep the N most recently used")
    prune.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    return parser


def _root(parser: argparse.ArgumentParser, args) -> str:
    """The prepared root the arguments name; parser.error (exit 2) when it is not there."""
    if args.cache:
        if args.storage is not None:
            parser.error("--cache: not with --storage (the cache holds the copies of every remote storage path)")
        return str(local_cache())
    location = args.storage if args.storage is not None else default_storage()
    option = "--storage" if args.storage is not None else f"storage.path (conf/config.yaml: {location!r})"
    if not storage.is_remote(location) and not Path(storage.normalize(location)).is_dir():
        parser.error(f"{option}: {storage.normalize(location)} is not a directory")
    return prepared_root(location)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    older_than = None
    if args.command == "prune":
        if args.older_than is None and args.keep is None:
            parser.error("prune: give --older-than AGE, --keep N or both")
        if args.keep is not None and args.keep < 0:
            parser.error(f"--keep: must be >= 0, got {args.keep}")
        if args.older_than is not None:
            try:
                older_than = parse_age(args.older_than)
            except ValueError as err:
                parser.error(f"--older-than: {err}")
    root = _root(parser, args)
    datasets, incomplete = scan(root)
    now = time.time()
    if args.command == "list":
        if datasets:
            print(table(datasets, now))
        total = sum(d.size for d in datasets)
        print(f"{len(datasets)} prepared dataset{'s' * (len(datasets) != 1)}, {format_size(total)} under {root}")
        if incomplete:
            print(f"{len(incomplete)} not listed, without a readable {META_FILE} (an upload under way or cut short; "
                  f"left alone): {', '.join(k[:12] for k in incomplete)}")
        return 0
    going = to_prune(datasets, older_than, args.keep, now)
    if going:
        print(table(going, now))
    verb = "would remove" if args.dry_run else "removed"
    removed = [d for d in going if args.dry_run or remove(root, d)]
    print(f"{verb} {len(removed)} of {len(datasets)} prepared datasets, {format_size(sum(d.size for d in removed))} "
          f"under {root}")
    return 0
