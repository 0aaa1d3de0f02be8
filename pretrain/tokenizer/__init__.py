"""Tokenizers: one interface (`TextTokenizer`) over the two kinds a model or a data dir has.

    sentencepiece   a .model file: the tokenizer prepare trains (`train_tokenizer`), or any
                    sentencepiece model (`sp.py`)
    hf              a Hugging Face tokenizer: tokenizer.json and its config files, read with the
                    `tokenizers` library (`hf.py`: which ids frame a document, where EOS comes from)

`load_tokenizer(path)` reads either from a file or a directory (a Hugging Face model dir, a data
dir, a run dir; `load.py` says where each keeps it); a data dir's is read through its manifest
(`pretrain.data.shards.data_tokenizer`). Every tokenizer has one content hash over its files
(`base.py`), the one a manifest records, so tokenizers compare by content wherever they are.
"""

from pretrain.tokenizer.base import (
    TextTokenizer,
    TokenizerError,
    content_sha256,
    describe,
    differences,
    file_sha256,
    write_atomic,
)
from pretrain.tokenizer.hf import HFText
from pretrain.tokenizer.load import (
    KINDS,
    find_tokenizer,
    load_tokenizer,
    remove_stored,
    tokenizer_from_contents,
)
from pretrain.tokenizer.sp import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SP_FILE,
    UNK_ID,
    SentencePieceText,
    TokenizerTrainingError,
    hf_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "KINDS",
    "PAD_ID",
    "SP_FILE",
    "UNK_ID",
    "HFText",
    "SentencePieceText",
    "TextTokenizer",
    "TokenizerError",
    "TokenizerTrainingError",
    "content_sha256",
    "describe",
    "differences",
    "file_sha256",
    "find_tokenizer",
    "hf_tokenizer",
    "load_tokenizer",
    "remove_stored",
    "tokenizer_from_contents",
    "train_tokenizer",
    "write_atomic",
]
