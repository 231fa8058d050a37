"""Data preparation at the scale users bring: our one pass (trainers/prepared) beside
`datasets.map(batched=True)` rendering and tokenizing the same rows, and what a later trial pays.

    python benchmarks/data_scale.py [--sizes 10000,100000,1000000] [--seed 0] [--work DIR]
    python benchmarks/data_scale.py --tiny     # one small size: checks the script (~25 s)

Per size: synthetic instruction rows (instruction 20-100 words, output 5-45: 25-145 a row,
seeded), the embedded BPE tokenizer with a ChatML chat template (a real fast tokenizer; what
a small instruct model ships), data.max_seq_len=512. Each measurement is its own fresh process:

  ours        `trainers.trial.prepare_inputs` (the driver's validation = the preparation pass):
              seconds, peak RSS of the driver and of its largest encoding worker (a pass of more
              than POOL_AFTER_BATCHES batches encodes on forked processes, one per CPU)
  datasets    `load_dataset("json")` + `Dataset.map(batched=True)`: apply_chat_template over the
              conversations, the tokenizer on the batch (ids and offsets, which the labels need),
              a fresh cache dir: seconds and peak RSS (its first pass, as ours)
  trial       a later trial's data loading (tokenizer, the prepared data reused, the first batch
              built): `time/data_s` and the process's RSS then, beside its RSS before loading

  index      a worker's RSS for the lazy rows at --index-rows (default 1M): the largest size's
              prepared record batches repeated to that many rows, opened as a trial opens them
              (memory-mapped, the lengths index built), as examples, packed (data.packing=true)
              and padding-free (data.packing=padding_free; the plan built from the lengths), and
              the first micro-batch drawn (16 items; padding-free: one row); the rows' tokens were
              measured above, this is what holding N of them costs a worker (RSS after, and the
              peak while planning)

--tiny: one size just past the rows a pass encodes without its worker pool (so a worker's RSS
is measured), the index check at that size only.

The two first passes alternate (ours first, then datasets) per size, on the same machine in the
same run; ratios are datasets' seconds / ours (> 1: ours is faster) and ours / datasets for RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ("the a of to and in is it that for on with as was at by be this from or an are not have but "
         "what which one all were when there can more if will would about how up out them then she many some "
         "so these would other into has two time could make like him see number way people water long day "
         "river mountain garden letter window morning silver ancient quiet gentle careful bright").split()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="one small size: checks the script")
    parser.add_argument("--sizes", default=None, help="comma-separated row counts (default 10000,100000; "
                                                      "tiny: one size, just past a pass without workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working directory (default: a temp dir, removed)")
    parser.add_argument("--index-rows", type=int, default=None,
                        help="rows of the worker-RSS index check (default 1000000; tiny: the size)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = str(tiny_rows()) if args.tiny else "10000,100000"
    if args.index_rows is None:
        args.index_rows = int(args.sizes.split(",")[0]) if args.tiny else 1_000_000
    return args


def tiny_rows() -> int:
    """Rows enough for a preparation pass to encode some on worker processes: one batch more than
    it encodes in-process."""
    from trainers.data import TOKENIZE_BATCH
    from trainers.prepared import POOL_AFTER_BATCHES

    return (POOL_AFTER_BATCHES + 1) * TOKENIZE_BATCH


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_rows(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            row = {"instruction": sentence(rng, rng.randint(20, 100)), "output": sentence(rng, rng.randint(5, 45))}
            handle.write(json.dumps(row) + "\n")


def write_model(directory: Path) -> None:
    """The embedded tokenizer with ChatML specials and template, saved as a model directory beside
    the embedded model's weights (the driver checks they are there; no pass here loads them)."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    from trainers.config import ModelConfig
    from trainers.model import load_tokenizer, resolve_model_path

    backend = load_tokenizer(ModelConfig()).backend_tokenizer
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend.__class__.from_str(backend.to_str()),
                                        pad_token="<pad>", unk_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(directory)
    embedded = Path(resolve_model_path(ModelConfig().name_or_path))
    for weights in embedded.glob("*.safetensors"):
        shutil.copy(weights, directory / weights.name)


# --------------------------------------------------------------------------- the measured processes

OURS = """
import json, resource, sys, time
from orchestrator.compose import compose
import trainers.recipes, pyarrow, pandas  # imported before the clock starts, as datasets is for its side
from trainers.trial import prepare_inputs
model, data, root = sys.argv[1:4]
cfg = compose(["data=instruction", f"model.name_or_path={model}", f"data.train_file={data}",
               "data.eval_file=null", "data.max_seq_len=512"])
started = time.perf_counter()
prepared = prepare_inputs(cfg, root)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "status": prepared.status, "rows": prepared.train.stats.rows,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "worker_peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""

DATASETS = """
import json, resource, sys, time
from datasets import load_dataset
from transformers import AutoTokenizer
model, data, cache = sys.argv[1:4]
started = time.perf_counter()
tokenizer = AutoTokenizer.from_pretrained(model)

def tokenize(batch):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": i}, {"role": "assistant", "content": o}],
                                           tokenize=False) for i, o in zip(batch["instruction"], batch["output"])]
    encoding = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return {"input_ids": encoding["input_ids"], "offsets": encoding["offset_mapping"]}

dataset = load_dataset("json", data_files=data, split="train", cache_dir=cache)
dataset = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "rows": len(dataset),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

