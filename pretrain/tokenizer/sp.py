"""Sentencepiece: training the project's own tokenizer, and reading any sentencepiece model.

The trained tokenizer is byte-level lossless for UTF-8 text: normalisation is the identity,
whitespace is kept as is (indentation matters in code), no dummy prefix is added and unknown
characters fall back to their UTF-8 bytes (`<0x..>` pieces). So `decode(encode(text)) == text`
for any text that does not itself contain sentencepiece's space marker U+2581 ("▁"), which
decodes as a space.

Special ids are fixed so that every prepared dataset agrees on them: UNK=0, BOS=1, EOS=2, PAD=3.
Prepare appends EOS after each document; BOS is never added.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

from pretrain.tokenizer.base import TextTokenizer, TokenizerError, write_atomic

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SP_FILE = "tokenizer.model"  # its standard name, and its place in a data dir or run dir


class TokenizerTrainingError(ValueError):
    """Raised with a message that says what to change when sentencepiece refuses to train."""


def train_tokenizer(
    docs: Iterable[str],
    vocab_size: int,
    out_path: str | Path,
    *,
    num_threads: int = 1,
    max_sentence_bytes: int = 4096,
) -> Path:
    """Train a byte-fallback BPE model on `docs` and write it atomically to `out_path`.

    `docs` should already be a bounded, deterministic sample: the model is a pure function of the
    sequence of strings (no sampling or shuffling inside sentencepiece). Each string is one
    training "sentence"; strings longer than `max_sentence_bytes` UTF-8 bytes are ignored by
    sentencepiece, so callers should cut documents into pieces (prepare cuts at line ends).
    """
    out_path = Path(out_path)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(docs),
            model_writer=writer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            # Identity normalisation + kept whitespace: the ids decode back to the exact text.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            # The caller bounds and orders the sample; sentencepiece must not resample it.
            input_sentence_size=0,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_bytes,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        raise _rephrase(exc, vocab_size) from exc
    write_atomic(out_path, writer.getvalue())
    return out_path


def _rephrase(exc: RuntimeError, vocab_size: int) -> Exception:
    msg = str(exc)
    if m := re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg):
        return TokenizerTrainingError(
            f"tokenizer.vocab_size={vocab_size} is too large for this corpus: its training sample "
            f"supports at most ~{m.group(1)} pieces. Use a smaller tokenizer.vocab_size, more "
            f"text, or a larger tokenizer.sample_bytes."
        )
    if m := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg):
        return TokenizerTrainingError(
            f"tokenizer.vocab_size={vocab_size} is too small for this corpus: it needs at least "
            f"{m.group(2)} (the 256 byte pieces, special ids and every frequent character) plus "
            f"room for merges; use e.g. tokenizer.vocab_size={max(512, 2 * int(m.group(2)))}."
        )
    if "not found" in msg.lower() or "no sentence" in msg.lower() or "empty" in msg.lower():
        return TokenizerTrainingError(
            f"sentencepiece found no usable training text ({msg}); check the input files."
        )
    return TokenizerTrainingError(f"sentencepiece could not train the tokenizer: {msg}")


class SentencePieceText(TextTokenizer):
    """A sentencepiece model (one .model file). Nothing is added to encoded text; prepared
    documents are its ids + EOS."""

    kind = "sentencepiece"
    stored_name = SP_FILE

    def __init__(self, path: str | Path, data: bytes | None = None) -> None:
        """The model at `path`, or in `data` (its bytes, read from `path` elsewhere)."""
        self.path = str(path)
        if data is None:
            if not Path(path).is_file():
                raise TokenizerError(
                    f"tokenizer {path} does not exist; run `python -m pretrain.prepare` (it writes "
                    f"the tokenizer next to the shards) or pass the right path."
                )
            data = Path(path).read_bytes()
            self.files = (Path(path),)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as exc:
            raise TokenizerError(
                f"{path} is not a readable sentencepiece model ({type(exc).__name__}: {exc}); "
                f"pass a sentencepiece .model, a tokenizer.json or a Hugging Face model dir."
            ) from exc
        self.contents = {SP_FILE: data}
        self.vocab_size = int(self.sp.get_piece_size())
        self.eos_id, self.bos_id = int(self.sp.eos_id()), int(self.sp.bos_id())
        self.pad_id, self.unk_id = int(self.sp.pad_id()), int(self.sp.unk_id())
        if self.eos_id < 0:
            raise TokenizerError(
                f"the sentencepiece model {path} has no EOS id (every prepared document ends "
                f"with one): drop tokenizer.path to train one, or pass another model."
            )

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int] | Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return str(self.sp.decode([int(i) for i in ids]))

    def pieces(self) -> list[str]:
        return [self.sp.id_to_piece(i) for i in range(self.vocab_size)]

    def stored_files(self) -> list[str]:
        return [SP_FILE]


def hf_tokenizer(sp_model: str | Path, model_max_length: int) -> PreTrainedTokenizerFast:
    """A fast HF tokenizer that gives sentencepiece model `sp_model`'s ids on any text.

    Valid for models trained as `train_tokenizer` trains them (BPE, byte fallback, identity
    normalisation, no dummy prefix, whitespace kept): the pieces become a tokenizers BPE whose
    merges are regenerated from the vocabulary, with a Metaspace pre-tokenizer that neither
    prepends nor splits. No post-processor: nothing is added to encoded text (our data has no
    BOS), and `split_special_tokens=True` makes text that spells "</s>" encode as text, as
    sentencepiece does."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    specials = [sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    # Byte pieces (<0x41>) are reached through byte fallback only, never by merging text.
    no_merge = specials + [sp.id_to_piece(i) for i in range(n) if sp.is_byte(i)]
    raw = RawTokenizer(
        BPE(
            vocab=vocab,
            merges=generate_merges(vocab, skip_tokens=no_merge),
            unk_token=sp.id_to_piece(sp.unk_id()),
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    raw.normalizer = None
    raw.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=False
    )
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    piece = sp.id_to_piece
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token=piece(sp.unk_id()),
        bos_token=piece(
            sp.eos_id()
        ),  # every document follows an EOS: a BOS-prefixing tool sees one
        eos_token=piece(sp.eos_id()),
        pad_token=piece(sp.pad_id()) if sp.pad_id() >= 0 else None,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
