"""JSONL data: validation that names `file:line`, prompt templates, tokenization with loss masks.

Formats (one JSON object per line):
  instruction  {"instruction": str, "input": str (optional), "output": str}
  chat         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  preference   {"prompt": str, "chosen": str, "rejected": str}
               (or chosen/rejected as message lists, the common form of public preference sets)

A bad row is an error naming `file:line` and the rule it breaks; nothing is dropped silently.
Rows longer than `data.max_seq_len` tokens follow `data.overlength` (error | truncate | drop),
and truncated/dropped rows are counted in `DatasetStats`.
"""

from __future__ import annotations

import bisect
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLE_HEADER = "### {role}:\n"
CHAT_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file breaks a rule; the message starts with `file:line:`."""


@dataclass
class Row:
    source: str  # "file:line"
    data: dict[str, Any]


@dataclass
class DatasetStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0

    def as_metrics(self, split: str) -> dict[str, float]:
        return {f"data/{split}_rows": self.rows, f"data/{split}_truncated": self.truncated,
                f"data/{split}_dropped": self.dropped}


def resolve_path(uri: str) -> Path:
    """`embedded:NAME` -> a file shipped with the project; anything else is a filesystem path."""
    from trainers import embedded

    if embedded.is_embedded(uri):
        return embedded.resolve(uri)
    return Path(uri).expanduser()


_digests: dict[tuple[str, int, int], str] = {}


def data_fingerprint(data) -> dict[str, str]:
    """{"train": sha256, "eval": sha256} of a DataConfig's files, "" for a file that is missing
    (validation reports it). Cached per (path, size, mtime) in this process: a sweep's trials
    share their files."""
    from trainers.checkpoint import file_sha256

    digests = {}
    for split, uri in (("train", data.train_file), ("eval", data.eval_file)):
        if not uri:
            continue
        path = resolve_path(uri)
        try:
            stat = path.stat()
        except OSError:
            digests[split] = ""
            continue
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _digests:
            _digests[key] = file_sha256(path)
        digests[split] = _digests[key]
    return digests


def read_jsonl(path: Path, limit: int | None = None) -> Iterator[Row]:
    """Rows of a JSONL file; blank lines are skipped, anything else must be a JSON object."""
    with open(path, encoding="utf-8") as handle:
        count = 0
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
            count += 1
            if limit is not None and count >= limit:
                return


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
            prompt = render_chat_prompt(chosen_m[:-1])
            chosen, rejected = chosen_m[-1]["content"], rejected_m[-1]["content"]
        else:
            prompt = format_prompt(_require_text(row, "prompt"), "")
            chosen, rejected = _require_text(row, "chosen"), _require_text(row, "rejected")
        if chosen.strip() == rejected.strip():
            raise DataError(f"{row.source}: chosen and rejected are identical")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise ValueError(f"unknown data format {fmt!r}")


def load_rows(uri: str, fmt: str = "auto", limit: int | None = None) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(format, normalised rows, their `file:line` sources) of a JSONL file; validates every row."""
    path = resolve_path(uri)
    if not path.is_file():
        raise DataError(f"{uri}: data file not found")
    rows, sources = [], []
    for row in read_jsonl(path, limit):
        if fmt == "auto":
            fmt = detect_format(row)
        rows.append(validate_row(row, fmt))
        sources.append(row.source)
    if not rows:
        raise DataError(f"{path}: no rows")
    return fmt, rows, sources


