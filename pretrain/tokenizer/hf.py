"""A Hugging Face tokenizer (tokenizer.json and its config files), read with `tokenizers`.

What a document becomes, as the model's own files say:

    BOS      added when the tokenizer's post-processor adds it to encoded text (Llama 3's
             TemplateProcessing does; GPT-2's and Qwen's add nothing). Where tokenizer_config.json
             sets `add_bos_token` / `add_eos_token`, what transformers' AutoTokenizer adds
             decides (its Llama class, for Llama 2 and Mistral, rebuilds the post-processor
             from the flags; its generic class keeps tokenizer.json's).
    EOS      tokenizer_config.json's (else special_tokens_map.json's) `eos_token`, else
             generation_config.json's, else config.json's `eos_token_id` (the first of a list).
             Every document ends with it once, whatever the post-processor appends.
    the text encoded with nothing added; a special token's literal text inside a document
             ("<|endoftext|>", "</s>") is text, never the special id.

Its files (`contents`): tokenizer.json, tokenizer_config.json and special_tokens_map.json where
they exist, and generation_config.json or config.json only when the EOS came from it. Padding
and truncation stored in tokenizer.json are switched off: a document is never cut.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.tokenizer.base import TextTokenizer, TokenizerError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_CONFIG = "config.json"
# The files that define a tokenizer's special tokens, in the order they are asked.
TOKEN_FILES = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
ID_FILES = (GENERATION_CONFIG, MODEL_CONFIG)
HF_FILES = (TOKENIZER_JSON, *TOKEN_FILES, *ID_FILES)
HF_DIR = "tokenizer"  # its place in a data dir or run dir


def read_hf_files(directory: Path, tokenizer_json: Path | None = None) -> dict[str, Path]:
    """The tokenizer files present in `directory` (tokenizer.json: `tokenizer_json` if given)."""
    found = {name: directory / name for name in HF_FILES if (directory / name).is_file()}
    if tokenizer_json is not None:
        found[TOKENIZER_JSON] = tokenizer_json
    return found


def _token(value: Any) -> str | None:
    """A special token as the config files write it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _text_never_special(tokenizer_json: bytes) -> str:
    """tokenizer.json, with a Unigram model that cannot spell a special token from text.

    `encode_special_tokens` keeps the added-token matcher from turning "</s>" in text into the
    special id, but a Unigram model (T5's, sentencepiece conversions) also has its special
    tokens among its pieces, score 0, the best score there is: it would segment the text "</s>"
    as that very piece. Their scores are set below every other piece's, so text spells them
    with ordinary pieces; nothing else changes (only those strings match those pieces)."""
    text = tokenizer_json.decode("utf-8")
    try:
        spec = json.loads(text)
        model = spec["model"]
        if model.get("type") != "Unigram":
            return text
        special = {t["content"] for t in spec.get("added_tokens") or [] if t.get("special")}
        lowest = min(score for _, score in model["vocab"]) - 1e6
        model["vocab"] = [[p, lowest if p in special else s] for p, s in model["vocab"]]
    except (ValueError, KeyError, TypeError):
        return text  # not ours to judge here: Tokenizer.from_str says what is wrong
    return json.dumps(spec)


