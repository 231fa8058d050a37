"""Train the embedded model's tokenizer offline (byte-level BPE) and save it for AutoTokenizer.

Every word carries the space before it ("Ġtolo"), including a word that starts a line or the
text: the normalizer puts a space after each newline that is followed by text, and in front of
the whole text; the decoder takes exactly those spaces out again, so decode(encode(x)) == x.
Why: a GPT-2 style tokenizer gives "tolo" after a newline (where a response starts) a different
token than " tolo" inside a sentence (where the corpus states the fact), and a tiny model
pretrained for minutes would not link the two. Here a word is one token wherever it stands, and
a prompt ending in a newline tokenizes to a prefix of prompt + response.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2
VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 256


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = VOCAB_SIZE):
    """Train on `texts`, save a PreTrainedTokenizerFast into out_dir and return it."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence(
        [normalizers.Replace(Regex(r"\n(?=[^\n])"), "\n "), normalizers.Prepend(" ")]
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace("\n ", "\n"), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
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
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
