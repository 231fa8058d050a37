"""Data rows: validation that names `source:row` (`file:line`), tokenization with loss masks.

Formats (one object per row; sources and `data.columns` in trainers.sources):
  instruction  {"instruction": str, "input": str (optional), "output": str}
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  preference   {"prompt": str, "chosen": str, "rejected": str}
               (or chosen/rejected as message lists, the common form of public preference sets)

A bad row is an error naming its `source:row` and the rule it breaks; nothing is dropped silently.
Rows become tokens through the template `data.template` chooses (trainers.templates), the same
for training and evaluation, TOKENIZE_BATCH rows per tokenizer call (`examples_of`, `pairs_of`,
`prompts_of`: the per-batch steps trainers/prepared streams a source through). Rows longer than `data.max_seq_len` tokens follow `data.overlength`
(error | truncate | drop, one rule: `fit_length`), and truncated/dropped rows are counted in
`DatasetStats`.
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from trainers.sources import HF_PREFIX, DataError, Row, hub_parts, hub_revision, local_path, read_rows
from trainers.sources import resolve_path  # noqa: F401  (callers import it from here)
from trainers.templates import IGNORE_INDEX, TemplateError, chat_template

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class DatasetStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_metrics(self, split: str) -> dict[str, float]:
        return {f"data/{split}_rows": self.rows, f"data/{split}_truncated": self.truncated,
                f"data/{split}_dropped": self.dropped}


_digests: dict[tuple[str, int, int], str] = {}


def data_fingerprint(data) -> dict[str, str]:
    """{"train": sha256, "eval": sha256} of a DataConfig's sources, "" for one that is missing
    (validation reports it). A file hashes its bytes; a directory its files' names and bytes; a
    hub dataset (hf:NAME) is named, not hashed: its sha256 is of the name at the commit it
    resolves to (trainers.sources.hub_revision), of the name alone when that is unknown. Cached
    per (path, size, mtime) and per hub source in this process: a sweep's trials share them."""
    return {split: source_fingerprint(uri) for split, uri in (("train", data.train_file), ("eval", data.eval_file))
            if uri}


def source_fingerprint(uri: str) -> str:
    """sha256 of one data source (see data_fingerprint); "" when it is missing."""
    import hashlib

    path = local_path(uri)
    if path is None:
        return _hub_fingerprint(uri) if uri.startswith(HF_PREFIX) else ""
    if path.is_file():
        return _file_digest(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{f.relative_to(path)}:{_file_digest(f)}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def _hub_fingerprint(uri: str) -> str:
    """Of `hf:NAME@COMMIT[:SPLIT]`: a source pinned to the commit its branch now resolves to
    fingerprints the same, and another commit differently; of the source as written when the
    commit is unknown."""
    import hashlib

    name, _, split = hub_parts(uri)
    commit = hub_revision(uri)
    named = f"{HF_PREFIX}{name}@{commit}" + (f":{split}" if split else "") if commit else uri
    return hashlib.sha256(named.encode()).hexdigest()


def _file_digest(path) -> str:
    from trainers.checkpoint import file_sha256

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = file_sha256(path)
    return _digests[key]


def detect_format(row: Row) -> str:
    keys = set(row.data)
    if "messages" in keys:
        return "chat"
    if {"chosen", "rejected"} & keys:
        return "preference"
    if "instruction" in keys or "output" in keys:
        return "instruction"
    raise DataError(
        f"{row.source}: cannot tell the format from keys {sorted(keys)}; expected instruction "
        "(instruction, output), chat (messages) or preference (prompt, chosen, rejected)"
    )


def _require_text(row: Row, key: str, optional: bool = False) -> str:
    if key not in row.data:
        if optional:
            return ""
        raise DataError(f"{row.source}: missing field {key!r}")
    value = row.data[key]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{row.source}: field {key!r} must be a string, got {type(value).__name__}")
    if not optional and not value.strip():
        raise DataError(f"{row.source}: field {key!r} is empty")
    return value


def _check_messages(row: Row, messages: Any, key: str, final_role: str = "assistant") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.source}: field {key!r} must be a non-empty list of messages")
    previous = None
    for i, message in enumerate(messages):
        where = f"{row.source}: {key}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where} must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"{where}: content is missing or empty")
        if role == "system" and i != 0:
            raise DataError(f"{where}: a system message may only come first")
        if role != "system" and role == previous:
            raise DataError(f"{where}: roles out of order ({role} follows {previous}; user and assistant alternate)")
        if role == "assistant" and previous not in ("user",):
            raise DataError(f"{where}: roles out of order (assistant must follow a user message)")
        previous = role
    if previous != final_role:
        raise DataError(f"{row.source}: {key} must end with an {final_role} message, ends with {previous}")
    return messages