class HFText(TextTokenizer):
    """tokenizer.json and its config files (see the module docstring)."""

    kind = "hf"
    stored_name = HF_DIR

    def __init__(
        self, contents: dict[str, bytes], path: str | Path, files: dict[str, Path] | None = None
    ) -> None:
        """The tokenizer defined by `contents` (standard file name -> bytes: tokenizer.json and
        whichever config files exist), loaded from `path` (`files`: where each file is on disk,
        when it is)."""
        from tokenizers import Tokenizer

        self.path = str(path)
        if TOKENIZER_JSON not in contents:
            raise TokenizerError(f"{path} has no {TOKENIZER_JSON}")
        try:
            self.tok = Tokenizer.from_str(_text_never_special(contents[TOKENIZER_JSON]))
        except Exception as exc:
            raise TokenizerError(
                f"{path}: {TOKENIZER_JSON} does not load with the tokenizers library "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self.tok.no_truncation()
        self.tok.no_padding()
        configs = {name: self._config(contents, name, path) for name in HF_FILES[1:]}
        self.eos_id, eos_from = self._eos(configs, path)
        self._head, self._tail = self._post_processor(configs, path, contents)
        self.add_bos = bool(self._head)
        # Tokens that prepare does not add are recorded when the vocabulary has them, -1 else.
        bos, pad, unk = (
            self._id_of(configs, key, path, strict=False)
            for key in ("bos_token", "pad_token", "unk_token")
        )
        self.bos_id = self._head[0] if self._head else (bos if bos is not None else -1)
        self.pad_id = pad if pad is not None else -1
        self.unk_id = unk if unk is not None else -1
        # A special token's literal text in a document stays text (after the probes above).
        self.tok.encode_special_tokens = True
        self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1
        keep = [TOKENIZER_JSON, *TOKEN_FILES, *([eos_from] if eos_from in ID_FILES else [])]
        self.contents = {name: contents[name] for name in keep if name in contents}
        self.files = tuple(files[name] for name in self.contents) if files else ()

    @classmethod
    def from_files(cls, found: dict[str, Path], path: str | Path) -> HFText:
        """From files on disk (standard name -> path)."""
        return cls({name: p.read_bytes() for name, p in found.items()}, path, found)

    @staticmethod
    def _config(contents: dict[str, bytes], name: str, path: str | Path) -> dict[str, Any]:
        if name not in contents:
            return {}
        try:
            cfg = json.loads(contents[name])
        except ValueError as exc:
            raise TokenizerError(f"{path}: {name} is not valid JSON ({exc})") from exc
        return cfg if isinstance(cfg, dict) else {}

    def _id_of(
        self, configs: dict[str, dict[str, Any]], key: str, path: str | Path, strict: bool = True
    ) -> int | None:
        """The id of special token `key` (e.g. "eos_token") as the token files name it; a name
        the vocabulary lacks raises (strict) or reads as None."""
        for name in TOKEN_FILES:
            if (token := _token(configs[name].get(key))) is not None:
                tid = self.tok.token_to_id(token)
                if tid is None and not strict:
                    return None
                if tid is None:
                    raise TokenizerError(
                        f"{path}: {name} names {key} {token!r}, which is not in its "
                        f"{TOKENIZER_JSON}; the files belong to different tokenizers"
                    )
                return int(tid)
        return None

    def _eos(self, configs: dict[str, dict[str, Any]], path: str | Path) -> tuple[int, str]:
        """(EOS id, the file that named it)."""
        for name in TOKEN_FILES:
            if _token(configs[name].get("eos_token")) is not None:
                eos = self._id_of(configs, "eos_token", path)
                assert eos is not None
                return eos, name
        for name in ID_FILES:
            value = configs[name].get("eos_token_id")
            if isinstance(value, list) and value:
                value = value[0]
            if isinstance(value, int) and not isinstance(value, bool):
                if self.tok.id_to_token(value) is None:
                    raise TokenizerError(
                        f"{path}: {name} says eos_token_id={value}, which is not an id of its "
                        f"{TOKENIZER_JSON}; the files belong to different tokenizers"
                    )
                return value, name
        raise TokenizerError(
            f"{path}: no EOS token (every prepared document ends with one): none of "
            f"{', '.join(TOKEN_FILES)} names an eos_token and none of {', '.join(ID_FILES)} "
            f"an eos_token_id; put the tokenizer's own config files next to its "
            f'{TOKENIZER_JSON} (e.g. a tokenizer_config.json with "eos_token")'
        )

    def _post_processor(
        self, configs: dict[str, dict[str, Any]], path: str | Path, contents: dict[str, bytes]
    ) -> tuple[list[int], list[int]]:
        """(ids before, ids after) the text of every document."""
        cfg = configs[TOKENIZER_CONFIG]
        if "add_bos_token" in cfg or "add_eos_token" in cfg:
            # Some of transformers' tokenizer classes (Llama's, for Llama 2 and Mistral) rebuild
            # the post-processor from these flags; the generic one keeps tokenizer.json's. Ask
            # transformers itself, so the data is framed as the exported model's tokenizer
            # frames text; the flags decide where it cannot load the files.
            found = _transformers_head(contents)
            if found is not None:
                return found, [self.eos_id]
            add = bool(cfg.get("add_bos_token"))
            bos = self._id_of(configs, "bos_token", path, strict=add)
            head = [bos] if add and bos is not None else []
            return head, [self.eos_id]
        ends = []
        for probe in ("a", "Hello world\n"):
            bare = self.tok.encode(probe, add_special_tokens=False).ids
            full = self.tok.encode(probe, add_special_tokens=True).ids
            at = next(
                (i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare),
                None,
            )
            if not bare or at is None:
                raise TokenizerError(
                    f"{path}: the post-processor of its {TOKENIZER_JSON} does more than add "
                    f"tokens around the text ({bare} became {full}); prepare cannot tell which "
                    f"ids frame a document"
                )
            ends.append((full[:at], full[at + len(bare) :]))
        head, tail = ends[0]
        if ends[1] != ends[0]:
            raise TokenizerError(
                f"{path}: the post-processor of its {TOKENIZER_JSON} adds different tokens to "
                f"different texts ({ends}); prepare cannot tell which ids frame a document"
            )
        if not tail or tail[-1] != self.eos_id:
            tail.append(self.eos_id)
        return head, tail

    def document_ends(self) -> tuple[list[int], list[int]]:
        return list(self._head), list(self._tail)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_documents(self, docs: Sequence[tuple[str, str]]) -> list[tuple[list[int], int]]:
        """As `TextTokenizer.encode_documents`, but a fine-tuning record's prompt and response
        are encoded together, as the model reads them at inference: a tokenizer that prefixes
        a space marker to every encoded text (Llama 2's, Mistral's, Unigram's) would otherwise
        start the response with a token the joined text does not have. The context is the
        head and the tokens that end within the prompt; a token straddling the boundary is
        the response's (a target of the loss)."""
        head, tail = self.document_ends()
        plain = [i for i, (prompt, _) in enumerate(docs) if not prompt]
        joint = [i for i, (prompt, _) in enumerate(docs) if prompt]
        out: list[tuple[list[int], int]] = [([], 0)] * len(docs)
        for i, ids in zip(plain, self.encode_batch([docs[i][1] for i in plain])):
            out[i] = (head + ids + tail, len(head))
        if joint:
            texts = [docs[i][0] + docs[i][1] for i in joint]
            for i, enc in zip(joint, self.tok.encode_batch(texts, add_special_tokens=False)):
                cut = len(docs[i][0])
                context = sum(1 for _, end in enc.offsets if end <= cut)
                out[i] = (head + list(enc.ids) + tail, len(head) + context)
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast: the same ids without offsets, which nothing here uses.
        return [e.ids for e in self.tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return str(self.tok.decode([int(i) for i in ids], skip_special_tokens=True))

    def pieces(self) -> list[str]:
        return [self.tok.id_to_token(i) or "" for i in range(self.vocab_size)]

    def stored_files(self) -> list[str]:
        return [f"{HF_DIR}/{name}" for name in self.contents]


@functools.cache
def _transformers_head_of(items: tuple[tuple[str, bytes], ...]) -> tuple[int, ...] | None:
    import tempfile

    try:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in items:
                (Path(tmp) / name).write_bytes(data)
            tok = AutoTokenizer.from_pretrained(tmp)
        full = tok("a", add_special_tokens=True)["input_ids"]
        bare = tok("a", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - transformers cannot read them: the flags decide
        return None
    at = next(
        (i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare), None
    )
    return tuple(full[:at]) if bare and at is not None else None


def _transformers_head(contents: dict[str, bytes]) -> list[int] | None:
    """The ids transformers' AutoTokenizer puts before encoded text, for these tokenizer files
    (None where it cannot load them). Cached: prepare's workers inherit the answer."""
    head = _transformers_head_of(tuple(sorted(contents.items())))
    return None if head is None else list(head)