def format_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def render_chat_prompt(messages: list[dict]) -> str:
    """Conversation so far plus the header that asks for the assistant's next turn."""
    text = "".join(CHAT_ROLE_HEADER.format(role=m["role"].capitalize()) + m["content"] + "\n\n" for m in messages)
    return text + CHAT_ROLE_HEADER.format(role="Assistant")


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


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def _encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Piecewise encoding (as generation sees it): role header, then content; assistant turns train."""
    ids = _bos(tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        header = _ids(tokenizer, CHAT_ROLE_HEADER.format(role=message["role"].capitalize()))
        trains = message["role"] == "assistant"
        if message["role"] == "assistant":
            body = _ids(tokenizer, message["content"]) + [tokenizer.eos_token_id]
            tail = _ids(tokenizer, "\n\n") if i < len(messages) - 1 else []
        else:
            body, tail = _ids(tokenizer, message["content"] + "\n\n"), []
        ids += header + body + tail
        labels += [IGNORE_INDEX] * len(header) + (body if trains else [IGNORE_INDEX] * len(body))
        labels += [IGNORE_INDEX] * len(tail)
    return ids, labels


def encode_row(tokenizer, row: dict, fmt: str) -> tuple[list[int], list[int]]:
    """Token ids and labels: prompt tokens masked, response tokens + eos trained."""
    if fmt == "instruction":
        prompt = _bos(tokenizer) + _ids(tokenizer, format_prompt(row["instruction"], row["input"]))
        answer = _ids(tokenizer, row["output"]) + [tokenizer.eos_token_id]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer
    if fmt == "chat":
        return _encode_chat(tokenizer, row["messages"])
    raise ValueError(f"encode_row does not handle format {fmt!r}")


def eval_prompt(tokenizer, row: dict, fmt: str) -> tuple[list[int], str]:
    """Prompt ids for generation and the expected answer (instruction: output; chat: last turn)."""
    if fmt == "instruction":
        return _bos(tokenizer) + _ids(tokenizer, format_prompt(row["instruction"], row["input"])), row["output"]
    history, _ = _encode_chat(tokenizer, row["messages"][:-1]) if len(row["messages"]) > 1 else (_bos(tokenizer), [])
    header = _ids(tokenizer, CHAT_ROLE_HEADER.format(role="Assistant"))
    return history + header, row["messages"][-1]["content"]


def tokenize_split(tokenizer, rows: list[dict], sources: list[str], fmt: str, max_seq_len: int,
                   overlength: str, with_prompts: bool = False) -> TokenizedSplit:
    split = TokenizedSplit()
    for row, source in zip(rows, sources):
        ids, labels = encode_row(tokenizer, row, fmt)
        if len(ids) > max_seq_len:
            if overlength == "error":
                raise DataError(
                    f"{source}: {len(ids)} tokens exceeds data.max_seq_len={max_seq_len} "
                    "(set data.overlength=truncate or drop to allow)"
                )
            if overlength == "drop":
                split.stats.dropped += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels):
                split.stats.dropped += 1  # nothing left to learn from
                continue
            split.stats.truncated += 1
        split.examples.append(Example(ids, labels, source))
        if with_prompts:
            prompt_ids, answer = eval_prompt(tokenizer, row, fmt)
            split.prompts.append(EvalPrompt(prompt_ids, answer, source))
    split.stats.rows = len(split.examples)
    if not split.examples:
        raise DataError(f"no usable rows left after data.overlength={overlength} (max_seq_len={max_seq_len})")
    return split


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


def pack_examples(examples: list[Example], max_seq_len: int, seed: int) -> list[PackedRow]:
    """Examples packed into rows of <= max_seq_len tokens, every example in exactly one row.

    Minimum bin slack: each row starts with the longest example left and is filled with the
    examples whose lengths leave the least room (fill_row). On the embedded data (16-27 tokens a
    row, max_seq_len 96) plain best-fit decreasing fills 94.3% of the rows' positions (a row of
    4 x 20 = 80 has no room for a 16 and stays so) and this 98.9%; on varied lengths both reach
    ~99.7%. Which example of a length goes next follows a seeded shuffle, so the rows are
    deterministic per seed; they come out longest-first and the batch stream shuffles them.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    by_length: dict[int, list[int]] = {}  # length -> examples left (popped from the end)
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_seq_len:
            raise ValueError(f"{examples[i].source}: {n} tokens do not fit data.max_seq_len={max_seq_len}")
        by_length.setdefault(n, []).append(i)
    lengths = sorted(by_length)  # lengths with examples left, ascending
    rows = []
    while lengths:
        first = lengths[-1]
        taken = [first] + fill_row(max_seq_len - first, lengths, by_length, first)
        members = []
        for n in taken:
            members.append(by_length[n].pop())
            if not by_length[n]:
                del by_length[n]
                lengths.pop(bisect.bisect_left(lengths, n))
        ids, labels, positions = [], [], []
        for i in members:
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]
            positions += range(len(e.input_ids))
        rows.append(PackedRow(ids, labels, ",".join(examples[i].source for i in members), positions))
    return rows


