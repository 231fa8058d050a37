"""How a row becomes tokens: the model's own chat template or the project's plain one.

`data.template`: auto (the tokenizer's chat template when it has one, else plain) | model | plain.

A template gives, for a normalised row (trainers.data), the training ids with labels on the
assistant's tokens only, the prompt ids that generation starts from, and a preference pair's
prompt and two responses. Training (every stage) and evaluation render through the same object,
so a model is evaluated in the format it was trained in, and served later in it.

model: the ids are exactly `tokenizer.apply_chat_template(messages)`'s, and a prompt is exactly
`apply_chat_template(history, add_generation_prompt=True)`'s. An instruction row is the one-turn
conversation user: instruction (+ blank line + input), assistant: output; a preference row's text
prompt is one user turn. Which tokens are the assistant's follows from rendering prefixes of the
conversation: turn i is what `render(messages[:i+1])` adds to
`render(messages[:i], add_generation_prompt=True)`, found by character offsets in the one
tokenization of the whole. This needs a template that renders a prefix as the start of the whole
(ChatML, Llama-3, Mistral, Gemma, ... do); one that rewrites earlier turns once later ones follow
(e.g. drops past reasoning) is refused naming the row. A turn trains from its content through its
end-of-turn token (the turn's last special token); what the template writes after it (ChatML's
newline) is not trained: generation has stopped by then.

plain: the project's "### Instruction:/### Response:" prompt for instruction rows and
"### User:/### Assistant:" headers for chat; eos closes each assistant turn.

Both templates also work on batches of rows (`encode_many`, `prompt_many`, `pair_many`): the
same texts rendered row by row, then one tokenizer call for the batch (a fast tokenizer encodes a
list in parallel, and a call's own overhead is paid once). The result of each row is exactly the
one-row method's, or the TemplateError that method would raise (tests/test_prepared.py compares
them token for token); the caller raises the first in row order.
"""

from __future__ import annotations

import hashlib

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)

PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
PROMPT_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLE_HEADER = "### {role}:\n"


class TemplateError(ValueError):
    """A row the template cannot render; trainers.data prefixes the row's `source:`."""


def chat_template(tokenizer, setting: str = "auto"):
    """The template `data.template=setting` means for this tokenizer (a template passes through)."""
    if isinstance(setting, (PlainTemplate, ModelTemplate)):
        return setting
    from trainers.config import DATA_TEMPLATES, ConfigError

    if setting not in DATA_TEMPLATES:
        raise ConfigError([("data.template", f"must be one of {', '.join(DATA_TEMPLATES)}, got {setting!r}")])
    has_template = isinstance(getattr(tokenizer, "chat_template", None), str)
    if setting == "model" and not has_template:
        raise ConfigError([("data.template", "model: the tokenizer has no chat template "
                                             "(use data.template=plain, or auto)")])
    if setting == "model" or (setting == "auto" and has_template):
        return ModelTemplate(tokenizer)
    return PlainTemplate(tokenizer)


def load_chat_tokenizer(cfg):
    """The trial's tokenizer, for the template `data.template` resolves to. With the model's
    template, eos becomes the template's end-of-turn token when they differ (a base model's
    `<|endoftext|>` under ChatML's `<|im_end|>`): training teaches the model to end a turn there,
    so generation (evaluation, RL rollouts) stops there, and the saved tokenizer says so."""
    from trainers.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    template = chat_template(tokenizer, cfg.data.template)
    end = template.end_of_turn_id() if isinstance(template, ModelTemplate) else None
    if end is not None and end != tokenizer.eos_token_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(end)
    return tokenizer


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def format_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return PROMPT_TEMPLATE_WITH_INPUT.format(instruction=instruction, input=input_text)
    return PROMPT_TEMPLATE.format(instruction=instruction)


def render_chat_prompt(messages: list[dict]) -> str:
    """Plain: conversation so far plus the header that asks for the assistant's next turn."""
    text = "".join(CHAT_ROLE_HEADER.format(role=m["role"].capitalize()) + m["content"] + "\n\n" for m in messages)
    return text + CHAT_ROLE_HEADER.format(role="Assistant")


def conversation(row: dict, fmt: str) -> list[dict]:
    """A normalised instruction or chat row as messages (instruction: one user/assistant turn)."""
    if fmt == "chat":
        return row["messages"]
    if fmt == "instruction":
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    raise ValueError(f"no conversation for format {fmt!r}")


