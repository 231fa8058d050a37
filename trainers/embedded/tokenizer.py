"""Train the embedded model's tokenizer offline (byte-level BPE) and save it for AutoTokenizer.

Every whitespace character is its own token, and words are never glued to the space before them.
A GPT-2 style tokenizer would give "tolo" after a newline (where a response starts) a different
token than " tolo" inside a sentence (where the pretraining corpus states the fact), and a tiny
model pretrained for minutes would not link the two. With whitespace isolated, a word is one token
wherever it stands, and a prompt's tokens are always a prefix of prompt+response's tokens.
The prompt template's section headers are added tokens, so the template costs few positions.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
TEMPLATE_TOKENS = ["### Instruction:", "### Input:", "### Response:"]
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 256


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE):
    """Train on `texts`, save a PreTrainedTokenizerFast into out_dir and return it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(TEMPLATE_TOKENS)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: a sequence starts with <s>; the pipeline appends </s> after each response.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
