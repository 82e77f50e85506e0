"""Hugging Face `tokenizer.json` tokenizers (byte-level BPE), through the `tokenizers` library.

GPT-2, Llama 3, Qwen2/2.5 and Mistral-Nemo ship their tokenizer as a `tokenizer.json`: a BPE
model over *byte-level* pieces, where each of the 256 byte values is written as one printable
character (GPT-2's byte-to-unicode map: printable bytes stand for themselves, the 68 others
for characters from U+0100 on), so every text is spelled by the vocabulary and nothing is
ever unknown. Encoding is left to the `tokenizers` library, which reads the file exactly as
transformers does; `JsonTokenizer` adds jaxllm's conventions on top (see jaxllm.tokenizer):

* ids never gain a BOS or EOS behind the caller's back: the file's post-processor is not
  run; `encode(..., add_bos=True)` adds the BOS that `tokenizer_config.json` names.
* text is text: a typed "<|im_end|>" is encoded as its characters unless
  `parse_special=True`. Special tokens are the file's added tokens marked `special`; added
  tokens that are not special are matched in text, as transformers matches them.
* each id's exact output bytes (`token_bytes`) come from inverting the byte-to-unicode map,
  so decoding, streaming, stop strings and constraints work on bytes as for SentencePiece.

`tokenizer_config.json` beside the tokenizer.json gives `bos_token`, `eos_token`,
`pad_token` and `unk_token` (a string, a {"content": ...} object, or null for none); without
it they are all None. Its `chat_template` (or a `chat_template.jinja` beside it) is the model's
chat format (`chat_template`; see jaxllm.chat). A tokenizer.json that is not byte-level BPE is refused with one line
naming what it holds: a SentencePiece-converted one (Metaspace pieces, byte fallback) is
read from its `tokenizer.model` instead.

Exact round trip holds for any text when the file has no normalizer, as in GPT-2's and Llama
3's. Qwen2's normalizes to NFC (as its model was trained), so there the round trip holds for
NFC text; other normalizers rewrite text in ways jaxllm does not accept, and are refused. One
more exception is the file's own doing: an added token whose text is also a model piece
("Ġthe" added again) shares that piece's id, so the typed text "Ġthe" reads back as " the".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from jaxllm.errors import TokenizerError
from jaxllm.tokenizer import TokenizerBase, config_chat_template, read_config, special_token_name

JSON_FILE, CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
# normalizers that keep the round trip for the text they leave alone (NFC text for "NFC")
ACCEPTED_NORMALIZERS = {"NFC"}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character that stands for it in a piece.

    The printable bytes "!".."~", "¡".."¬" and "®".."ÿ" stand for themselves (the character
    with that code point); the 68 others (controls, space, 0x7F-0xA0, 0xAD) take the
    characters U+0100, U+0101, ... in byte order, so a space is "Ġ" (U+0120) and "\\n" is "Ċ".
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + extra)
            extra += 1
    return out


CHAR_TO_BYTE = {c: b for b, c in byte_to_unicode().items()}


def piece_bytes(piece: str) -> bytes:
    """A byte-level piece -> the bytes it stands for. A piece with a character outside the
    alphabet (a hand-added vocabulary entry) stands for its own UTF-8, as the `tokenizers`
    library's ByteLevel decoder reads it."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    except KeyError:
        return piece.encode("utf-8")


