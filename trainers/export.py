"""A trained trial as a standalone causal LM for serving: `serving_model(cfg, artifact_dir, merge)`.

Loads what the trial trained from (its base model, or for a pipeline stage the upstream policy
merged), applies its saved artifact (trainers.methods.load_trained) and, with
`merge`, folds a PEFT adapter into the weights (`merge_and_unload`), so the result is a plain
transformers model that any server loads. A method whose artifact cannot merge (prompt learning:
virtual tokens) stays a PEFT model (base + adapter); one that is neither a transformers model nor a
PEFT model after loading (bottleneck adapters insert this project's modules) is refused.

The generation settings reproduce the trial's evaluation (trainers/evaluate.py): greedy, at most
data.max_new_tokens, the prompt rendered with the same template and tokenized the same way. A
request is the text the template's `{prompt}` slot holds; `request_text` derives it from a rendered
eval prompt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from trainers.config import VARLEN_ATTENTION, ExperimentConfig

PROMPT_SLOT = "{prompt}"
_SENTINEL = "\x00PROMPT\x00"  # stands for the request while a template is rendered


class NotServable(ValueError):
    """The trial's artifact cannot become a served text-generation model (the reason says why)."""


@dataclass
class ServingModel:
    model: object  # a transformers PreTrainedModel, or a peft.PeftModel (base + adapter)
    tokenizer: object
    merged: bool  # True: plain transformers weights (merged adapter, full or in-place tensors)
    prompt_template: str  # str.format template with one `{prompt}` slot
    generate: dict = field(default_factory=dict)  # pipeline call kwargs that reproduce the evaluation
    note: str = ""  # why a merge was not done, when it was asked for


def data_format(cfg: ExperimentConfig) -> str:
    """The trial's data.format, read from its eval (or train) data on `auto`."""
    from trainers.data import load_rows

    if cfg.data.format != "auto":
        return cfg.data.format
    fmt, _, _ = load_rows(cfg.data.eval_file or cfg.data.train_file, "auto", 1, cfg.data.columns.mapping())
    return fmt


def prompt_template(template, fmt: str) -> str:
    """The prompt of a one-turn request as the trial's chat template (trainers.templates: the
    model's or the plain one) renders an eval prompt of format `fmt`, with `{prompt}` where the
    request goes (other braces escaped for str.format)."""
    from trainers.templates import ModelTemplate, format_prompt, render_chat_prompt

    if fmt not in ("instruction", "chat", "preference"):
        raise NotServable(f"data format {fmt!r} has no text-generation prompt to serve")
    if isinstance(template, ModelTemplate):
        rendered = template.render([{"role": "user", "content": _SENTINEL}], generation=True)
    elif fmt == "chat":
        rendered = render_chat_prompt([{"role": "user", "content": _SENTINEL}])
    else:  # the plain template renders an instruction, and a preference row's text prompt, alike
        rendered = format_prompt(_SENTINEL)
    if rendered.count(_SENTINEL) != 1:
        raise NotServable(f"the {template.name} chat template does not render a request exactly once")
    return rendered.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, PROMPT_SLOT)


def request_text(rendered_prompt: str, template: str) -> str:
    """What to send to the served model so that `template` renders `rendered_prompt` (an eval
    prompt of the trial's data): the part between the template's fixed text before and after."""
    prefix, suffix = (part.format() for part in template.split(PROMPT_SLOT))
    if not (rendered_prompt.startswith(prefix) and rendered_prompt.endswith(suffix)):
        raise ValueError(f"prompt {rendered_prompt[:60]!r}... is not rendered by the template {template[:60]!r}...")
    return rendered_prompt[len(prefix):len(rendered_prompt) - len(suffix)]


def _add_special_tokens(tokenizer, template, prompt_text: str, fmt: str) -> bool:
    """The tokenizer flag under which a pipeline's whole-text tokenization of a rendered request
    gives the ids the trial's evaluation generated from (trainers.data.prompts_with_answers)."""
    from trainers.data import prompts_with_answers

    text = "What is the probe?"
    row = {"instruction": {"instruction": text, "input": "", "output": "-"},
           "chat": {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "-"}]},
           "preference": {"prompt": text, "chosen": "-", "rejected": "-"}}[fmt]
    (evaluated,), _ = prompts_with_answers(tokenizer, [row], ["probe"], fmt, 10**6, "error", template)
    for flag in (False, True):
        if tokenizer(prompt_text.format(prompt=text), add_special_tokens=flag)["input_ids"] == evaluated.prompt_ids:
            return flag
    raise NotServable(f"{fmt} prompts: the tokenizer encodes a whole rendered prompt differently from the "
                      "trial's evaluation, so a served model would not see the prompts it was evaluated on")


