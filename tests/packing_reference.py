"""The eager code as it was before packed rows and the batch stream became lazy (commit
64caef9): every packed row built into a list up front, the shuffled order a list of ints. Kept
(lightly renamed) as the reference the lazy code must reproduce row for row and batch for batch
(tests/test_packing.py, tests/test_prepared.py); not used by the project."""

from __future__ import annotations

import bisect
import random

from trainers.data import IGNORE_INDEX, DataError, Example, PackedRow


def eager_pack(examples: list[Example], max_seq_len: int, seed: int) -> list[PackedRow]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    sizes = [len(e.input_ids) for e in examples]
    by_length: dict[int, list[int]] = {}
    for i in order:
        n = int(sizes[i])
        if n > max_seq_len:
            raise ValueError(f"{examples[i].source}: {n} tokens do not fit data.max_seq_len={max_seq_len}")
        by_length.setdefault(n, []).append(i)
    lengths = sorted(by_length)
    rows = []
    while lengths:
        first = lengths[-1]
        taken = [first] + eager_fill_row(max_seq_len - first, lengths, by_length, first)
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


def eager_padding_free(examples: list[Example], budget: int, overlength: str, seed: int, stats) -> list[PackedRow]:
    fitting = []
    for e in examples:
        if len(e.input_ids) <= budget:
            fitting.append(e)
        elif overlength == "error":
            raise DataError(f"{e.source}: {len(e.input_ids)} tokens exceed data.max_tokens_per_batch={budget}")
        elif overlength == "truncate" and any(label != IGNORE_INDEX for label in e.labels[1:budget]):
            fitting.append(Example(e.input_ids[:budget], e.labels[:budget], e.source))
            stats.truncated += 1
        else:
            stats.dropped += 1
    stats.rows = len(fitting)
    return eager_pack(fitting, budget, seed)


def eager_fill_row(room: int, lengths: list[int], by_length: dict[int, list[int]], reserved: int) -> list[int]:
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
    if free * 100 <= room + reserved:
        return greedy
    mask = (1 << (room + 1)) - 1
    reach, groups = 1, []
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
        if not (before >> total) & 1:
            chosen += [n] * part
            total -= n * part
    return chosen


def list_stream(examples, batch_size: int, seed: int, rank: int, world_size: int, lengths=None, window: int = 8):
    """trainers.training.micro_batches as it was with Python lists (`lengths`: grouped by length,
    `window` batches a window)."""
    per_rank = len(examples) // world_size
    usable = per_rank - per_rank % batch_size or per_rank
    epoch = 0
    while True:
        order = list(range(len(examples)))
        rng = random.Random(seed * 100_003 + epoch)
        rng.shuffle(order)
        shard = order[:per_rank * world_size][rank::world_size]
        if lengths is not None:
            batches = []
            for start in range(0, len(shard), batch_size * window):
                by_length = sorted(shard[start:start + batch_size * window], key=lambda i: lengths[i])
                batches += [by_length[b:b + batch_size] for b in range(0, len(by_length), batch_size)]
            rng.shuffle(batches)
            yield from ([examples[i] for i in batch] for batch in batches)
        else:
            for start in range(0, usable, batch_size):
                yield [examples[i] for i in shard[start:start + batch_size]]
        epoch += 1