def fill_row(room: int, lengths: list[int], by_length: dict[int, list[int]], reserved: int) -> list[int]:
    """Lengths (with repeats, at most as many as there are examples of each, one of `reserved`
    being taken already) that fill `room` as fully as possible.

    Greedy first (the longest that fits, again and again): with varied lengths it fills the row
    or leaves under 1% empty, and then that is kept. Otherwise an exact subset sum: a bitset of
    reachable sums grown length by length (counts split in powers of two), walked back from the
    best sum.
    """
    def left(n: int) -> int:
        return len(by_length[n]) - (n == reserved)

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


def non_pad_fraction(rows: list[Example], batch_size: int, max_seq_len: int | None = None) -> float:
    """Share of a padded batch's positions that hold tokens: rows padded to `max_seq_len`, or to
    the longest of each consecutive `batch_size` rows when it is None."""
    tokens = sum(len(r.input_ids) for r in rows)
    if max_seq_len is not None:
        return tokens / (len(rows) * max_seq_len)
    slots = sum(len(rows[s:s + batch_size]) * max(len(r.input_ids) for r in rows[s:s + batch_size])
                for s in range(0, len(rows), batch_size))
    return tokens / slots


# --------------------------------------------------------------------------- preference pairs and prompts


@dataclass
class PairExample:
    """A preference pair as two examples sharing the prompt; labels on each response (+ eos)."""

    chosen: Example
    rejected: Example
    source: str = ""


def encode_pair(tokenizer, row: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids + eos, rejected ids + eos) of a normalised preference row."""
    prompt = _bos(tokenizer) + _ids(tokenizer, row["prompt"])
    return (prompt, _ids(tokenizer, row["chosen"]) + [tokenizer.eos_token_id],
            _ids(tokenizer, row["rejected"]) + [tokenizer.eos_token_id])


def tokenize_pairs(tokenizer, rows: list[dict], sources: list[str], max_seq_len: int,
                   overlength: str) -> tuple[list[PairExample], DatasetStats]:
    """Preference rows as PairExamples; a pair whose longer side exceeds max_seq_len follows
    `overlength` (truncate cuts both sides; a side left without response tokens drops the pair)."""
    pairs, stats = [], DatasetStats()
    for row, source in zip(rows, sources):
        prompt, chosen, rejected = encode_pair(tokenizer, row)
        longest = len(prompt) + max(len(chosen), len(rejected))
        if longest > max_seq_len:
            if overlength == "error":
                raise DataError(f"{source}: {longest} tokens exceeds data.max_seq_len={max_seq_len} "
                                "(set data.overlength=truncate or drop to allow)")
            room = max_seq_len - len(prompt)
            if overlength == "drop" or room <= 0:
                stats.dropped += 1
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            stats.truncated += 1
        sides = [Example(prompt + side, [IGNORE_INDEX] * len(prompt) + side, source) for side in (chosen, rejected)]
        pairs.append(PairExample(sides[0], sides[1], source))
    stats.rows = len(pairs)
    if not pairs:
        raise DataError(f"no usable preference pairs left after data.overlength={overlength} (max_seq_len={max_seq_len})")
    return pairs, stats


def prompts_with_answers(tokenizer, rows: list[dict], sources: list[str], fmt: str, max_seq_len: int,
                         overlength: str) -> tuple[list[EvalPrompt], DatasetStats]:
    """Prompts to generate from and their known answers: an instruction's output, a chat's last
    assistant turn, a preference pair's chosen response. A prompt longer than max_seq_len follows
    `overlength` (truncate keeps its end, where the response header is)."""
    prompts, stats = [], DatasetStats()
    for row, source in zip(rows, sources):
        if fmt == "preference":
            prompt_ids, answer = _bos(tokenizer) + _ids(tokenizer, row["prompt"]), row["chosen"]
        else:
            prompt_ids, answer = eval_prompt(tokenizer, row, fmt)
        if len(prompt_ids) > max_seq_len:
            if overlength == "error":
                raise DataError(f"{source}: prompt of {len(prompt_ids)} tokens exceeds data.max_seq_len={max_seq_len} "
                                "(set data.overlength=truncate or drop to allow)")
            if overlength == "drop":
                stats.dropped += 1
                continue
            prompt_ids = prompt_ids[-max_seq_len:]
            stats.truncated += 1
        prompts.append(EvalPrompt(prompt_ids, answer, source))
    stats.rows = len(prompts)
    if not prompts:
        raise DataError(f"no usable prompts left after data.overlength={overlength} (max_seq_len={max_seq_len})")
    return prompts, stats