class JsonTokenizer(TokenizerBase):
    """A byte-level BPE `tokenizer.json` (+ its `tokenizer_config.json`) behind jaxllm's
    tokenizer interface (`jaxllm.tokenizer.TokenizerBase`).

    `tokenizer_json`: the file's bytes. `config_json`: tokenizer_config.json's bytes, or None.
    Pieces named in `token_id` are written as the file writes them ("Ġthe" for " the").
    """

    strips_dummy_prefix = False  # byte-level BPE adds nothing before the text

    def __init__(self, tokenizer_json: bytes | str, config_json: bytes | str | None = None):
        from tokenizers import Tokenizer as LibraryTokenizer

        self._json = tokenizer_json.encode("utf-8") if isinstance(tokenizer_json, str) else bytes(tokenizer_json)
        self._config = config_json.encode("utf-8") if isinstance(config_json, str) else config_json
        try:
            text = self._json.decode("utf-8")
            spec = json.loads(text)
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise TokenizerError(f"not a valid tokenizer.json (not JSON: {e})") from None
        check_byte_level(spec)
        try:
            # Two copies: one matches special tokens in text, one (encode_special_tokens) does
            # not. A flag toggled per call would race between threads (the server encodes on many).
            self._plain, self._parse = LibraryTokenizer.from_str(text), LibraryTokenizer.from_str(text)
        except Exception as e:  # the library raises its own Exception subclass with Rust's message
            raise TokenizerError(f"not a valid tokenizer.json ({_one_line(e)})") from None
        for t in (self._plain, self._parse):
            t.no_truncation()  # a file may ask to cut texts (max_length) or pad them: never here
            t.no_padding()
        self._plain.encode_special_tokens = True

        added = self._plain.get_added_tokens_decoder()  # {id: AddedToken}
        model_vocab = self._plain.get_vocab(with_added_tokens=False)  # {piece: id}
        self.vocab_size = max([*model_vocab.values(), *added], default=-1) + 1
        # An id is a model piece (byte-level letters), or an added token that is only that: its
        # text. An added token whose text is also a model piece shares the piece's id, which
        # ordinary text encodes to as well: it reads as the piece, as the library decodes it.
        self._pieces: list[str | None] = [None] * self.vocab_size
        for piece, i in model_vocab.items():
            self._pieces[i] = piece
        self._added_text = {i: t.content for i, t in added.items() if not t.special and self._pieces[i] is None}
        self._set_special_tokens({t.content: i for i, t in added.items() if t.special})

        self._special_names = self._read_config(spec)
        ids = {key: (None if name is None else self._parse.token_to_id(name)) for key, name in self._special_names.items()}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (ids[k] for k in SPECIAL_KEYS)
        self._token_bytes = None

    def _read_config(self, spec: dict) -> dict[str, str | None]:
        """tokenizer_config.json -> {"bos_token": name or None, ...}, each name a token of the file
        (and `chat_template` set from it). Without a config the BPE model's own unk_token (if any)
        is the only one."""
        names: dict[str, str | None] = {key: None for key in SPECIAL_KEYS}
        if self._config is None:
            names["unk_token"] = spec["model"].get("unk_token")
        else:
            config = read_config(self._config)
            names = {key: special_token_name(config.get(key), key) for key in SPECIAL_KEYS}
            self.chat_template = config_chat_template(config)
        for key, name in names.items():
            if name is not None and self._parse.token_to_id(name) is None:
                raise TokenizerError(f"{CONFIG_FILE}: {key} {name!r} is not a token of {JSON_FILE}")
        return names

    # ------------------------------------------------------------------ files

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "JsonTokenizer":
        """Loads a tokenizer.json file, with the `tokenizer_config.json` beside it when there is one."""
        path = Path(path)
        config_path = path.parent / CONFIG_FILE
        try:
            data = path.read_bytes()
            config = config_path.read_bytes() if config_path.is_file() else None
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer.json not found: {path}") from None
        except OSError as e:
            raise TokenizerError(f"cannot read {e.filename or path}: {e.strerror or e}") from None
        return cls(data, config)

    def serialized(self) -> bytes:
        """The tokenizer.json bytes."""
        return self._json

    def files(self) -> dict[str, bytes]:
        """tokenizer.json as loaded, and tokenizer_config.json: as loaded, or (when there was
        none) one naming the special tokens and the class transformers reads the file with; and
        chat_template.jinja when the chat template is not the one that config holds."""
        config = self._config
        if config is None:
            config = json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **self._special_names}, indent=2).encode() + b"\n"
        return {JSON_FILE: self._json, CONFIG_FILE: config} | self._chat_files(config)

    def template_tokens(self) -> dict[str, str]:
        """The special-token texts tokenizer_config.json names (those set)."""
        return {key: name for key, name in self._special_names.items() if name is not None}

    def save(self, path: str | os.PathLike) -> None:
        """Writes both files into `path` when it is a directory; else tokenizer.json to `path`
        and tokenizer_config.json beside it."""
        path = Path(path)
        if path.is_dir():
            self.save_to_directory(path)
            return
        files = self.files()
        path.write_bytes(files[JSON_FILE])
        (path.parent / CONFIG_FILE).write_bytes(files[CONFIG_FILE])

    @property
    def fingerprint(self) -> str:
        """A short hash of tokenizer.json and the special-token choice, for caches keyed by tokenizer."""
        choice = json.dumps(self._special_names, sort_keys=True).encode()
        return hashlib.sha256(self._json + b"\0" + choice).hexdigest()[:16]

    # ------------------------------------------------------------------ ids

    def token_id(self, piece: str) -> int:
        """The id of a special token or piece (as the file spells it); a clear error if the vocabulary lacks it."""
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        i = self._parse.token_to_id(piece)
        if i is None:
            raise TokenizerError(f"token {piece!r} is not in the vocabulary")
        return i

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, parse_special: bool = False) -> list[int]:
        """Text -> ids. With `parse_special`, special-token strings in the text become their ids."""
        ids = (self._parse if parse_special else self._plain).encode(text, add_special_tokens=False).ids
        return self._framed(ids, add_bos, add_eos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     parse_special: bool = False) -> list[list[int]]:
        """Many texts at once, on the library's worker threads."""
        encoder = self._parse if parse_special else self._plain
        return [self._framed(e.ids, add_bos, add_eos) for e in encoder.encode_batch(list(texts), add_special_tokens=False)]

    def _framed(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def _piece_bytes(self, i: int) -> bytes:
        """Special tokens and ids the file leaves unused are empty; a model piece is the bytes
        it stands for; an added token that is not special (and not also a model piece) is its
        text's UTF-8: the text it was matched as, so the round trip holds even for one spelled
        in byte-level letters ("Ġx"), which the library's decoder would read as bytes (" x")."""
        if i in self._special_ids:
            return b""
        if i in self._added_text:
            return self._added_text[i].encode("utf-8")
        return b"" if self._pieces[i] is None else piece_bytes(self._pieces[i])


def check_byte_level(spec) -> None:
    """Refuses, in one line naming what it holds, a tokenizer.json that is not byte-level BPE."""
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise TokenizerError("not a valid tokenizer.json (no \"model\" object)")
    model = spec["model"]
    pre, dec, norm = (_components(spec.get(k)) for k in ("pre_tokenizer", "decoder", "normalizer"))
    found = [what for what, there in (("a Metaspace pre-tokenizer", "Metaspace" in pre), ("a Metaspace decoder", "Metaspace" in dec),
                                      ("a ByteFallback decoder", "ByteFallback" in dec), ("byte_fallback", model.get("byte_fallback"))) if there]
    if found:
        raise TokenizerError(f"this tokenizer.json is converted from SentencePiece ({', '.join(found)}), not byte-level: "
                             "load the model's tokenizer.model instead")
    if model.get("type") != "BPE":
        raise TokenizerError(f"this tokenizer.json holds a {model.get('type')} model; only byte-level BPE is supported")
    if "ByteLevel" not in pre:
        raise TokenizerError(f"this tokenizer.json's pre-tokenizer ({_names(pre)}) is not byte-level; only byte-level BPE is supported")
    if not dec or set(dec) != {"ByteLevel"}:
        raise TokenizerError(f"this tokenizer.json's decoder ({_names(dec)}) is not ByteLevel; only byte-level BPE is supported")
    if not set(norm) <= ACCEPTED_NORMALIZERS:
        raise TokenizerError(f"this tokenizer.json's normalizer ({_names(norm)}) rewrites text; only none or NFC is supported")
    if any(c.get("add_prefix_space") for c in _component_specs(spec.get("pre_tokenizer")) if c.get("type") == "ByteLevel"):
        raise TokenizerError("this tokenizer.json adds a space before every text (ByteLevel add_prefix_space), "
                             "which decoding would keep; not supported")


def _component_specs(spec) -> list[dict]:
    """A pipeline component and the members of any Sequence in it, flattened."""
    if not isinstance(spec, dict):
        return []
    members = spec.get("pretokenizers", spec.get("decoders", spec.get("normalizers")))
    if spec.get("type") == "Sequence" and isinstance(members, list):
        return [c for m in members for c in _component_specs(m)]
    return [spec]


def _components(spec) -> list[str]:
    return [str(c.get("type")) for c in _component_specs(spec)]


def _names(types: list[str]) -> str:
    return ", ".join(types) or "none"


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