def validate_row(row: Row, fmt: str) -> dict[str, Any]:
    """Normalised row for `fmt`, or DataError naming file:line and the broken rule."""
    if fmt == "instruction":
        return {"instruction": _require_text(row, "instruction"), "input": _require_text(row, "input", optional=True),
                "output": _require_text(row, "output")}
    if fmt == "chat":
        if "messages" not in row.data:
            raise DataError(f"{row.source}: missing field 'messages'")
        return {"messages": _check_messages(row, row.data["messages"], "messages")}
    if fmt == "preference":
        for key in ("chosen", "rejected"):
            if key not in row.data:
                raise DataError(f"{row.source}: missing field {key!r}")
        chosen, rejected = row.data["chosen"], row.data["rejected"]
        if isinstance(chosen, list) or isinstance(rejected, list):
            # Public preference sets: chosen/rejected are whole conversations sharing a prompt prefix.
            chosen_m = _check_messages(row, chosen, "chosen")
            rejected_m = _check_messages(row, rejected, "rejected")
            if chosen_m[:-1] != rejected_m[:-1]:
                raise DataError(f"{row.source}: chosen and rejected must share every message but the last")
            prompt = chosen_m[:-1]  # the shared history; the template renders it
            chosen, rejected = chosen_m[-1]["content"], rejected_m[-1]["content"]
        else:
            prompt = _require_text(row, "prompt")
            chosen, rejected = _require_text(row, "chosen"), _require_text(row, "rejected")
        if chosen.strip() == rejected.strip():
            raise DataError(f"{row.source}: chosen and rejected are identical")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise ValueError(f"unknown data format {fmt!r}")


def load_rows(uri: str, fmt: str = "auto", limit: int | None = None,
              columns: dict[str, str] | None = None) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(format, normalised rows, their `source:row`s) of a data source (trainers.sources), columns
    renamed per `data.columns`; validates every row."""
    rows, sources = [], []
    for batch_fmt, batch, names in row_batches(uri, fmt, limit, columns, batch_size=10**9):
        fmt = batch_fmt
        rows += batch
        sources += names
    return fmt, rows, sources


def row_batches(uri: str, fmt: str = "auto", limit: int | None = None, columns: dict[str, str] | None = None,
                batch_size: int = 1000) -> Iterator[tuple[str, list[dict[str, Any]], list[str]]]:
    """load_rows in batches of validated rows, as the source is read: (format, rows, sources).
    The format is the first row's when `fmt` is auto; a source without rows is an error."""
    rows, sources, seen = [], [], 0
    for row in read_rows(uri, columns, limit):
        if fmt == "auto":
            fmt = detect_format(row)
        rows.append(validate_row(row, fmt))
        sources.append(row.source)
        seen += 1
        if len(rows) >= batch_size:
            yield fmt, rows, sources
            rows, sources = [], []
    if not seen:
        raise DataError(f"{uri}: no rows")
    if rows:
        yield fmt, rows, sources


@contextmanager
def rendering(source: str):
    """A row the template cannot render is a DataError naming the row."""
    try:
        yield
    except TemplateError as err:
        raise DataError(f"{source}: {err}") from None


def fit_length(source: str, length: int, max_seq_len: int, overlength: str, what: str = "") -> str:
    """The one overlength rule: "keep" when `length` tokens fit max_seq_len, else data.overlength's
    "truncate" or "drop"; "error" raises naming the row. How a kind of row truncates is its own."""
    if length <= max_seq_len:
        return "keep"
    if overlength == "error":
        raise DataError(f"{source}: {what}{length} tokens exceeds data.max_seq_len={max_seq_len} "
                        "(set data.overlength=truncate or drop to allow)")
    return overlength


# --------------------------------------------------------------------------- tokenization


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    source: str = ""


@dataclass
class EvalPrompt:
    prompt_ids: list[int]
    answer: str
    source: str = ""


@dataclass
class TokenizedSplit:
    examples: list[Example] = field(default_factory=list)
    prompts: list[EvalPrompt] = field(default_factory=list)
    stats: DatasetStats = field(default_factory=DatasetStats)