TRIAL = """
import json, sys, time
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile")}
from orchestrator.compose import compose
from trainers.context import TrialContext
from trainers.templates import load_chat_tokenizer
import torch, transformers, pyarrow  # what a worker has imported before its data
model, data, root, out = sys.argv[1:5]
cfg = compose(["data=instruction", f"model.name_or_path={model}", f"data.train_file={data}",
               "data.eval_file=null", "data.max_seq_len=512"])
before = rss()
ctx = TrialContext(cfg=cfg, output_dir=__import__("pathlib").Path(out), device="cpu", prepared_dir=root)
prepared = ctx.stage_data(load_chat_tokenizer(cfg))
examples = prepared.train.examples()
metrics = prepared.ready(lambda: examples[0])
print(json.dumps({"data_s": metrics["time/data_s"], "status": prepared.status, "rows": len(examples),
                  "rss_before": before, "rss_ready": rss()}))
"""


INDEX = """
import json, sys
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}
import torch, transformers, pyarrow, numpy
from pathlib import Path
from trainers.data import DatasetStats, pack_examples, padding_free_rows
from trainers.prepared import Prepared
from trainers.runtime import DistInfo
from trainers.training import micro_batches
directory, mode = sys.argv[1:3]
before = rss()
examples = Prepared(Path(directory), "instruction", DatasetStats(), "reused").examples()
rows = {"examples": lambda: examples, "packing": lambda: pack_examples(examples, 512, seed=0),
        "padding_free": lambda: padding_free_rows(examples, 16 * 512, "error", 0, DatasetStats())}[mode]()
first = next(micro_batches(rows, 1 if mode == "padding_free" else 16, 0, DistInfo()))
print(json.dumps({"rows": len(examples), "items": len(rows), "rss_before": before, "rss_ready": rss()}))
"""

# What a worker builds of the rows: the examples as they are, data.packing=true (rows of
# max_seq_len 512) and data.packing=padding_free (one row of the default budget, 16 x 512).
INDEX_MODES = ("examples", "packing", "padding_free")


def repeated(source: Path, target: Path, rows: int) -> None:
    """A prepared dataset of `rows` rows: the record batches of `source` over and over."""
    import shutil

    import pyarrow as pa

    target.mkdir(parents=True, exist_ok=True)
    with pa.memory_map(str(source / "data.arrow")) as handle:
        table = pa.ipc.open_stream(handle).read_all()
    batches, written = table.to_batches(), 0
    with pa.OSFile(str(target / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        while written < rows:
            for batch in batches:
                batch = batch.slice(0, min(batch.num_rows, rows - written))
                writer.write_batch(batch)
                written += batch.num_rows
                if written >= rows:
                    break
    shutil.copy(source / "prepared.json", target / "prepared.json")


def measure(script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="true")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_size(n: int, seed: int, work: Path, model: Path) -> dict:
    data = work / f"rows-{n}.jsonl"
    write_rows(data, n, seed)
    root = work / f"prepared-{n}"
    ours = measure(OURS, str(model), str(data), str(root))
    baseline = measure(DATASETS, str(model), str(data), str(work / f"hf-cache-{n}"))
    trial = measure(TRIAL, str(model), str(data), str(root), str(work / f"trial-{n}"))
    return {"rows": n, "bytes": data.stat().st_size, "ours": ours, "datasets": baseline, "trial": trial}


def table(results: list[dict]) -> str:
    mb = 1 / 2**20
    lines = ["| rows | file MB | ours s | datasets.map s | speed (datasets s / ours s) | ours peak RSS MB "
             "(driver / a worker) | datasets peak RSS MB | RSS ratio (driver) | trial time/data_s | "
             "trial RSS before data MB | trial RSS ready MB (anon / file) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        o, d, t = r["ours"], r["datasets"], r["trial"]
        ready = t["rss_ready"]
        lines.append(f"| {r['rows']:,} | {r['bytes'] * mb:.0f} | {o['seconds']:.1f} | {d['seconds']:.1f} | "
                     f"{d['seconds'] / o['seconds']:.2f}x | {o['peak_rss'] * mb:.0f} / {o['worker_peak_rss'] * mb:.0f} | "
                     f"{d['peak_rss'] * mb:.0f} | "
                     f"{o['peak_rss'] / d['peak_rss']:.2f} | {t['data_s']:.2f} | {t['rss_before']['VmRSS'] * mb:.0f} | "
                     f"{ready['VmRSS'] * mb:.0f} ({ready['RssAnon'] * mb:.0f} / {ready['RssFile'] * mb:.0f}) |")
    return "\n".join(lines)


def index_table(index: dict) -> str:
    mb = 1 / 2**20
    lines = ["| rows held (lazy) | rows as | items | worker RSS before MB | after planning + first batch MB "
             "(anon / file) | growth MB | peak growth MB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for rows, modes in sorted(index.items()):
        for mode, r in modes.items():
            ready, before = r["rss_ready"], r["rss_before"]
            lines.append(f"| {rows:,} | {mode} | {r['items']:,} | {before['VmRSS'] * mb:.0f} | "
                         f"{ready['VmRSS'] * mb:.0f} ({ready['RssAnon'] * mb:.0f} / {ready['RssFile'] * mb:.0f}) | "
                         f"{(ready['VmRSS'] - before['VmRSS']) * mb:.1f} | "
                         f"{(ready['VmHWM'] - before['VmRSS']) * mb:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = work / "chatml-model"
        write_model(model)
        results = []
        for n in sizes:
            started = time.perf_counter()
            results.append(run_size(n, args.seed, work, model))
            print(f"{n:,} rows measured in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        print(table(results))
        (largest,) = (work / f"prepared-{sizes[-1]}").iterdir()
        index = {}
        for rows in sorted({sizes[0], args.index_rows}):
            repeated(largest, work / f"index-{rows}", rows)
            index[rows] = {mode: measure(INDEX, str(work / f"index-{rows}"), mode) for mode in INDEX_MODES}
        print(index_table(index))
        if args.json:
            Path(args.json).write_text(json.dumps({"sizes": results, "index": index}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