def preference_history(row: dict) -> list[dict]:
    """A preference row's prompt as the messages before the response."""
    prompt = row["prompt"]
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


class PlainTemplate:
    name = "plain"
    sha256 = _sha256(PROMPT_TEMPLATE + PROMPT_TEMPLATE_WITH_INPUT + CHAT_ROLE_HEADER)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._recording: list[str] | None = None  # texts asked for while a batch is being surveyed
        self._known: dict[str, list[int]] = {}  # their ids, from one batched tokenizer call

    def _ids(self, text: str) -> list[int]:
        if self._recording is not None:
            self._recording.append(text)
            return []
        known = self._known.get(text)
        if known is not None:
            return list(known)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _many(self, render, rows: list) -> list:
        """`render(row)` for each row with its texts tokenized in one call: a first run over the
        rows records the texts they ask for (the plain template's pieces are fixed by the row,
        not by token ids), the second runs on their ids."""
        self._recording = []
        try:
            for row in rows:
                render(row)
            texts = list(dict.fromkeys(self._recording))
        finally:
            self._recording = None
        if texts:
            self._known = dict(zip(texts, self.tokenizer(texts, add_special_tokens=False)["input_ids"]))
        try:
            return [_attempt(render, row) for row in rows]
        finally:
            self._known = {}

    def encode_many(self, rows: list[dict], fmt: str, with_prompts: bool = False) -> list:
        """Per row: (ids, labels, (prompt ids, answer) or None), or its TemplateError."""
        return self._many(lambda row: (*self.encode(row, fmt), self.prompt(row, fmt) if with_prompts else None), rows)

    def prompt_many(self, rows: list[dict], fmt: str) -> list:
        return self._many(lambda row: self.prompt(row, fmt), rows)

    def pair_many(self, rows: list[dict]) -> list:
        return self._many(self.pair, rows)

    def _bos(self) -> list[int]:
        tokenizer = self.tokenizer
        if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
            return [tokenizer.bos_token_id]
        return []

    def _chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Piecewise (as generation sees it): role header, then content; assistant turns train."""
        eos = self.tokenizer.eos_token_id
        ids = self._bos()
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            header = self._ids(CHAT_ROLE_HEADER.format(role=message["role"].capitalize()))
            trains = message["role"] == "assistant"
            if trains:
                body = self._ids(message["content"]) + [eos]
                tail = self._ids("\n\n") if i < len(messages) - 1 else []
            else:
                body, tail = self._ids(message["content"] + "\n\n"), []
            ids += header + body + tail
            labels += [IGNORE_INDEX] * len(header) + (body if trains else [IGNORE_INDEX] * len(body))
            labels += [IGNORE_INDEX] * len(tail)
        return ids, labels

    def encode(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        """Token ids and labels: prompt tokens masked, response tokens + eos trained."""
        if fmt == "chat":
            return self._chat(row["messages"])
        prompt = self._bos() + self._ids(format_prompt(row["instruction"], row["input"]))
        answer = self._ids(row["output"]) + [self.tokenizer.eos_token_id]
        return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer

    def prompt(self, row: dict, fmt: str) -> tuple[list[int], str]:
        """Prompt ids for generation and the expected answer."""
        if fmt == "instruction":
            return self._bos() + self._ids(format_prompt(row["instruction"], row["input"])), row["output"]
        if fmt == "preference":
            return self._bos() + self._ids(self._preference_text(row)), row["chosen"]
        messages = row["messages"]
        history = self._chat(messages[:-1])[0] if len(messages) > 1 else self._bos()
        return history + self._ids(CHAT_ROLE_HEADER.format(role="Assistant")), messages[-1]["content"]

    def _preference_text(self, row: dict) -> str:
        prompt = row["prompt"]
        return render_chat_prompt(prompt) if isinstance(prompt, list) else format_prompt(prompt)

    def pair(self, row: dict) -> tuple[list[int], tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        """(prompt ids, (chosen ids, labels), (rejected ids, labels)): each response + eos trained."""
        prompt = self._bos() + self._ids(self._preference_text(row))
        sides = [self._ids(row[key]) + [self.tokenizer.eos_token_id] for key in ("chosen", "rejected")]
        return prompt, (sides[0], list(sides[0])), (sides[1], list(sides[1]))


class ModelTemplate:
    name = "model"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sha256 = _sha256(tokenizer.chat_template)
        special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        self.special_ids = special | set(tokenizer.all_special_ids)

    def render(self, messages: list[dict], generation: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # a chat template is the model author's code: any failure is its complaint
            raise TemplateError(f"the model's chat template (data.template=model) cannot render this "
                                f"conversation: {type(err).__name__}: {err}") from None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_many(self, conversations: list[list[dict]], generation: bool = False) -> list:
        """render() of each conversation, in one template call (its per-call costs paid once); a
        batch the template refuses is rendered one by one, so each gets its own text or error."""
        if conversations:
            try:
                return list(self.tokenizer.apply_chat_template(conversations, tokenize=False,
                                                               add_generation_prompt=generation))
            except Exception:  # some conversation of the batch: found below, one by one
                pass
        return [_attempt(self.render, messages, generation) for messages in conversations]

    def _assistant_spans(self, messages: list[dict], full: str, render=None) -> list[tuple[int, int]]:
        """Character spans of the assistant turns' text in `full` (the whole conversation).
        `render(i, generation)` renders messages[:i] (default: self.render)."""
        render = render or (lambda i, generation: self.render(messages[:i], generation=generation))
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(i, True)
            through = full if i == len(messages) - 1 else render(i + 1, False)
            if not (through.startswith(before) and full.startswith(through)):
                raise TemplateError(
                    f"the model's chat template renders the conversation before turn {i} differently once later "
                    "turns follow (it rewrites earlier turns), so the assistant's tokens cannot be told apart; "
                    "use data.template=plain or one-turn rows")
            spans.append((len(before), len(through)))
        return spans

    def _rendered_many(self, conversations: list[list[dict]]) -> list:
        """Per conversation: (full text, assistant spans, generation prompt before its last turn)
        or its TemplateError; every render of the batch in three template calls (whole
        conversations, generation prompts, earlier turns)."""
        fulls = self.render_many(conversations)
        prefixes = {True: [], False: []}  # generation -> [(row, length)]
        for r, messages in enumerate(conversations):
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    prefixes[True].append((r, i))
                    if i < len(messages) - 1:
                        prefixes[False].append((r, i + 1))
        texts = {}
        for generation, wanted in prefixes.items():
            rendered = self.render_many([conversations[r][:i] for r, i in wanted], generation)
            texts.update(((r, i, generation), text) for (r, i), text in zip(wanted, rendered))

        def lookup(r: int):
            def render(i: int, generation: bool) -> str:
                return _unwrap(texts[r, i, generation])
            return render

        results = []
        for r, (messages, full) in enumerate(zip(conversations, fulls)):
            try:
                spans = self._assistant_spans(messages, _unwrap(full), lookup(r))
                results.append((full, spans, _unwrap(texts[r, len(messages) - 1, True])))
            except TemplateError as err:
                results.append(err)
        return results

    def _labels(self, ids: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            # Overlap, not containment: a normalizer or a merge can join the header's last character
            # to the content's first token, which is still the assistant's to produce.
            inside = [j for j, (first, last) in enumerate(offsets) if first < end and last > start]
            content = next((j for j in inside if ids[j] not in self.special_ids), None)
            if content is None:
                continue
            ends = [j for j in inside if j > content and ids[j] in self.special_ids]
            for j in inside:
                if j <= (ends[-1] if ends else inside[-1]):
                    labels[j] = ids[j]
        return labels

    def _encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        full = self.render(messages)
        spans = self._assistant_spans(messages, full)
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        return ids, self._labels(ids, encoding["offset_mapping"], spans)

    def _tokenized(self, texts: list[str]) -> tuple[list[list[int]], list[list]]:
        """(ids, offsets) of each text, from one tokenizer call."""
        if not texts:
            return [], []
        encoding = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return encoding["input_ids"], encoding["offset_mapping"]

    def encode_many(self, rows: list[dict], fmt: str, with_prompts: bool = False) -> list:
        """Per row: (ids, labels, (prompt ids, answer) or None), or its TemplateError. A row's
        prompt is the generation prompt rendered before its last (assistant) turn: the same text
        `prompt` renders, rendered once."""
        conversations = [conversation(row, fmt) for row in rows]
        rendered = [r if isinstance(r, TemplateError) else (*r, messages[-1]["content"])
                    for r, messages in zip(self._rendered_many(conversations), conversations)]
        ok = [r for r in rendered if not isinstance(r, TemplateError)]
        ids, offsets = self._tokenized([r[0] for r in ok])
        prompts = self._tokenized([r[2] for r in ok])[0] if with_prompts else [None] * len(ok)
        done = iter(zip(ok, ids, offsets, prompts))
        results = []
        for r in rendered:
            if isinstance(r, TemplateError):
                results.append(r)
                continue
            (_, spans, _, answer), row_ids, row_offsets, prompt = next(done)
            results.append((row_ids, self._labels(row_ids, row_offsets, spans),
                            (prompt, answer) if with_prompts else None))
        return results

    def encode(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        return self._encode(conversation(row, fmt))

    def end_of_turn_id(self) -> int | None:
        """The special token that closes an assistant turn (None: the template writes none, or
        cannot render a one-turn conversation, which validation reports on the rows)."""
        try:
            ids, labels = self._encode([{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}])
        except TemplateError:
            return None
        trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
        return trained[-1] if trained and trained[-1] in self.special_ids else None

    def _prompt_text(self, row: dict, fmt: str) -> tuple[str, str]:
        if fmt == "preference":
            return self.render(preference_history(row), generation=True), row["chosen"]
        messages = conversation(row, fmt)
        return self.render(messages[:-1], generation=True), messages[-1]["content"]

    def prompt(self, row: dict, fmt: str) -> tuple[list[int], str]:
        text, answer = self._prompt_text(row, fmt)
        return self._ids(text), answer

    def prompt_many(self, rows: list[dict], fmt: str) -> list:
        rendered = [_attempt(self._prompt_text, row, fmt) for row in rows]
        ok = [r for r in rendered if not isinstance(r, TemplateError)]
        ids = iter(self._tokenized([text for text, _ in ok])[0])
        return [r if isinstance(r, TemplateError) else (next(ids), r[1]) for r in rendered]

    def _pair_texts(self, row: dict) -> tuple[str, list]:
        """The prompt's text, and per side (chosen, rejected) its conversation's text and spans."""
        history = preference_history(row)
        prompt, sides = self.render(history, generation=True), []
        for key in ("chosen", "rejected"):
            messages = history + [{"role": "assistant", "content": row[key]}]
            full = self.render(messages)
            sides.append((full, self._assistant_spans(messages, full)))
        return prompt, sides

    def _pair_from(self, prompt: list[int], sides: list) -> tuple:
        """(prompt, chosen, rejected) from the tokenized prompt and sides ((ids, offsets, spans))."""
        out = []
        for key, (ids, offsets, spans) in zip(("chosen", "rejected"), sides):
            labels = self._labels(ids, offsets, spans)
            if ids[:len(prompt)] != prompt:
                raise TemplateError(f"the {key} conversation does not start with the prompt's tokens under the "
                                    "model's chat template; use data.template=plain")
            out.append((ids[len(prompt):], labels[len(prompt):]))
        return prompt, out[0], out[1]

    def pair(self, row: dict) -> tuple[list[int], tuple[list[int], list[int]], tuple[list[int], list[int]]]:
        prompt_text, sides = self._pair_texts(row)
        prompt = self._ids(prompt_text)
        tokenized = []
        for full, spans in sides:
            encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            tokenized.append((encoding["input_ids"], encoding["offset_mapping"], spans))
        return self._pair_from(prompt, tokenized)

    def pair_many(self, rows: list[dict]) -> list:
        rendered = [_attempt(self._pair_texts, row) for row in rows]
        ok = [r for r in rendered if not isinstance(r, TemplateError)]
        prompts = iter(self._tokenized([text for text, _ in ok])[0])
        ids, offsets = self._tokenized([full for _, sides in ok for full, _ in sides])
        spans = [row_spans for _, sides in ok for _, row_spans in sides]
        sides = iter(zip(ids, offsets, spans))
        results = []
        for r in rendered:
            if isinstance(r, TemplateError):
                results.append(r)
                continue
            prompt, pair_sides = next(prompts), [next(sides), next(sides)]
            results.append(_attempt(self._pair_from, prompt, pair_sides))
        return results


def _unwrap(result):
    if isinstance(result, TemplateError):
        raise result
    return result


def _attempt(fn, *args):
    """fn(*args), or the TemplateError it raised (batched methods report each row's own)."""
    try:
        return fn(*args)
    except TemplateError as err:
        return err