def encode_row(tokenizer, row: dict, fmt: str, template="auto") -> tuple[list[int], list[int]]:
    """Token ids and labels of an instruction/chat row: prompt tokens masked, the assistant's
    response through its end (eos, or the chat template's end-of-turn token) trained."""
    return chat_template(tokenizer, template).encode(row, fmt)


def eval_prompt(tokenizer, row: dict, fmt: str, template="auto") -> tuple[list[int], str]:
    """Prompt ids for generation and the expected answer (instruction: output; chat: last turn;
    preference: chosen)."""
    return chat_template(tokenizer, template).prompt(row, fmt)


# Rows per batched template call: large enough that a tokenizer call's own cost vanishes, small
# enough that a batch's Python lists stay a few MB.
TOKENIZE_BATCH = 1000


def _unwrap(result):
    """A batched template method's result for one row, or its TemplateError raised."""
    if isinstance(result, TemplateError):
        raise result
    return result


def tokenize_split(tokenizer, rows: list[dict], sources: list[str], fmt: str, max_seq_len: int,
                   overlength: str, with_prompts: bool = False, template="auto") -> TokenizedSplit:
    """Instruction/chat rows as Examples (and their eval prompts when `with_prompts`), rendered by
    `template` (a data.template setting or a template); long rows follow `overlength`."""
    template = chat_template(tokenizer, template)
    split = TokenizedSplit()
    for start in range(0, len(rows), TOKENIZE_BATCH):
        end = start + TOKENIZE_BATCH
        for example, prompt in examples_of(template, rows[start:end], sources[start:end], fmt, max_seq_len,
                                           overlength, with_prompts, split.stats):
            split.examples.append(example)
            if prompt is not None:
                split.prompts.append(prompt)
    split.stats.rows = len(split.examples)
    if not split.examples:
        raise DataError(no_rows_left("rows", overlength, max_seq_len))
    return split


def no_rows_left(what: str, overlength: str, max_seq_len: int) -> str:
    return f"no usable {what} left after data.overlength={overlength} (max_seq_len={max_seq_len})"


def examples_of(template, rows: list[dict], sources: list[str], fmt: str, max_seq_len: int, overlength: str,
                with_prompts: bool, stats: DatasetStats) -> list[tuple[Example, EvalPrompt | None]]:
    """One batch of instruction/chat rows as (Example, its eval prompt or None), tokenized in one
    call; the first bad row (in order) raises; truncated/dropped rows are counted in `stats`."""
    kept = []
    for source, result in zip(sources, template.encode_many(rows, fmt, with_prompts)):
        with rendering(source):
            ids, labels, prompt = _unwrap(result)
        action = fit_length(source, len(ids), max_seq_len, overlength)
        if action == "drop":
            stats.dropped += 1
            continue
        if action == "truncate":
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                stats.dropped += 1  # nothing left to learn from
                continue
            stats.truncated += 1
        kept.append((Example(ids, labels, source), EvalPrompt(prompt[0], prompt[1], source) if prompt else None))
    return kept


def example_lengths(examples) -> list[int]:
    """Token count of each example: a prepared dataset's index (trainers.prepared.ExampleRows
    .lengths, no row is read), or counted from a list."""
    lengths = getattr(examples, "lengths", None)
    return lengths if lengths is not None else [len(e.input_ids) for e in examples]


def pad_batch(examples: list[Example], pad_id: int) -> dict[str, "torch.Tensor"]:
    """Right-padded input_ids / attention_mask / labels tensors for a list of examples.

    Packed rows (PackedRow) get position_ids instead of an attention_mask: see PackedRow.
    """
    import torch

    width = max(len(e.input_ids) for e in examples)
    # One tensor from padded lists: a row-by-row copy into a preallocated tensor costs several
    # small torch calls per row, which shows in the step time of a small model.
    input_ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in examples],
                             dtype=torch.long)
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in examples],
                          dtype=torch.long)
    if isinstance(examples[0], PackedRow):
        # The pad tail restarts its positions too: a segment of its own that no example sees.
        positions = torch.tensor([e.position_ids + list(range(width - len(e.input_ids))) for e in examples],
                                 dtype=torch.long)
        return {"input_ids": input_ids, "position_ids": positions, "labels": labels}
    attention = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples],
                             dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --------------------------------------------------------------------------- packing


