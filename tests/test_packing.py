"""Faster batching keeps the training signal: packed rows (data.packing) never attend across
examples and mask each example's first label; packing fills >= 97% of the embedded data's rows;
length-grouped batches (data.group_by_length) are a deterministic, complete, shuffled cover of
each epoch; and a resumed run continues the same batch stream in both modes.
"""

from __future__ import annotations

import importlib.util
import math
import random
from collections import Counter

import pytest
import torch

from trainers.config import DataConfig, TrainConfig
from trainers.data import IGNORE_INDEX, Example, PackedRow, non_pad_fraction, pack_examples, pad_batch
from trainers.runtime import DistInfo
from trainers.tracking import Tracker
from trainers.training import micro_batches, train_loop

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_cache=False)
    config._attn_implementation = attn_implementation
    return LlamaForCausalLM(config).eval()


def random_examples(n: int, low: int = 5, high: int = 30, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(low, high)
        ids = [rng.randrange(1, 128) for _ in range(length)]
        prompt = rng.randint(1, length - 1)
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], f"ex:{i}"))
    return examples


@pytest.fixture(scope="module")
def embedded_examples(tokenizer):
    from trainers.data import load_rows, tokenize_split

    data = DataConfig(train_file="embedded:instruct_train.jsonl")
    fmt, rows, sources = load_rows(data.train_file, data.format)
    return tokenize_split(tokenizer, rows, sources, fmt, data.max_seq_len, data.overlength).examples


def assert_isolated(model, examples: list[Example], max_seq_len: int, pad_id: int = 0) -> None:
    """Logits of every example inside its packed row == the example run alone (within 1e-5)."""
    rows = pack_examples(examples, max_seq_len, seed=0)
    assert any(len(r.position_ids) != max(r.position_ids) + 1 for r in rows), "nothing was packed"
    batch = pad_batch(rows, pad_id)
    assert "attention_mask" not in batch  # what turns on transformers' packed-sequence masking
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
            for start, end in zip(starts, starts[1:]):
                alone = model(input_ids=torch.tensor([row.input_ids[start:end]])).logits[0]
                torch.testing.assert_close(packed[r, start:end], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_never_attend_across_examples(attn):
    assert_isolated(tiny_llama(attn), random_examples(24), max_seq_len=64)


def test_packed_rows_never_attend_across_examples_embedded_lora(embedded_examples, tokenizer):
    """The default path end to end: the embedded base under LoRA, real tokenized examples."""
    from trainers.config import ExperimentConfig
    from trainers.methods import METHODS
    from trainers.methods.lora import LoraConfig
    from trainers.model import load_base_model
    from trainers.recipes.sft import SftConfig

    cfg = ExperimentConfig(data=DataConfig(train_file="embedded:instruct_train.jsonl"), method=LoraConfig(),
                           stage=SftConfig())
    # float64: float32 matmuls of other shapes differ by ~1e-5 on logits of ~10; leakage would not
    model = METHODS["lora"].apply(load_base_model(cfg, CPU), cfg).double().eval()
    assert_isolated(model, embedded_examples[:12], cfg.data.max_seq_len, tokenizer.pad_token_id)


def test_labels_are_masked_per_example_and_every_example_is_packed_once():
    examples = random_examples(200)
    rows = pack_examples(examples, 64, seed=3)
    assert all(isinstance(r, PackedRow) and len(r.input_ids) <= 64 for r in rows)
    by_tokens = Counter(tuple(e.input_ids) for e in examples)
    seen = Counter()
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.position_ids)]
        for start, end in zip(starts, starts[1:]):
            ids = tuple(row.input_ids[start:end])
            original = next(e for e in examples if tuple(e.input_ids) == ids)
            assert row.position_ids[start:end] == list(range(end - start))
            # the first token would be predicted from the previous example's last one
            assert row.labels[start] == IGNORE_INDEX
            assert row.labels[start + 1:end] == original.labels[1:]
            seen[ids] += 1
    assert seen == by_tokens
    assert pack_examples(examples, 64, seed=3) == rows  # deterministic per seed


