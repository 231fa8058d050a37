"""Reload any method's saved artifact onto a base model: `load_trained(base_model, artifact_dir)`.

    base = load_base_model(cfg, device)            # same model and precision as in training
    model = load_trained(base, "runs/<trial>/adapter")

PEFT adapters (adapter_config.json) go through `peft.PeftModel.from_pretrained`; this project's
own adapters (method_config.json) through their method's `load`; a full model directory
(config.json) through the model class's `from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainers.methods.base import METHOD_CONFIG_FILE


def load_trained(base_model, artifact_dir):
    """The trained model for inference: `base_model` with the artifact in `artifact_dir` applied."""
    from trainers.methods.base import METHODS

    artifact_dir = Path(artifact_dir)
    if (artifact_dir / METHOD_CONFIG_FILE).is_file():
        name = json.loads((artifact_dir / METHOD_CONFIG_FILE).read_text()).get("method")
        if name not in METHODS:
            raise ValueError(f"{artifact_dir / METHOD_CONFIG_FILE}: unknown method {name!r}; "
                             f"known: {', '.join(sorted(METHODS))}")
        return METHODS[name].load(base_model, artifact_dir)
    if (artifact_dir / "adapter_config.json").is_file():
        import peft

        return peft.PeftModel.from_pretrained(base_model, str(artifact_dir))
    if (artifact_dir / "config.json").is_file():
        return METHODS["full"].load(base_model, artifact_dir)
    raise FileNotFoundError(f"{artifact_dir}: no {METHOD_CONFIG_FILE}, adapter_config.json or config.json; "
                            "not a saved adapter or model")
