"""Build the embedded assets: data/ (instruction + preference JSONL) and base/ (tokenizer + model).

Each part is rebuilt only when missing (or with force=True). Everything derives from the seed:
the data files are byte-identical across machines; the model is identical for the same torch
version and thread count (CPU float reductions depend on both).

    python -m trainers.embedded build [--out DIR] [--force] [--steps N]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from trainers.embedded.names import DATA_NAMES
from trainers.embedded import world as W

DATA_FILES = DATA_NAMES  # in this order: the rows build_data writes
BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "BUILD.json")
DEFAULT_STEPS = 1000
DEFAULT_ROUNDS = 40  # each fact is stated once per round in the pretraining corpus


def _log(message: str) -> None:
    print(f"[embedded] {message}", file=sys.stderr, flush=True)


def data_complete(out: Path) -> bool:
    return all((out / "data" / name).is_file() for name in DATA_FILES)


def base_complete(out: Path) -> bool:
    return all((out / "base" / name).is_file() for name in BASE_FILES)


def build_data(out: Path, seed: int = W.DEFAULT_SEED) -> None:
    world = W.build_world(seed)
    instruct_train, instruct_eval = W.build_instruction_data(world)
    pref_train, pref_eval = W.build_preference_data(world)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    sft_train = W.build_sft_data(world)
    for name, rows in zip(DATA_FILES, (instruct_train, instruct_eval, pref_train, pref_eval, sft_train)):
        (data_dir / name).write_text(W.to_jsonl(rows), encoding="utf-8")
    _log(f"wrote {len(instruct_train)}+{len(instruct_eval)} instruction, {len(sft_train)} SFT demonstration "
         f"and {len(pref_train)}+{len(pref_eval)} preference rows to {data_dir}")


def tokenizer_texts(world: W.World, corpus: list[str]) -> list[str]:
    """Corpus plus every instruction phrasing inside the template, so both tokenize compactly."""
    instruct_train, _ = W.build_instruction_data(world)
    prompts = [W.format_prompt(r["instruction"], r["input"]) + r["output"] for r in instruct_train]
    return corpus + prompts


def build_base(out: Path, steps: int = DEFAULT_STEPS, seed: int = W.DEFAULT_SEED,
               rounds: int = DEFAULT_ROUNDS) -> None:
    import tokenizers
    import torch
    import transformers

    from trainers.embedded.pretrain import pretrain
    from trainers.embedded.tokenizer import train_tokenizer

    started = time.perf_counter()
    base_dir = out / "base"
    world = W.build_world(seed)
    corpus = W.build_corpus(world, rounds=rounds)
    tokenizer = train_tokenizer(tokenizer_texts(world, corpus), base_dir)
    _log(f"tokenizer: {len(tokenizer)} tokens; pretraining {steps} steps on {len(corpus)} documents")
    model, record = pretrain(corpus, tokenizer, steps=steps, seed=seed, log=_log)
    model.generation_config.do_sample = False
    model.generation_config.max_new_tokens = 8
    model.save_pretrained(str(base_dir), safe_serialization=True)
    record = {
        "seed": seed,
        "corpus_rounds": rounds,
        "corpus_documents": len(corpus),
        "corpus_characters": sum(len(d) for d in corpus),
        "vocab_size": len(tokenizer),
        **record,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "prompt_template": W.PROMPT_TEMPLATE,
        "prompt_template_with_input": W.PROMPT_TEMPLATE_WITH_INPUT,
    }
    (base_dir / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _log(f"base model: loss {record['initial_loss']} -> {record['final_loss']} "
         f"in {record['wall_seconds']}s, saved to {base_dir}")


@contextlib.contextmanager
def _build_lock(out: Path):
    """One builder per assets dir at a time: Ray workers or parallel tests may all resolve a
    missing asset at once; the others wait, then find it built. The lock file lives in the temp
    dir so the repository stays clean."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent first builds are the caller's problem
        yield
        return
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"trainers-embedded-{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build(out: Path, force: bool = False, steps: int = DEFAULT_STEPS, seed: int = W.DEFAULT_SEED,
          rounds: int = DEFAULT_ROUNDS, parts: tuple[str, ...] = ("data", "base")) -> None:
    out = Path(out)
    with _build_lock(out):
        if "data" in parts and (force or not data_complete(out)):
            build_data(out, seed)
        if "base" in parts and (force or not base_complete(out)):
            build_base(out, steps=steps, seed=seed, rounds=rounds)