@dataclass
class PackedRow(Example):
    """Several examples end to end in one row of at most data.max_seq_len tokens.

    Positions restart at 0 at each example. Given position_ids that restart and no attention_mask,
    transformers (5.x masking_utils, find_packed_sequence_indices) builds a block-diagonal causal
    mask for eager and sdpa attention and runs flash-attention varlen, so no token attends to
    another example (tests/test_packing.py checks logits against each example run alone). Each
    example's first label is IGNORE_INDEX: it would be predicted from the previous example's last
    token; unpacked, the first label is never predicted either, so the loss is the same.
    """

    position_ids: list[int] = field(default_factory=list)


class PackedRows(Sequence):
    """Packed rows (PackedRow), each built when indexed from the examples it packs: what stays in
    memory is the plan (the member example ids of all rows end to end, where each row's start,
    and each row's token count, `lengths`), a few bytes an example. `examples` is a list or a
    prepared dataset's memory-mapped rows; an example is cut to `cap` tokens (padding-free
    truncation; no other example is longer)."""

    def __init__(self, examples, members, starts, lengths, cap: int):
        self.examples, self.members, self.starts, self.lengths, self.cap = examples, members, starts, lengths, cap

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        ids, labels, positions, sources = [], [], [], []
        for i in self.members[self.starts[index]:self.starts[index + 1]].tolist():
            e = self.examples[i]
            n = min(len(e.input_ids), self.cap)
            ids += e.input_ids[:n]
            labels += [IGNORE_INDEX] + e.labels[1:n]
            positions += range(n)
            sources.append(e.source)
        return PackedRow(ids, labels, ",".join(sources), positions)

    def __eq__(self, other) -> bool:
        if not isinstance(other, (PackedRows, list)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None


def pack_examples(examples, max_seq_len: int, seed: int) -> PackedRows:
    """Examples packed into rows of <= max_seq_len tokens, every example in exactly one row.

    Minimum bin slack: each row starts with the longest example left and is filled with the
    examples whose lengths leave the least room (fill_row). On the embedded data (16-27 tokens a
    row, max_seq_len 96) plain best-fit decreasing fills 94.3% of the rows' positions (a row of
    4 x 20 = 80 has no room for a 16 and stays so) and this 98.9%; on varied lengths both reach
    ~99.7%. Which example of a length goes next follows a seeded shuffle, so the rows are
    deterministic per seed; they come out longest-first and the batch stream shuffles them.
    Planned from the examples' lengths alone (a prepared dataset's index: no row is read).
    """
    import numpy as np

    sizes = np.asarray(example_lengths(examples), dtype=np.int64)
    return _packed(examples, np.arange(len(sizes), dtype=np.int32), sizes, max_seq_len, seed)


def _packed(examples, keep, sizes, max_seq_len: int, seed: int) -> PackedRows:
    """pack_examples of the examples `keep` (ids into `examples`) whose lengths are `sizes`."""
    import numpy as np

    order = array("i", range(len(keep)))  # shuffled as a list would be: the same swaps
    random.Random(seed).shuffle(order)
    order = np.frombuffer(order, dtype=np.int32)
    shuffled = sizes[order]
    overlong = shuffled > max_seq_len
    if overlong.any():
        first = int(order[overlong.argmax()])
        raise ValueError(f"{examples[int(keep[first])].source}: {int(sizes[first])} tokens do not fit "
                         f"data.max_seq_len={max_seq_len}")
    by = np.argsort(shuffled, kind="stable")
    grouped = keep[order[by]]  # example ids by length, each length's in shuffled order
    distinct, firsts, counts = np.unique(shuffled[by], return_index=True, return_counts=True)
    lengths = distinct.tolist()  # lengths with examples left, ascending
    first_of = dict(zip(lengths, firsts.tolist()))
    left = dict(zip(lengths, counts.tolist()))  # examples left of each length, taken from the end
    members, starts, row_lengths = array("i"), array("q", [0]), array("i")
    while lengths:
        first = lengths[-1]
        taken = [first] + fill_row(max_seq_len - first, lengths, left, first)
        for n in taken:
            left[n] -= 1
            members.append(int(grouped[first_of[n] + left[n]]))
            if not left[n]:
                del left[n]
                lengths.pop(bisect.bisect_left(lengths, n))
        starts.append(len(members))
        row_lengths.append(sum(taken))
    return PackedRows(examples, np.frombuffer(members, dtype=np.int32), np.frombuffer(starts, dtype=np.int64),
                      np.frombuffer(row_lengths, dtype=np.int32), max_seq_len)


def padding_free_rows(examples, budget: int, overlength: str, seed: int, stats: DatasetStats) -> PackedRows:
    """data.packing=padding_free: each micro-batch is one PackedRow of at most `budget` tokens
    (data.max_tokens_per_batch), filled as pack_examples fills rows, so no position is padding.

    An example longer than the budget follows data.overlength like an overlong row (error names
    data.max_tokens_per_batch; truncate keeps its first `budget` tokens, drop leaves it out), and
    is counted in `stats`. The rows are fixed for the run (a function of the seed); the batch
    stream shuffles their order each epoch, as it does packed rows'. Only an example over the
    budget is read; the others are planned from their lengths.
    """
    import numpy as np

    sizes = np.asarray(example_lengths(examples), dtype=np.int64)
    fits = sizes <= budget
    for i in np.flatnonzero(~fits).tolist():
        e = examples[i]
        if overlength == "error":
            raise DataError(f"{e.source}: {len(e.input_ids)} tokens exceed data.max_tokens_per_batch={budget}, the "
                            "tokens of one padding-free micro-batch (raise it, or set data.overlength=truncate or drop)")
        if overlength == "truncate" and any(label != IGNORE_INDEX for label in e.labels[1:budget]):
            fits[i] = True  # packed cut to `budget` tokens (PackedRows.cap)
            stats.truncated += 1
        else:  # dropped, or truncated to nothing left to learn from
            stats.dropped += 1
    keep = np.flatnonzero(fits).astype(np.int32)
    if not len(keep):
        raise DataError(f"no usable rows left after data.overlength={overlength} "
                        f"(data.max_tokens_per_batch={budget})")
    stats.rows = len(keep)
    return _packed(examples, keep, np.minimum(sizes[keep], budget), budget, seed)


def varlen_kwargs(position_ids: list[int]) -> dict:
    """Flash-attention's varlen boundaries of one padding-free row, under the names transformers 5
    reads (its DataCollatorWithFlattening makes the same): cumulative example lengths as int32
    `cu_seq_lens_q/k` and the longest example as `max_length_q/k`. Given these, flash-attention
    does not re-derive them from position_ids in every layer (a device-to-host sync each time)."""
    import torch

    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    cu_seq_lens = torch.tensor(starts, dtype=torch.int32)
    longest = max(b - a for a, b in zip(starts, starts[1:]))
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens, "max_length_q": longest,
            "max_length_k": longest}


