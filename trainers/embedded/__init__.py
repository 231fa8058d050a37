"""The embedded default: a tiny base model pretrained here, and a synthetic task it has not seen.

Nothing is downloaded. `embedded:` URIs name the committed assets and are built on first use when
missing (`python -m trainers.embedded build` rebuilds them explicitly):

    embedded:base                  -> assets/base/  (Llama config, safetensors, tokenizer, BUILD.json)
    embedded:instruct_train.jsonl  -> assets/data/instruct_train.jsonl  (also instruct_eval,
                                      pref_train, pref_eval, and sft_train: the RLHF
                                      pipeline's SFT demonstrations, some answers hedged)

Importing this package is cheap: torch and transformers load only when something must be built.
"""

from __future__ import annotations

import sys
from pathlib import Path

from trainers.embedded.names import ASSETS_DIR, DATA_NAMES, NAMES, SCHEME

__all__ = ["ASSETS_DIR", "DATA_NAMES", "NAMES", "SCHEME", "is_embedded", "resolve"]


def is_embedded(uri: object) -> bool:
    return isinstance(uri, str) and uri.startswith(SCHEME)


def resolve(uri: str) -> Path:
    """Map an `embedded:NAME` URI to its path under ASSETS_DIR, building the asset if missing."""
    if not is_embedded(uri):
        raise ValueError(f"not an embedded URI: {uri!r} (expected '{SCHEME}NAME')")
    name = uri[len(SCHEME):]
    if name not in NAMES:
        known = ", ".join(SCHEME + n for n in NAMES)
        raise ValueError(f"unknown embedded asset {uri!r}; known: {known}")

    from trainers.embedded import build

    part = "base" if name == "base" else "data"
    complete = build.base_complete if part == "base" else build.data_complete
    if not complete(ASSETS_DIR):
        print(f"[embedded] {uri} is missing; building it under {ASSETS_DIR} "
              f"(python -m trainers.embedded build)", file=sys.stderr, flush=True)
        build.build(ASSETS_DIR, parts=(part,))
    return ASSETS_DIR / "base" if part == "base" else ASSETS_DIR / "data" / name
