"""Tokenizers: train, load, encode/decode, special tokens, token bytes, streaming.

Two backends share one interface (`TokenizerBase`): `Tokenizer`, a SentencePiece model
(`tokenizer.model`, trained here or loaded), and `jaxllm.tokenizer_json.JsonTokenizer`, a
Hugging Face byte-level BPE `tokenizer.json` (GPT-2, Llama 3, Qwen2, Mistral-Nemo style).
`Tokenizer.load(path)` picks the backend by file: a `.model` file is SentencePiece, a `.json`
file is tokenizer.json, and a directory holds `tokenizer.model` (preferred) or `tokenizer.json`.
Everything else in jaxllm sees only the interface: ids, special tokens, and each id's exact
output bytes (`token_bytes`), which decoding, streaming, stop strings and constraints all read.

Two promises hold everything else up:

* exact round trip: `decode(encode(s)) == s` for any text. Tokenizers trained here use
  identity normalization, keep every whitespace, and fall back to bytes for characters
  outside the vocabulary, so nothing is ever UNK or rewritten. SentencePiece writes a
  space as "▁" and reads a typed "▁" as a space; the character itself is
  encoded as its three byte pieces instead, so it survives too.
* text is text: a user typing "<s>" or a chat marker gets those characters, never the
  special id, unless the caller asks for special tokens to be parsed
  (`encode(..., parse_special=True)`). Special tokens are SentencePiece *control*
  symbols, which SentencePiece itself never matches in raw text.

(The tokenizer.json backend keeps both promises too, with one limit it states: a file whose
normalizer rewrites text, as Qwen2's NFC does, round-trips only text already in that form.)
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from jaxllm.errors import TokenizerError

# Pieces matched as plain text before the learned vocabulary: newlines and tabs are
# everywhere in code but never inside a SentencePiece training "sentence" (one line).
WHITESPACE_SYMBOLS = ("\n", "\t", "\r")
DEFAULT_SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
META_SPACE = "\u2581"  # SentencePiece's symbol for a space inside pieces


# The files a tokenizer is saved as, in every backend; a directory holds one backend's files.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
CONFIG_FILE, CHAT_TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"


def load_tokenizer(path: str | os.PathLike) -> "TokenizerBase":
    """A tokenizer from a file or a model directory, the backend chosen by file.

    A `.json` file is a Hugging Face tokenizer.json (`JsonTokenizer`, which reads
    `tokenizer_config.json` beside it for BOS/EOS/PAD); any other file is a SentencePiece model
    (`Tokenizer`). A directory gives its `tokenizer.model` when it has one, else its
    `tokenizer.json`. Errors are one-line `TokenizerError`s.

    Either way the model's chat format comes along (`chat_template`, None when there is none):
    a `chat_template.jinja` beside the file, else tokenizer_config.json's "chat_template". A
    SentencePiece model reads those only when it is a directory's `tokenizer.model` (as Hugging
    Face directories of Llama 2, Mistral and Gemma ship it), and keeps that tokenizer_config.json
    to save it back.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.model").exists() and (path / "tokenizer.json").exists():
            path = path / "tokenizer.json"
        elif not (path / "tokenizer.model").exists():
            raise TokenizerError(f"tokenizer not found: {path} holds neither tokenizer.model nor tokenizer.json")
        else:
            path = path / "tokenizer.model"
    if path.suffix == ".json":
        from jaxllm.tokenizer_json import JsonTokenizer

        tok = JsonTokenizer.from_file(path)
    else:
        tok = Tokenizer.from_file(path)
    template_file = path.parent / CHAT_TEMPLATE_FILE
    if template_file.is_file() and (path.suffix == ".json" or path.name == "tokenizer.model"):
        try:
            tok.chat_template = template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {template_file}: {getattr(e, 'strerror', None) or e}") from None
    return tok


