"""Shared fixtures: the embedded tokenizer/model, JSONL writers, typed configs for tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much when the CPUs are shared:
    `pytestmark = pytest.mark.usefixtures("one_thread")` runs a module on one torch thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from trainers.config import ModelConfig
    from trainers.model import load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, rows) -> path; a row that is a str is written verbatim (for broken lines)."""

    def write(name: str, rows: list) -> Path:
        path = tmp_path / name
        with open(path, "w") as handle:
            for row in rows:
                handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        return path

    return write


@pytest.fixture
def make_cfg():
    """make_cfg(*overrides) -> a composed, validated ExperimentConfig (Hydra, as the CLI does)."""
    from orchestrator.compose import compose

    def make(*overrides: str):
        return compose(list(overrides))

    return make


@pytest.fixture(scope="session")
def nobias_model(tmp_path_factory):
    """A local model directory of the embedded model's architecture and tokenizer, with the
    attention/MLP biases turned off (as in most Llamas): BitFit has nothing to train on it.
    Randomly initialised weights (safetensors): enough to plan and check inputs."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainers.model import resolve_model_path

    source = Path(resolve_model_path("embedded:base"))
    path = tmp_path_factory.mktemp("nobias")
    config = AutoConfig.from_pretrained(source)
    config.attention_bias = config.mlp_bias = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path


@pytest.fixture
def hub_dataset(tmp_path, monkeypatch):
    """Hub datasets offline: build(name, commit, rows, tag=None) leaves in a fresh datasets cache
    what loading `name` online at `commit` leaves (OWNER___NAME/default/0.0.0/COMMIT/, its arrow
    written by datasets' own json builder from `rows`), the newest build of `name`; `tag` also
    records the tag's commit in the hub cache (HUB/datasets--OWNER--NAME/refs/TAG)."""
    import itertools
    import shutil

    import datasets
    import huggingface_hub.constants

    import trainers.sources

    cache, hub = tmp_path / "datasets-cache", tmp_path / "hub-cache"
    for var, value in (("HF_DATASETS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_CACHE", str(cache)),
                       ("HF_HUB_CACHE", str(hub))):
        monkeypatch.setenv(var, value)
    # Both libraries read their environment once, at import: before this test set it.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(trainers.sources, "_revisions", {})  # a fresh process's
    order = itertools.count(1)

    def build(name: str, commit: str, rows: list[dict], tag: str | None = None) -> None:
        short = name.split("/")[-1]
        source = tmp_path / f"{short}-{commit}.jsonl"
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        made = datasets.load_dataset("json", data_files={"train": str(source)}, cache_dir=str(tmp_path / "json"))
        made_dir = Path(made["train"].cache_files[0]["filename"]).parent
        built = cache / name.replace("/", "___") / "default" / "0.0.0" / commit
        built.mkdir(parents=True)
        info = json.loads((made_dir / "dataset_info.json").read_text())
        info.update(config_name="default", dataset_name=short)
        (built / "dataset_info.json").write_text(json.dumps(info))
        shutil.copy(made_dir / "json-train.arrow", built / f"{short}-train.arrow")
        stamp = 1_700_000_000 + next(order)  # the newest build is the one load_dataset reads
        os.utime(built, (stamp, stamp))
        if tag:
            refs = hub / f"datasets--{name.replace('/', '--')}" / "refs"
            refs.mkdir(parents=True, exist_ok=True)
            (refs / tag).write_text(commit)

    return build