def fill_row(room: int, lengths: list[int], left_of: dict[int, int], reserved: int) -> list[int]:
    """Lengths (with repeats, at most as many as there are examples of each, one of `reserved`
    being taken already) that fill `room` as fully as possible.

    Greedy first (the longest that fits, again and again): with varied lengths it fills the row
    or leaves under 1% empty, and then that is kept. Otherwise an exact subset sum: a bitset of
    reachable sums grown length by length (counts split in powers of two), walked back from the
    best sum.
    """
    def left(n: int) -> int:
        return left_of[n] - (n == reserved)

    greedy, free = [], room
    top = bisect.bisect_right(lengths, free)
    while top > 0:
        n = lengths[top - 1]
        take = min(left(n), free // n)
        greedy += [n] * take
        free -= take * n
        top = bisect.bisect_right(lengths, free, 0, top - 1)
    if free * 100 <= room + reserved:  # under 1% of the row
        return greedy
    mask = (1 << (room + 1)) - 1
    reach, groups = 1, []  # groups: (length, copies, reachable sums before the group)
    for n in lengths[:bisect.bisect_right(lengths, room)]:
        count, copies = min(left(n), room // n), 1
        while count > 0:
            part = min(copies, count)
            groups.append((n, part, reach))
            reach = (reach | (reach << (n * part))) & mask
            count -= part
            copies *= 2
    best = reach.bit_length() - 1
    if best <= room - free:
        return greedy
    chosen, total = [], best
    for n, part, before in reversed(groups):
        if not (before >> total) & 1:  # unreachable without this group: it is in the sum
            chosen += [n] * part
            total -= n * part
    return chosen


def non_pad_fraction(rows, batch_size: int, max_seq_len: int | None = None) -> float:
    """Share of a padded batch's positions that hold tokens: rows padded to `max_seq_len`, or to
    the longest of each consecutive `batch_size` rows when it is None. From the rows' lengths
    (PackedRows.lengths: no row is built)."""
    import numpy as np

    sizes = np.asarray(example_lengths(rows), dtype=np.int64)
    if max_seq_len is not None:
        return float(sizes.sum() / (len(sizes) * max_seq_len))
    whole = len(sizes) - len(sizes) % batch_size
    slots = int(sizes[:whole].reshape(-1, batch_size).max(axis=1).sum()) * batch_size
    if whole < len(sizes):
        slots += (len(sizes) - whole) * int(sizes[whole:].max())
    return float(sizes.sum() / slots)


# --------------------------------------------------------------------------- preference pairs and prompts


@dataclass
class PairExample:
    """A preference pair as two examples sharing the prompt; labels on each response (+ eos)."""

    chosen: Example
    rejected: Example
    source: str = ""


def tokenize_pairs(tokenizer, rows: list[dict], sources: list[str], max_seq_len: int,
                   overlength: str, template="auto") -> tuple[list[PairExample], DatasetStats]:
    """Preference rows as PairExamples; a pair whose longer side exceeds max_seq_len follows
    `overlength` (truncate cuts both sides; a side left without response tokens drops the pair)."""
    template = chat_template(tokenizer, template)
    pairs, stats = [], DatasetStats()
    for start in range(0, len(rows), TOKENIZE_BATCH):
        end = start + TOKENIZE_BATCH
        pairs += pairs_of(template, rows[start:end], sources[start:end], max_seq_len, overlength, stats)
    stats.rows = len(pairs)
    if not pairs:
        raise DataError(no_rows_left("preference pairs", overlength, max_seq_len))
    return pairs, stats


def pairs_of(template, rows: list[dict], sources: list[str], max_seq_len: int, overlength: str,
             stats: DatasetStats) -> list[PairExample]:
    """One batch of preference rows as PairExamples (see tokenize_pairs), tokenized in one call."""
    pairs = []
    for source, result in zip(sources, template.pair_many(rows)):
        with rendering(source):
            prompt, chosen, rejected = _unwrap(result)
        room = max_seq_len - len(prompt)
        action = fit_length(source, len(prompt) + max(len(chosen[0]), len(rejected[0])), max_seq_len, overlength)
        if action == "truncate":
            chosen, rejected = (chosen[0][:room], chosen[1][:room]), (rejected[0][:room], rejected[1][:room])
            if room <= 0 or any(all(label == IGNORE_INDEX for label in side[1]) for side in (chosen, rejected)):
                action = "drop"
        if action == "drop":
            stats.dropped += 1
            continue
        stats.truncated += action == "truncate"
        sides = [Example(prompt + ids, [IGNORE_INDEX] * len(prompt) + labels, source) for ids, labels in (chosen, rejected)]
        pairs.append(PairExample(sides[0], sides[1], source))
    return pairs


def prompts_with_answers(tokenizer, rows: list[dict], sources: list[str], fmt: str, max_seq_len: int,
                         overlength: str, template="auto") -> tuple[list[EvalPrompt], DatasetStats]:
    """Prompts to generate from and their known answers: an instruction's output, a chat's last
    assistant turn, a preference pair's chosen response. A prompt longer than max_seq_len follows
    `overlength` (truncate keeps its end, where the response header is)."""
    template = chat_template(tokenizer, template)
    prompts, stats = [], DatasetStats()
    for start in range(0, len(rows), TOKENIZE_BATCH):
        end = start + TOKENIZE_BATCH
        prompts += prompts_of(template, rows[start:end], sources[start:end], fmt, max_seq_len, overlength, stats)
    stats.rows = len(prompts)
    if not prompts:
        raise DataError(no_rows_left("prompts", overlength, max_seq_len))
    return prompts, stats


def prompts_of(template, rows: list[dict], sources: list[str], fmt: str, max_seq_len: int, overlength: str,
               stats: DatasetStats) -> list[EvalPrompt]:
    """One batch of rows as EvalPrompts (see prompts_with_answers), tokenized in one call."""
    prompts = []
    for source, result in zip(sources, template.prompt_many(rows, fmt)):
        with rendering(source):
            prompt_ids, answer = _unwrap(result)
        action = fit_length(source, len(prompt_ids), max_seq_len, overlength, what="prompt of ")
        if action == "drop":
            stats.dropped += 1
            continue
        if action == "truncate":
            prompt_ids = prompt_ids[-max_seq_len:]
            stats.truncated += 1
        prompts.append(EvalPrompt(prompt_ids, answer, source))
    return prompts