def read_config(data: bytes | None) -> dict:
    """tokenizer_config.json's bytes -> its object ({} for None); one-line TokenizerError if it is not one."""
    if data is None:
        return {}
    try:
        config = json.loads(data.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TokenizerError(f"{CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def config_chat_template(config: dict) -> str | None:
    """The chat template a tokenizer_config.json object names: its "chat_template" string, or, for
    a list of {"name", "template"} entries, the one named "default" (None when none is)."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return next((t["template"] for t in value if t["name"] == "default"), None)
    raise TokenizerError(f"{CONFIG_FILE}: chat_template must be a string or a list of {{\"name\", \"template\"}} objects")


def _config_special_pieces(config: dict, sp) -> dict[str, int]:
    """{piece: id} of the ordinary (user-defined) SentencePiece pieces that tokenizer_config.json's
    `added_tokens_decoder` marks special (an entry whose id holds that very piece); control
    pieces are special anyway."""
    entries = config.get("added_tokens_decoder") or {}
    if not isinstance(entries, dict):
        raise TokenizerError(f"{CONFIG_FILE}: added_tokens_decoder must be an object of id -> token")
    out = {}
    for key, entry in entries.items():
        if not (isinstance(entry, dict) and entry.get("special") is True and isinstance(entry.get("content"), str)):
            continue
        i = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else -1
        if 0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == entry["content"] and not (
                sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)):
            out[entry["content"]] = i
    return out


def special_token_name(value, key: str) -> str | None:
    """A tokenizer_config.json special-token entry (a string, a {"content": ...} object, or null) -> its text."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"{CONFIG_FILE}: {key} must be a string, an object with \"content\", or null; got {value!r}")
    return value


class TokenizerBase:
    """The interface every backend offers, and the part of it they share.

    A backend sets `vocab_size` (ids are 0..vocab_size-1), `special_tokens` (piece -> id, through
    `_set_special_tokens`), `strips_dummy_prefix`, and implements `encode`, `encode_batch`,
    `token_id`, the `bos_id`/`eos_id`/`pad_id`/`unk_id` ids (None when absent), `fingerprint`,
    `files` and `_piece_bytes` (one id's exact output bytes). Decoding is shared: an id sequence
    reads as its pieces' bytes joined and decoded as UTF-8, so `decode`, `StreamDecoder`, stop
    strings and constraints (which read `token_bytes`) always agree.
    """

    vocab_size: int
    special_tokens: dict[str, int]
    strips_dummy_prefix: bool = False
    _token_bytes: tuple[np.ndarray, np.ndarray] | None = None
    # The model's own chat format, a Jinja template as Hugging Face ships it (jaxllm.chat's "model"
    # template), or None. It is saved with the tokenizer's files, but is not part of `fingerprint`:
    # it does not change how text and ids map, which is what fingerprints key (tokenized data,
    # resumed runs), so attaching one never invalidates them.
    chat_template: str | None = None

    def template_tokens(self) -> dict[str, str]:
        """The special-token texts a chat template sees ({"bos_token": "<s>", ...}, only those set)."""
        raise NotImplementedError

    def _chat_files(self, config: bytes | None) -> dict[str, bytes]:
        """chat_template.jinja, when the template is not the one `config` (tokenizer_config.json) holds."""
        if self.chat_template is None:
            return {}
        try:
            same = config_chat_template(read_config(config)) == self.chat_template
        except TokenizerError:
            same = False
        return {} if same else {CHAT_TEMPLATE_FILE: self.chat_template.encode("utf-8")}

    load = staticmethod(load_tokenizer)

    def _set_special_tokens(self, special_tokens: dict[str, int]) -> None:
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        self._special_piece = {i: piece for piece, i in self.special_tokens.items()}

    # ------------------------------------------------------------------ saving

    def files(self) -> dict[str, bytes]:
        """{file name: bytes}: what `save_to_directory` writes and `load` reads back."""
        raise NotImplementedError

    def save_to_directory(self, directory: str | os.PathLike) -> None:
        """Writes `files()` into `directory` (each to a temporary name, then renamed, so a crash
        never leaves half a file) and removes another backend's tokenizer files there, which
        `load` (or transformers) would otherwise read instead."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self.files()
        for name, data in files.items():
            tmp = directory / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, directory / name)
        for name in TOKENIZER_FILES:
            if name not in files:
                (directory / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ decode

    def decode(self, ids: Iterable[int], skip_special: bool = True, after: Sequence[int] = ()) -> str:
        """Ids -> text: each id's bytes (`token_bytes`) joined and read as UTF-8. Special tokens
        are dropped, or written out with `skip_special=False`.

        `after`: ids this text continues (a prompt). A model with a dummy prefix (Llama's and
        Mistral's tokenizers) starts every text with a space, which is dropped at the start of
        the text, as SentencePiece does; after a prompt that holds text, the leading space of
        the continuation is real and kept, so `decode(prompt) + decode(ids, after=prompt)` reads
        as the whole text. Bytes that are not UTF-8 become U+FFFD, one per maximal invalid
        sequence (Python's rule), as in `StreamDecoder`, so streamed and decoded text agree.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        strip = self.strips_dummy_prefix and self.starts_text(after)
        if skip_special:
            return _utf8(self.bytes_of(ids), strip)
        parts, run = [], []
        for i in ids + [None]:  # specials written out split the ids into runs of text
            if i is not None and i not in self._special_ids:
                run.append(i)
                continue
            data = self.bytes_of(run)
            parts.append(_utf8(data, strip))
            strip = strip and not data  # the dummy prefix belongs to the first text
            if i is not None:
                parts.append(self._special_piece[i])
            run = []
        return "".join(parts)

    def starts_text(self, ids: Sequence[int]) -> bool:
        """Whether text after `ids` starts the text: they hold no text, only special tokens."""
        _, lengths = self.token_bytes()
        return not np.any(lengths[np.asarray(ids, np.int64)])

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        """The ids' output bytes, joined (special tokens give none)."""
        table, lengths = self.token_bytes()
        ids = np.asarray(ids, np.int64)
        return table[ids][np.arange(table.shape[1]) < lengths[ids][:, None]].tobytes()

    def decode_batch(self, batch: Sequence[Iterable[int]], **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in batch]

    # ------------------------------------------------------------------ bytes

    def token_bytes(self) -> tuple[np.ndarray, np.ndarray]:
        """Each id's exact output bytes: `table: [V, max_len] uint8`, `lengths: [V] int32`.

        Special tokens give none. Used for stop strings and constraints inside the loop.
        """
        if self._token_bytes is None:
            pieces = [self._piece_bytes(i) for i in range(self.vocab_size)]
            lengths = np.array([len(p) for p in pieces], dtype=np.int32)
            table = np.zeros((self.vocab_size, max(1, int(lengths.max()))), dtype=np.uint8)
            for i, p in enumerate(pieces):
                table[i, : len(p)] = np.frombuffer(p, dtype=np.uint8)
            self._token_bytes = (table, lengths)
        return self._token_bytes

    def _piece_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def stream_decoder(self, after: Sequence[int] = ()) -> "StreamDecoder":
        """An incremental `decode(..., after=after)` (see `StreamDecoder`)."""
        return StreamDecoder(self, after)


class Tokenizer(TokenizerBase):
    """A SentencePiece model plus the conventions jaxllm relies on.

    `Tokenizer.load(path)` is `load_tokenizer`: it returns this class for a SentencePiece model
    and a `JsonTokenizer` for a tokenizer.json.
    """

    def __init__(self, model_proto: bytes, config_json: bytes | str | None = None):
        """`config_json`: the tokenizer_config.json of a Hugging Face directory, kept (and saved
        back) for its chat template and the special-token texts that template sees."""
        self._proto = bytes(model_proto)
        self._config = config_json.encode("utf-8") if isinstance(config_json, str) else config_json
        config = read_config(self._config)
        self.chat_template = config_chat_template(config)
        self._config_names = {k: special_token_name(config.get(k), k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load_from_serialized_proto(self._proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError for bad bytes
            raise TokenizerError(f"not a valid SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        try:  # a damaged piece still parses, and would fail in the middle of decoding
            self.sp.id_to_piece(list(range(self.vocab_size)))
        except UnicodeDecodeError as e:
            raise TokenizerError(f"not a valid SentencePiece model (a piece is not UTF-8: {e})") from None
        # Special: control and unknown pieces, and the user-defined pieces tokenizer_config.json
        # marks special (Gemma's turn markers are user-defined pieces, which SentencePiece matches
        # in any text: `_encode_plain` spells a typed one otherwise, so it stays text).
        self._guarded = _config_special_pieces(config, self.sp)
        self._set_special_tokens({
            **{self.sp.id_to_piece(i): i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)},
            **self._guarded,
        })
        self._guarded_re = re.compile("(" + "|".join(map(re.escape, sorted(self._guarded, key=len, reverse=True))) + ")") \
            if self._guarded else None
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, names))) if names else None
        # A typed META_SPACE is spelled with byte pieces (when the model has them), and the
        # text after it is encoded without a second dummy prefix (by `_sp_inner`).
        self.strips_dummy_prefix, self._sp_inner = _dummy_prefix(self._proto, self.sp)
        meta_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in META_SPACE.encode("utf-8")]
        self._meta_ids = meta_ids if all(self.sp.is_byte(i) for i in meta_ids) else None
        self._token_bytes = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a SentencePiece `.model` file; a directory's `tokenizer.model` with the
        tokenizer_config.json beside it, if any."""
        path = Path(path)
        config_path = path.parent / CONFIG_FILE
        try:
            data = path.read_bytes()
            config = config_path.read_bytes() if path.name == "tokenizer.model" and config_path.is_file() else None
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer model not found: {path}") from None
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer model {e.filename or path}: {e.strerror or e}") from None
        return cls(data, config)

    @classmethod
    def train(
        cls,
        input_files: Sequence[str | os.PathLike] | str | os.PathLike,
        out_prefix: str | os.PathLike,
        vocab_size: int,
        model_type: str = "bpe",
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        character_coverage: float = 0.9995,
        max_sentences: int = 2_000_000,
        verbose: bool = False,
    ) -> "Tokenizer":
        """Trains a BPE or unigram model on text files and writes `out_prefix.model`.

        Settings for exact round trips on code and multilingual text: identity normalization
        (no NFKC), whitespace kept as it is, whitespace-only pieces allowed, digits split,
        byte fallback on. Ids 0-3 are <unk>, <s>, </s>, <pad>; `special_tokens` follow
        as control symbols (single ids, never matched in plain text).
        """
        if model_type not in ("bpe", "unigram"):
            raise TokenizerError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
        if isinstance(input_files, (str, os.PathLike)):
            input_files = [input_files]
        files = [Path(f) for f in input_files]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TokenizerError(f"tokenizer training file(s) not found: {', '.join(missing)}")
        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(files),
                model_prefix=str(out_prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                byte_fallback=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                control_symbols=list(special_tokens),
                user_defined_symbols=list(WHITESPACE_SYMBOLS),
                input_sentence_size=max_sentences,
                shuffle_input_sentence=True,
                max_sentence_length=16384,
                num_threads=os.cpu_count() or 1,
                minloglevel=0 if verbose else 2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}") from None
        return cls.from_file(f"{out_prefix}.model")

    def serialized(self) -> bytes:
        """The model file's bytes (what `load` reads back)."""
        return self._proto

    def files(self) -> dict[str, bytes]:
        """tokenizer.model, the tokenizer_config.json it was loaded with (if any), and
        chat_template.jinja when the chat template is not the one that config holds."""
        files = {"tokenizer.model": self._proto}
        if self._config is not None:
            files[CONFIG_FILE] = self._config
        return files | self._chat_files(self._config)

    def template_tokens(self) -> dict[str, str]:
        """Special-token texts as tokenizer_config.json names them, else the model's own pieces."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        out = {}
        for key, i in ids.items():
            name = self._config_names[key] or (self.sp.id_to_piece(i) if i is not None else None)
            if name is not None:
                out[key] = name
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes the model file to `path`, or `tokenizer.model` into `path` when it is a directory."""
        path = Path(path)
        if path.is_dir():
            self.save_to_directory(path)
        else:
            path.write_bytes(self._proto)

    @property
    def fingerprint(self) -> str:
        """A short hash of the model, for caches keyed by tokenizer."""
        digest = hashlib.sha256(self._proto)
        if self._guarded:  # they change which ids typed text gets
            digest.update(repr(sorted(self._guarded)).encode())
        return digest.hexdigest()[:16]

    # ------------------------------------------------------------------ special ids

    def _id_or_none(self, value: int) -> int | None:
        return value if value >= 0 else None

    @property
    def bos_id(self) -> int | None:
        return self._id_or_none(self.sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._id_or_none(self.sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return self._id_or_none(self.sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        return self._id_or_none(self.sp.unk_id())

    def token_id(self, piece: str) -> int:
        """The id of a special token or piece; a clear error if the vocabulary lacks it."""
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        i = self.sp.piece_to_id(piece)
        if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
            raise TokenizerError(f"token {piece!r} is not in the vocabulary")
        return i

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False) -> list[int]:
        """Text -> ids. With `parse_special`, special-token strings in the text become their ids."""
        if parse_special and self._special_re is not None:
            ids: list[int] = []
            pos = 0
            for m in self._special_re.finditer(text):
                ids += self._encode_plain(text[pos : m.start()])
                ids.append(self.special_tokens[m.group()])
                pos = m.end()
            ids += self._encode_plain(text[pos:])
        else:
            ids = self._encode_plain(text)
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Text -> ids, no special token matched. A typed special user-defined piece (which
        SentencePiece itself would match) is spelled with byte pieces; the text after it, as
        after a typed META_SPACE, continues the sentence (no second dummy prefix)."""
        if self._guarded_re is None or not self._guarded_re.search(text):
            return self._encode_text(text, continuing=False)
        ids: list[int] = []
        for j, part in enumerate(self._guarded_re.split(text)):  # text, marker, text, ...
            if j % 2:
                ids += self._spelled(part, continuing=j > 1 or bool(ids))
            elif part:
                ids += self._encode_text(part, continuing=j > 0)
        return ids

    def _encode_text(self, text: str, continuing: bool) -> list[int]:
        first = self._sp_inner if continuing else self.sp
        if self._meta_ids is None or META_SPACE not in text:
            return first.encode(text) if text else []
        ids: list[int] = []
        for k, part in enumerate(text.split(META_SPACE)):
            if k:
                ids += self._meta_ids
            if part:
                ids += (self._sp_inner if k else first).encode(part)
        return ids

    def _spelled(self, piece: str, continuing: bool) -> list[int]:
        """A special piece's text as plain text: its UTF-8 bytes' byte pieces, or (a model
        without them) its first character and the rest encoded apart, which no longer match it."""
        byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in piece.encode("utf-8")]
        if all(self.sp.is_byte(i) for i in byte_ids):
            return byte_ids
        return self._encode_text(piece[0], continuing) + self._sp_inner.encode(piece[1:])

    def encode_batch(self, texts: Sequence[str], **kwargs) -> list[list[int]]:
        """Many texts at once; plain texts go through SentencePiece's threaded batch encoder."""
        if kwargs or any(self._meta_ids is not None and META_SPACE in t or self._guarded_re is not None
                         and self._guarded_re.search(t) for t in texts):
            return [self.encode(t, **kwargs) for t in texts]
        return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def _piece_bytes(self, i: int) -> bytes:
        """"▁" is a space, a byte-fallback piece "<0xAB>" is that one byte, and control, unknown
        and unused pieces are empty."""
        if self.sp.is_byte(i):
            return bytes([int(self.sp.id_to_piece(i)[3:5], 16)])
        if self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i) or i in self._guarded.values():
            return b""
        return self.sp.id_to_piece(i).replace(META_SPACE, " ").encode("utf-8")


class StreamDecoder:
    """Incremental detokenization: feed ids as they come, get text that never splits a character.

    The concatenation of every `push` and the final `flush` equals `decode(ids, after=after)`
    of all the ids, however they were split into pushes: both read the bytes with Python's
    UTF-8 decoder, whose replacement of invalid bytes does not depend on where input ends.
    """

    def __init__(self, tokenizer: TokenizerBase, after: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_first_space = tokenizer.strips_dummy_prefix and tokenizer.starts_text(after)
        self._started = False

    def push(self, ids: Iterable[int]) -> str:
        data = self._tokenizer.bytes_of(list(ids))
        if data and not self._started:
            self._started = True
            if self._strip_first_space and data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _utf8(data: bytes, strip_space: bool) -> str:
    """Bytes -> text (invalid UTF-8 as U+FFFD), without one leading space when `strip_space`."""
    if strip_space and data.startswith(b" "):
        data = data[1:]
    return data.decode("utf-8", errors="replace")


def _lines(files: Sequence[Path]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.rstrip("\n")
                if line:
                    yield line


def _dummy_prefix(proto: bytes, sp: spm.SentencePieceProcessor) -> tuple[bool, spm.SentencePieceProcessor]:
    """(whether the model adds a dummy prefix, which decode drops again (Llama-style models do);
    the same model with that prefix off, for text that continues a sentence)."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
    except Exception:  # protobuf missing or too old: ask the model, and keep its prefix everywhere
        pieces = sp.encode("a", out_type=str)
        return bool(pieces) and pieces[0].startswith(META_SPACE), sp
    if not model.normalizer_spec.add_dummy_prefix:
        return False, sp
    model.normalizer_spec.add_dummy_prefix = False
    inner = spm.SentencePieceProcessor()
    inner.load_from_serialized_proto(model.SerializeToString())
    return True, inner
