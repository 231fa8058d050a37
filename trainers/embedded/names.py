"""The embedded assets' names and where they live (no imports: build.py and the package both use them)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
SCHEME = "embedded:"
DATA_NAMES = ("instruct_train.jsonl", "instruct_eval.jsonl", "pref_train.jsonl", "pref_eval.jsonl",
              "sft_train.jsonl")
NAMES = ("base",) + DATA_NAMES