def _for_serving(cfg: ExperimentConfig) -> ExperimentConfig:
    """The trial's config as the promoting (CPU) process loads it: a 4/8-bit base at its compute
    dtype, since merging into quantized weights would round the adapter away and a served model is
    stored unquantized; no Liger kernels (GPU-only, and a served model is plain transformers); the
    trial's model.attn_implementation, except flash_attention_2 (CUDA only), which computes the
    same attention as sdpa, so sdpa serves it here."""
    train = dataclasses.replace(cfg.train, liger=False)
    if cfg.model.attn_implementation in VARLEN_ATTENTION:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation="sdpa"))
    if not cfg.precision.quantized:
        return dataclasses.replace(cfg, train=train)
    precision = dataclasses.replace(cfg.precision, name=cfg.precision.compute_dtype, double_quant=False)
    return dataclasses.replace(cfg, precision=precision, train=train)


def _start_model(cfg: ExperimentConfig):
    """What the trial trained from (trainers.recipes.inputs.load_start: the base, or its upstream
    stage's policy merged), on CPU."""
    import torch

    from trainers.config import ConfigError
    from trainers.recipes.inputs import load_start

    try:
        return load_start(_for_serving(cfg), torch.device("cpu"))
    except (ConfigError, OSError, ValueError) as err:
        raise NotServable(f"cannot load what the trial started from: {err}") from None


def check_servable(cfg: ExperimentConfig) -> str:
    """The trial's data format, once its method is known to give a servable model (NotServable if not)."""
    from trainers.methods import METHODS
    from trainers.methods.base import TensorsMethodSpec

    name = cfg.method.name
    if name not in METHODS:
        raise NotServable(f"method {name!r} is not in the method registry")
    if isinstance(METHODS[name], TensorsMethodSpec) and not METHODS[name].mergeable:
        raise NotServable(f"method {name}: its trained modules are this project's own, not part of a "
                          "transformers architecture or PEFT, so no server could load them; only its "
                          "adapter artifact (trainers.methods.load_trained) reproduces the trial")
    return data_format(cfg)


def serving_model(cfg: ExperimentConfig, artifact_dir, merge: bool = True) -> ServingModel:
    """The trial's trained model on CPU, merged when `merge` and its method can merge."""
    import peft

    from trainers.generation import is_prefix_tuned
    from trainers.methods import METHODS, load_trained
    from trainers.templates import chat_template, load_chat_tokenizer

    fmt = check_servable(cfg)
    tokenizer = load_chat_tokenizer(cfg)  # eos: the end-of-turn token under a model's chat template
    template = chat_template(tokenizer, cfg.data.template)
    prompt_text = prompt_template(template, fmt)
    name, mergeable = cfg.method.name, METHODS[cfg.method.name].mergeable
    model = load_trained(_start_model(cfg), artifact_dir)
    is_peft = isinstance(model, peft.PeftModel)
    note = ""
    if is_peft and merge and mergeable:
        model = model.merge_and_unload()
    elif is_peft and merge:
        note = (f"method {name} cannot merge into the weights (it adds virtual tokens to every input): "
                "registered as base + adapter")
    model.requires_grad_(False)
    model.eval()
    merged = not isinstance(model, peft.PeftModel)
    greedy = _make_greedy(model if merged else model.get_base_model(), tokenizer, cfg)
    generate = {**greedy, "add_special_tokens": _add_special_tokens(tokenizer, template, prompt_text, fmt)}
    if is_prefix_tuned(model):
        generate["use_cache"] = False  # as evaluate.generate_answers decodes them, for the same reason
    return ServingModel(model=model, tokenizer=tokenizer, merged=merged,
                        prompt_template=prompt_text, generate=generate, note=note)


def _make_greedy(model, tokenizer, cfg: ExperimentConfig) -> dict:
    """Generation defaults of a served model: those of the trial's evaluation (greedy, its
    max_new_tokens, stopping at the tokenizer's eos). Returns the ones a pipeline call takes."""
    model.config.use_cache = True  # training turned the KV cache off; evaluation generated with it
    greedy = {"do_sample": False, "max_new_tokens": cfg.data.max_new_tokens}
    for key in ("temperature", "top_p", "top_k"):  # sampling knobs a base's own generation config may set
        setattr(model.generation_config, key, None)
    model.generation_config.update(**greedy, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return greedy


def save_base(cfg: ExperimentConfig, tokenizer, out_dir) -> None:
    """What the trial started from, untouched by its method, as a transformers directory."""
    model = _start_model(cfg)
    _make_greedy(model, tokenizer, cfg)
    model.save_pretrained(str(out_dir), safe_serialization=True)
