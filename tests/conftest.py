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