def test_packing_fills_rows_of_the_embedded_data(embedded_examples):
    max_seq_len = DataConfig.max_seq_len
    rows = pack_examples(embedded_examples, max_seq_len, seed=0)
    fill = non_pad_fraction(rows, 16, max_seq_len)
    unpacked = non_pad_fraction(embedded_examples, 16)
    assert fill >= 0.97, f"packed rows are {fill:.1%} tokens"
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in embedded_examples)
    assert fill > unpacked


def test_group_by_length_is_deterministic_complete_and_shuffled():
    examples = random_examples(1000, low=5, high=200)
    batch_size, per_epoch = 8, 125
    stream = micro_batches(examples, batch_size, seed=1, dist=DistInfo(), group_by_length=True)
    epochs = [[next(stream) for _ in range(per_epoch)] for _ in range(2)]
    again = micro_batches(examples, batch_size, seed=1, dist=DistInfo(), group_by_length=True)
    assert [next(again) for _ in range(per_epoch)] == epochs[0]
    for epoch in epochs:
        assert sorted(e.source for batch in epoch for e in batch) == sorted(e.source for e in examples)
    assert epochs[0] != epochs[1]
    other_seed = micro_batches(examples, batch_size, seed=2, dist=DistInfo(), group_by_length=True)
    assert [next(other_seed) for _ in range(per_epoch)] != epochs[0]

    grouped = [e for batch in epochs[0] for e in batch]
    plain_stream = micro_batches(examples, batch_size, seed=1, dist=DistInfo())
    plain = [e for _ in range(per_epoch) for e in next(plain_stream)]
    assert non_pad_fraction(grouped, batch_size) > 0.9 > non_pad_fraction(plain, batch_size)
    # shuffled across batches: the batch order is not sorted by length
    longest = [max(len(e.input_ids) for e in batch) for batch in epochs[0]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


class Interrupted(Exception):
    pass


def recording_loss(pad_id: int, seen: list, stop_after: int | None = None):
    """The causal-LM loss, noting each micro-batch's sources; raises after `stop_after` of them."""
    from trainers.training import causal_lm_loss

    inner = causal_lm_loss(pad_id, CPU)

    def loss_fn(model, batch):
        if stop_after is not None and len(seen) >= stop_after:
            raise Interrupted
        seen.append([e.source for e in batch])
        return inner(model, batch)

    return loss_fn


@pytest.mark.parametrize("mode", ["packing", "group_by_length"])
def test_resume_continues_the_same_stream(tmp_path, mode):
    from trainers.checkpoint import CheckpointManager

    examples = random_examples(60)
    if mode == "packing":
        examples = pack_examples(examples, 64, seed=0)
    train = TrainConfig(max_steps=6, batch_size=4, checkpoint_every=3, log_every=3, lr=1e-2)
    grouped = mode == "group_by_length"

    straight: list = []
    model = tiny_llama().train()
    train_loop(model, examples, train, 0, CPU, DistInfo(), Tracker(), loss_fn=recording_loss(0, straight),
               group_by_length=grouped)

    first: list = []
    manager = CheckpointManager(tmp_path / "checkpoints")
    with pytest.raises(Interrupted):  # dies in step 5, after the checkpoint of step 3
        train_loop(tiny_llama().train(), examples, train, 0, CPU, DistInfo(), Tracker(), checkpoints=manager,
                   loss_fn=recording_loss(0, first, stop_after=4), group_by_length=grouped)
    assert first == straight[:4]
    after: list = []
    restarted = tiny_llama(seed=1).train()  # the restored weights must replace these
    stats = train_loop(restarted, examples, train, 0, CPU, DistInfo(), Tracker(), checkpoints=manager,
                       loss_fn=recording_loss(0, after), group_by_length=grouped)
    assert stats.resumed_from == 3
    assert after == straight[3:]
    for trained, again in zip(model.parameters(), restarted.parameters()):
        torch.testing.assert_close(again, trained, atol=1e-6, rtol=0)


LIGER_INSTALLED = importlib.util.find_spec("liger_kernel") is not None
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


@pytest.mark.parametrize("overrides,key", [
    (["data.packing=true", "data.group_by_length=true"], "data.group_by_length"),
    (["data.packing=true", "method=prefix"], "data.packing"),
    (["stage=dpo", "data=embedded_pref", "data.group_by_length=true"], "data.group_by_length"),
    (["train.compile=true"], "train.compile"),
    (["train.liger=true"], "train.liger"),
    pytest.param(["train.liger=true", "train.use_gpu=true"], "train.liger",
                 marks=pytest.mark.skipif(LIGER_INSTALLED, reason="liger-kernel is installed")),
    (["data.packing=sometimes"], "data.packing"),
    (["data.packing=padding_free", "stage=dpo", "data=embedded_pref"], "data.packing"),
    (["data.packing=padding_free", "stage=reward", "data=embedded_pref"], "data.packing"),
    (["data.packing=padding_free", "method=prefix"], "data.packing"),
    (["data.packing=padding_free", "method=prompt"], "data.packing"),
    (["data.packing=padding_free", "method=ptuning"], "data.packing"),
    (["data.packing=padding_free", "data.group_by_length=true"], "data.group_by_length"),
    (["data.packing=padding_free", "data.max_tokens_per_batch=0"], "data.max_tokens_per_batch"),
    (["data.packing=true", "data.max_tokens_per_batch=512"], "data.max_tokens_per_batch"),
    (["model.attn_implementation=paged"], "model.attn_implementation"),
    (["model.attn_implementation=flash_attention_2"], "model.attn_implementation"),
    (["model.attn_implementation=flex_attention"], "model.attn_implementation"),
    pytest.param(["model.attn_implementation=flash_attention_2", "train.use_gpu=true"], "model.attn_implementation",
                 marks=pytest.mark.skipif(FLASH_ATTN_INSTALLED, reason="flash-attn is installed")),
])
def test_batching_and_kernel_switches_are_validated(make_cfg, overrides, key):
    from trainers.config import ConfigError

    with pytest.raises(ConfigError) as err:
        make_cfg(*overrides)
    assert key in [k for k, _ in err.value.problems], err.value


def test_packing_and_grouping_compose_for_sft(make_cfg):
    from trainers.config import flatten, to_container

    assert make_cfg("data.packing=true").data.packed_rows
    free = make_cfg("data.packing=padding_free", "model.attn_implementation=eager")
    assert free.data.padding_free and not free.data.packed_rows
    params = flatten(to_container(free))  # what the trial logs as MLflow params
    assert params["data.packing"] == "padding_free" and params["model.attn_implementation"] == "eager"
    assert free.data.token_budget(free.train.batch_size) == free.train.batch_size * free.data.max_seq_len
    assert make_cfg("data.group_by_length=true", "method=prefix").data.group_by_length


# --- data.packing=padding_free


def test_padding_free_rows_fill_the_token_budget_and_hold_every_example_once(embedded_examples):
    from trainers.data import DatasetStats, padding_free_rows

    budget = 16 * DataConfig.max_seq_len  # the default: train.batch_size x max_seq_len
    stats = DatasetStats(rows=len(embedded_examples))
    rows = padding_free_rows(embedded_examples, budget, "error", seed=0, stats=stats)
    assert all(len(r.input_ids) <= budget for r in rows)
    # no pad position: the collated micro-batch is exactly the row
    batch = pad_batch(rows[:1], pad_id=0)
    assert batch["input_ids"].shape == (1, len(rows[0].input_ids)) and "attention_mask" not in batch
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in embedded_examples)
    assert non_pad_fraction(rows[:-1], 1, budget) >= 0.99  # every budget but the last is full
    assert stats.rows == len(embedded_examples) and stats.dropped == stats.truncated == 0


@pytest.mark.parametrize("overlength", ["error", "truncate", "drop"])
def test_an_example_longer_than_the_token_budget_follows_overlength(overlength):
    from trainers.data import DataError, DatasetStats, padding_free_rows

    examples = random_examples(20, low=5, high=12) + [Example(list(range(1, 41)), [IGNORE_INDEX] * 5 +
                                                              list(range(6, 41)), "long:1")]
    stats = DatasetStats(rows=len(examples))
    if overlength == "error":
        with pytest.raises(DataError, match="long:1.*data.max_tokens_per_batch=32"):
            padding_free_rows(examples, 32, overlength, seed=0, stats=stats)
        return
    rows = padding_free_rows(examples, 32, overlength, seed=0, stats=stats)
    sources = [s for r in rows for s in r.source.split(",")]
    assert ("long:1" in sources) == (overlength == "truncate")
    assert (stats.truncated, stats.dropped) == ((1, 0) if overlength == "truncate" else (0, 1))
    assert all(len(r.input_ids) <= 32 for r in rows)


def test_padding_free_flash_kwargs_mark_each_example():
    from trainers.data import DatasetStats, padding_free_rows, varlen_kwargs

    examples = random_examples(6)
    (row,) = padding_free_rows(examples, 1000, "error", seed=0, stats=DatasetStats())
    kwargs = varlen_kwargs(row.position_ids)
    lengths = sorted(len(e.input_ids) for e in examples)
    cu = kwargs["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == len(row.input_ids)
    assert sorted(cu.diff().tolist()) == lengths and kwargs["max_length_k"] == lengths[-1]
    assert kwargs["cu_seq_lens_k"] is cu


def test_padding_free_ranks_change_epochs_together_and_run_as_many_steps():
    """Two workers over padding-free rows (one a micro-batch): each epoch both take as many rows,
    none twice, and a step's rows differ across ranks."""
    from trainers.data import DatasetStats, padding_free_rows

    rows = padding_free_rows(random_examples(203, low=5, high=60), 256, "error", seed=0, stats=DatasetStats())
    per_rank = len(rows) // 2
    streams = [micro_batches(rows, 1, seed=4, dist=DistInfo(rank=r, world_size=2)) for r in range(2)]
    for _ in range(2):  # epochs
        taken = [[next(s)[0].source for _ in range(per_rank)] for s in streams]
        assert len(set(taken[0]) | set(taken[1])) == 2 * per_rank
        assert all(a != b for a, b in zip(*taken))


def test_padding_free_trial_trains_and_estimates_its_one_row(make_cfg, tmp_path):
    """A whole SFT trial with data.packing=padding_free on the embedded data: it trains, logs the
    rows and their fill, and estimates a batch of one row of the token budget."""
    from trainers.trial import run_trial

    cfg = make_cfg("data.packing=padding_free", "data.max_tokens_per_batch=400", "train.max_steps=3",
                   "train.log_every=3", "train.checkpoint_every=0", "data.max_eval_rows=16", "data.max_train_rows=200")
    logged: dict = {}

    class Recorder(Tracker):
        def log_metrics(self, metrics, step=None):
            logged.update(metrics)

    metrics = run_trial(cfg, tmp_path, tracker=Recorder())
    assert logged["data/packed_fill"] > 0.9 and logged["data/packed_rows"] < 200 * 27 / 400 + 2
    assert math.isfinite(metrics["train/final_loss"]) and metrics["mem/estimated_peak_bytes"] > 0
    from trainers import memory

    one_row = memory.estimate(cfg, seq_len=400, eval_seq_len=1).train_peak_bytes
    assert one_row < memory.estimate(cfg, seq_len=401, eval_seq_len=1).train_peak_bytes


def _padding_free_rank(rank: int, out_dir: str, port: int, max_steps: int) -> None:
    """One of two DDP ranks (gloo) training tiny_llama on padding-free rows; writes what it ran."""
    import json
    import os
    import sys

    import torch.distributed as dist

    from trainers import parallel
    from trainers.data import DatasetStats, padding_free_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        info = DistInfo(rank, 2, rank)
        rows = padding_free_rows(random_examples(90, low=5, high=40), 128, "error", seed=0, stats=DatasetStats())
        model = parallel.wrap(tiny_llama().train(), info, CPU)
        seen: list = []
        train = TrainConfig(max_steps=max_steps, batch_size=1, lr=1e-2, log_every=max_steps, checkpoint_every=0)
        stats = train_loop(model, rows, train, 0, CPU, info, Tracker(), loss_fn=recording_loss(0, seen))
        weights = torch.cat([p.detach().flatten() for p in parallel.unwrap(model).parameters()])
        result = {"steps": stats.steps, "seen": seen, "rows": len(rows), "weights": weights[:64].tolist(),
                  "lengths": {r.source: len(r.input_ids) for r in rows}}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(result, handle)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # no C++ static teardown after gloo (see tests/test_cluster_unit.py)


def test_padding_free_under_ddp_ranks_run_the_same_steps_across_an_epoch(tmp_path):
    """Two DDP ranks on padding-free rows of different lengths: both run every step (past an
    epoch's end, where the ranks must change epochs together), on different rows each step, and
    end with the same weights (gradients averaged each step)."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from trainers.data import DatasetStats, padding_free_rows

    per_rank = len(padding_free_rows(random_examples(90, low=5, high=40), 128, "error", 0, DatasetStats())) // 2
    max_steps = per_rank + 3
    mp.spawn(_padding_free_rank, args=(str(tmp_path), port, max_steps), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [max_steps, max_steps]
    assert all(len(r["seen"]) == max_steps and all(len(batch) == 1 for batch in r["seen"]) for r in ranks)
    steps = list(zip(ranks[0]["seen"], ranks[1]["seen"]))
    assert all(a != b for a, b in steps)
    lengths = ranks[0]["lengths"]
    assert any(lengths[a[0]] != lengths[b[0]] for a, b in steps)  # unequal tokens per rank, still in step
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], abs=1e-6)


# --- the plan is lazy: rows built on demand, the same rows as the eager code built


@pytest.mark.parametrize("case", ["varied", "embedded", "one_length", "padding_free"])
def test_lazy_packed_rows_are_the_rows_the_eager_code_built(case, embedded_examples):
    """pack_examples / padding_free_rows keep a plan and build each row when indexed; row for row
    they equal what the eager code (tests/packing_reference.py, the code before) returned."""
    from packing_reference import eager_pack, eager_padding_free
    from trainers.data import DatasetStats, padding_free_rows

    if case == "padding_free":
        examples = random_examples(300, low=5, high=60, seed=2)
        examples[7] = Example(list(range(1, 91)), [IGNORE_INDEX] * 3 + list(range(4, 91)), "long:7")
        examples[9] = Example(list(range(1, 81)), [IGNORE_INDEX] * 79 + [5], "long:9")  # nothing left if cut
        for overlength in ("truncate", "drop"):
            ours, theirs = DatasetStats(), DatasetStats()
            rows = padding_free_rows(examples, 64, overlength, seed=5, stats=ours)
            assert list(rows) == eager_padding_free(examples, 64, overlength, 5, theirs) and vars(ours) == vars(theirs)
        return
    examples, width = {"varied": (random_examples(500, low=3, high=90, seed=1), 128),
                       "embedded": (embedded_examples, 96),  # the exact subset sum fills these rows
                       "one_length": ([Example([1] * 10, [1] * 10, str(i)) for i in range(37)], 64)}[case]
    for seed in (0, 3):
        rows = pack_examples(examples, width, seed)
        expected = eager_pack(examples, width, seed)
        assert len(rows) == len(expected) and list(rows) == expected
        assert rows[-1] == expected[-1] and rows[2:5] == expected[2:5]
        assert [int(n) for n in rows.lengths] == [len(r.input_ids) for r in expected]


def test_the_batch_stream_is_the_one_lists_gave():
    """micro_batches keeps its shuffled order in int32 arrays (4 bytes an example): the stream is
    the one it drew with lists, for one and two ranks, plain and grouped by length."""
    from packing_reference import list_stream
    from trainers.training import LENGTH_GROUP_BATCHES

    examples = random_examples(203, low=5, high=60)
    lengths = [len(e.input_ids) for e in examples]
    for world_size in (1, 2):
        for group in (False, True):
            for rank in range(world_size):
                ours = micro_batches(examples, 4, seed=7, dist=DistInfo(rank=rank, world_size=world_size),
                                     group_by_length=group)
                theirs = list_stream(examples, 4, 7, rank, world_size, lengths if group else None,
                                     LENGTH_GROUP_BATCHES)
                assert [next(ours) for _ in range(150)] == [next(theirs) for _ in range(150)]
