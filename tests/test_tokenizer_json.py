"""tokenizer.json (byte-level BPE) tokenizers: ids as transformers gives them, exact round trips,
exact token bytes, streaming, generation with stops and constraints, saving, and bad files.

The tokenizer.json files are trained here with the `tokenizers` library in the three layouts
current models ship: GPT-2's (ByteLevel pre-tokenizer with its own regex), Llama 3's (a Split
regex, then ByteLevel without one) and Qwen2's (Qwen's Split regex and an NFC normalizer).
The oracles are transformers' AutoTokenizer (ids, BOS/EOS/PAD), the `tokenizers` library's own
decode and alphabet, and Python's UTF-8 codec.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata

import jax
import pytest
from hypothesis import given, settings, strategies as st

from jaxllm import CheckpointError, Tokenizer, TokenizerError, generate, init_params, load_checkpoint, save_checkpoint
from jaxllm.hf import export_hf, load_hf
from jaxllm.tokenizer_json import JsonTokenizer, byte_to_unicode
from conftest import MULTILINGUAL, REPO, make_corpus, reference_stack, tiny_config
from fuzzing import check_api_error, check_cli_outcome, run_cli

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_ADDED = "Ġzzq"  # an added token spelled in byte-level letters, which the library decodes as " zzq"
SHARED_ADDED = "Ġthe"  # an added token that is also a model piece: one id, read as the piece
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
# style -> (Split regex or None for GPT-2's ByteLevel regex, NFC normalizer?, transformers class, tokenizer_config specials)
STYLES = {
    "gpt2": (None, False, "GPT2Tokenizer", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}),
    "llama3": (LLAMA3_SPLIT, False, "PreTrainedTokenizerFast",
               {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|endoftext|>", "__type": "AddedToken"}, "pad_token": None}),
    "qwen2": (QWEN2_SPLIT, True, "Qwen2Tokenizer", {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}
EXTRA = [
    "日本語の文章を書きます。東京は大きい都市です。", "こんにちは、元気ですか？", "🎉🎉 party 👍🏽 👨‍👩‍👧 family 🚀",
    "def main():\n    items = [x * 2 for x in range(10)]\n\treturn {'a': 1, \"b\": [2, 3]}\n",
    "    if (a && b) { return -1; }  // C code\n",
]
FIXED = MULTILINGUAL + EXTRA + [
    "  \n\n\t  ", "def f(x):\n\treturn  x  +\t1\n\n\n", "   ", "\r\n\r\n", "a  b   c    d",
    "mixed: abc ДЕЖ 中文 العربية हिन्दी 12345678 🎉x", "<|im_start|>user\nhi<|im_end|> typed by a user",
    "<|endoftext|><|endoftext|>", "\x00\x01 control \u200b zero-width", "ﬁ ligature", "Ġ Ċ ĉ byte-level letters typed",
    "it's we'll THEY'RE", "",
]
any_text = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=120),
    st.text(alphabet=" \n\t\r'sĠ<|>im_end日本🎉0123456789", max_size=40),  # regex edges, typed markers, byte-level letters
)


def build(directory, corpus, style: str):
    """Trains a small byte-level BPE in `style` and writes tokenizer.json + tokenizer_config.json."""
    split, nfc, cls, specials = STYLES[style]
    tok = tokenizers.Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus)], trainer)
    if style == "llama3":  # added tokens that are not special: matched in text either way
        assert tok.token_to_id(BYTE_LEVEL_ADDED) is None and tok.token_to_id(SHARED_ADDED) is not None
        tok.add_tokens([AddedToken("<|tool|>", special=False, normalized=False), AddedToken("東京都", special=False),
                        AddedToken(BYTE_LEVEL_ADDED, special=False, normalized=False),
                        AddedToken(SHARED_ADDED, special=False, normalized=False)])
        assert tok.token_to_id(BYTE_LEVEL_ADDED) >= 700 > tok.token_to_id(SHARED_ADDED)
    directory.mkdir(parents=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls, **specials}))
    return directory


def tokenizer_corpus(root):
    """The suite's code corpus plus Japanese, emoji and code lines: what the tokenizers here train on."""
    corpus = make_corpus(root / "corpus.txt", lines=1500)
    with open(corpus, "a", encoding="utf-8") as f:
        f.write("\n".join(EXTRA * 20) + "\n")
    return corpus


@pytest.fixture(scope="session")
def json_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer_json")
    corpus = tokenizer_corpus(root)
    return {style: build(root / style, corpus, style) for style in STYLES}


@pytest.fixture(scope="session", params=list(STYLES))
def style(request):
    return request.param


@pytest.fixture(scope="session")
def jtok(json_dirs, style) -> JsonTokenizer:
    return Tokenizer.load(json_dirs[style])


@pytest.fixture(scope="session")
def library(json_dirs, style):
    """The `tokenizers` library's own reading of the same file (decode oracle)."""
    return tokenizers.Tokenizer.from_file(str(json_dirs[style] / "tokenizer.json"))


_REFERENCE = {}


def reference(json_dirs, style):
    """transformers' AutoTokenizer for the directory (the ids oracle), loaded once."""
    _, transformers = reference_stack()
    if style not in _REFERENCE:
        _REFERENCE[style] = transformers.AutoTokenizer.from_pretrained(str(json_dirs[style]))
    return _REFERENCE[style]


def normal(style, text):
    """The text a tokenizer round-trips: Qwen2's NFC normalizer writes NFC."""
    return unicodedata.normalize("NFC", text) if STYLES[style][1] else text


# ---------------------------------------------------------------------------- the byte-level alphabet


def test_the_byte_alphabet_is_the_libraries():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    # the library's pre-tokenizer spells every byte of these texts as the table does
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    every_byte = "".join(chr(c) for c in [*range(0x80), 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000, 0x10FFFF, 0xE9, 0x3042, 0x1F389])
    for text in [every_byte, *FIXED]:
        assert "".join(p for p, _ in spell.pre_tokenize_str(text)) == "".join(table[b] for b in text.encode("utf-8"))


def test_loaded_by_file_kind(json_dirs, tmp_path, tokenizer):
    d = json_dirs["llama3"]
    assert isinstance(Tokenizer.load(d), JsonTokenizer) and isinstance(Tokenizer.load(d / "tokenizer.json"), JsonTokenizer)
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    tokenizer.save(both / "tokenizer.model")  # a directory with both: SentencePiece's file wins
    assert Tokenizer.load(both).fingerprint == tokenizer.fingerprint


# ---------------------------------------------------------------------------- ids equal transformers'


@pytest.mark.parametrize("text", FIXED)
def test_ids_equal_transformers(json_dirs, jtok, style, text):
    ref = reference(json_dirs, style)
    assert jtok.encode(text) == ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert jtok.encode(text, parse_special=True) == ref(text, add_special_tokens=False)["input_ids"]


def test_special_ids_and_vocabulary_equal_transformers(json_dirs, jtok, style):
    ref = reference(json_dirs, style)
    assert (jtok.bos_id, jtok.eos_id, jtok.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert jtok.vocab_size == len(ref) and jtok.special_tokens == {s: ref.convert_tokens_to_ids(s) for s in SPECIALS}
    if style == "llama3":
        assert jtok.bos_id == jtok.special_tokens["<|begin_of_text|>"] and jtok.pad_id is None
        assert jtok.encode("x", add_bos=True, add_eos=True) == [jtok.bos_id] + jtok.encode("x") + [jtok.eos_id]
    if style == "qwen2":
        assert jtok.bos_id is None and jtok.encode("x", add_bos=True) == jtok.encode("x")


def test_text_is_text_unless_special_tokens_are_parsed(jtok):
    text = "<|im_start|>hi<|im_end|>"
    plain, parsed = jtok.encode(text), jtok.encode(text, parse_special=True)
    assert not set(plain) & set(jtok.special_tokens.values()) and jtok.decode(plain) == text
    assert parsed == [jtok.special_tokens["<|im_start|>"]] + jtok.encode("hi") + [jtok.special_tokens["<|im_end|>"]]
    assert jtok.decode(parsed) == "hi" and jtok.decode(parsed, skip_special=False) == text
    assert jtok.token_id("<|im_end|>") == jtok.special_tokens["<|im_end|>"]
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        jtok.token_id("no such piece")


def test_added_tokens_that_are_not_special_are_matched_and_keep_their_text(json_dirs):
    tok = Tokenizer.load(json_dirs["llama3"])
    tool, tokyo = tok.token_id("<|tool|>"), tok.token_id("東京都")
    assert "<|tool|>" not in tok.special_tokens
    for parse in (False, True):
        assert tok.encode("a<|tool|>東京都", parse_special=parse)[-2:] == [tool, tokyo]
    assert tok.bytes_of([tool, tokyo]) == "<|tool|>東京都".encode()
    # one spelled in byte-level letters is its own text too (the library's decoder would read
    # "Ġ" as a space and break the round trip)
    library = tokenizers.Tokenizer.from_file(str(json_dirs["llama3"] / "tokenizer.json"))
    ids = tok.encode("aĠzzq")
    assert ids[-1] == tok.token_id(BYTE_LEVEL_ADDED) and tok.decode(ids) == "aĠzzq" and library.decode(ids) == "a zzq"
    # one that is also a model piece has that piece's id, which " the" encodes to: it reads " the"
    the = tok.token_id(SHARED_ADDED)
    assert tok.encode("a the")[-1] == the == tok.encode("aĠthe")[-1]
    assert tok.decode([the]) == library.decode([the]) == " the"


# ---------------------------------------------------------------------------- round trips and bytes


@pytest.mark.parametrize("text", FIXED)
def test_round_trip_and_bytes_fixed_strings(jtok, library, style, text):
    text = normal(style, text)
    ids = jtok.encode(text)
    assert jtok.decode(ids) == text == library.decode(ids)
    assert jtok.bytes_of(ids) == text.encode("utf-8")
    table, lengths = jtok.token_bytes()
    assert b"".join(table[i, : lengths[i]].tobytes() for i in ids) == text.encode("utf-8")


@settings(max_examples=60, deadline=None)
@given(text=any_text)
def test_round_trip_any_text_and_ids_equal_transformers(json_dirs, jtok, library, style, text):
    text = normal(style, text)
    ids = jtok.encode(text)
    assert jtok.decode(ids) == text
    assert library.decode(ids) == text or BYTE_LEVEL_ADDED in text
    assert jtok.bytes_of(ids) == text.encode("utf-8")
    assert ids == reference(json_dirs, style)(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_each_pieces_bytes_are_what_the_library_decodes(jtok, library):
    table, lengths = jtok.token_bytes()
    assert table.shape == (jtok.vocab_size, lengths.max())
    checked = 0
    for i in range(jtok.vocab_size):
        data = table[i, : lengths[i]].tobytes()
        if i in jtok.special_tokens.values():
            assert data == b"" and library.decode([i]) == ""
            continue
        if library.id_to_token(i) == BYTE_LEVEL_ADDED:  # where the library does not round-trip (see above)
            assert data == BYTE_LEVEL_ADDED.encode()
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: a lone byte token or a partial merge
            assert library.decode([i]) == data.decode("utf-8", errors="replace")
            continue
        assert library.decode([i]) == text
        checked += 1
    assert checked > jtok.vocab_size // 2
    assert any(lengths[i] == 1 and table[i, 0] >= 0x80 for i in range(jtok.vocab_size))  # byte tokens exist


def test_batch_encode_decode(jtok):
    texts = ["a b", "こんにちは", "", "<|im_end|>"]
    assert jtok.encode_batch(texts) == [jtok.encode(t) for t in texts]
    assert jtok.encode_batch(texts, parse_special=True, add_eos=True) == [jtok.encode(t, parse_special=True, add_eos=True) for t in texts]
    assert jtok.decode_batch(jtok.encode_batch(texts)) == texts


# ---------------------------------------------------------------------------- streaming


def _streams_exactly(tok, ids, whole):
    stream = tok.stream_decoder()
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    so_far = ""
    for p in pieces:  # every push ends on a character boundary: no U+FFFD, a prefix of the text
        so_far += p
        assert whole.startswith(so_far)
    assert so_far == whole == tok.decode(ids)


@pytest.mark.parametrize("text", ["🦀🐍 family: 👨‍👩‍👧 🚀🚀", "日本語のテキスト、東京、大阪、京都", *EXTRA])
def test_stream_decoder_never_splits_a_character(jtok, style, text):
    text = normal(style, text)
    ids = jtok.encode(text)
    table, lengths = jtok.token_bytes()
    partial = [i for i in ids if not _utf8(table[i, : lengths[i]].tobytes())]
    if "🦀" in text:  # not in the corpus: its four bytes are tokens that are no character alone
        assert partial
    _streams_exactly(jtok, ids, text)


@settings(max_examples=40, deadline=None)
@given(text=any_text)
def test_stream_decoder_any_text(jtok, style, text):
    text = normal(style, text)
    _streams_exactly(jtok, jtok.encode(text), text)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------- generation, saving


@pytest.fixture(scope="module")
def llama3_model(json_dirs):
    tok = Tokenizer.load(json_dirs["llama3"])
    cfg = tiny_config(tok.vocab_size)
    params = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(cfg, jax.random.key(3)))
    return tok, cfg, params


def test_generate_cuts_at_a_stop_string_exactly(llama3_model):
    tok, cfg, params = llama3_model
    prompt = "def main():\n"
    free = generate(params, cfg, [prompt], tokenizer=tok, max_new_tokens=24, temperature=0.0, eos_token_id=[])
    text = free.texts[0]
    assert text == tok.decode(free.token_ids[0])
    k = next(k for k in range(1, len(text) - 2) if "\ufffd" not in text[k : k + 2])
    stop = text[k : k + 2]
    cut = generate(params, cfg, [prompt], tokenizer=tok, max_new_tokens=24, temperature=0.0, eos_token_id=[], stop=[stop])
    assert cut.finish_reasons == ["stop"] and cut.texts[0] == text[: text.find(stop)]


def test_generate_with_a_regex_gives_matching_text(llama3_model):
    tok, cfg, params = llama3_model
    pattern = r"(yes|no), [0-9]{3}\. 東京"
    result = generate(params, cfg, ["Answer:"], tokenizer=tok, max_new_tokens=32, temperature=0.0, regex=pattern)
    assert re.fullmatch(pattern, result.texts[0]), result.texts[0]
    assert result.valid == [True]


def test_checkpoint_and_hf_export_round_trip_the_tokenizer(llama3_model, json_dirs, tokenizer, tmp_path):
    tok, cfg, params = llama3_model
    d = tmp_path / "ckpt"
    d.mkdir()
    tokenizer.save(d / "tokenizer.model")  # another backend's file left from before: replaced, not read
    save_checkpoint(d, params, cfg, tok)
    assert not (d / "tokenizer.model").exists()
    assert (d / "tokenizer.json").read_bytes() == (json_dirs["llama3"] / "tokenizer.json").read_bytes()
    _, _, again = load_checkpoint(d)
    text = "<|im_start|>東京都 🎉 def f(x):\n\treturn x<|im_end|>"
    assert isinstance(again, JsonTokenizer) and again.fingerprint == tok.fingerprint
    assert again.encode(text) == tok.encode(text) and again.encode(text, parse_special=True) == tok.encode(text, parse_special=True)
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)

    out = export_hf(tmp_path / "hf", params, cfg, tok)
    _, _, from_hf, _ = load_hf(out)
    assert from_hf.fingerprint == tok.fingerprint and from_hf.encode(text) == tok.encode(text)
    meta = json.loads((out / "config.json").read_text())
    assert (meta["bos_token_id"], meta["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    _, transformers = reference_stack()
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    assert ref(text, add_special_tokens=False)["input_ids"] == tok.encode(text, parse_special=True)

    # a SentencePiece checkpoint saved over it gets its own file back, and only that
    save_checkpoint(d, params, cfg.replace(vocab_size=max(cfg.vocab_size, tokenizer.vocab_size)), tokenizer)
    assert not (d / "tokenizer.json").exists() and load_checkpoint(d)[2].fingerprint == tokenizer.fingerprint


def test_a_tokenizer_without_a_config_saves_one_transformers_reads(json_dirs, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_bytes((json_dirs["llama3"] / "tokenizer.json").read_bytes())
    tok = Tokenizer.load(tmp_path / "src" / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (None, None, None, None)
    (tmp_path / "out").mkdir()
    tok.save(tmp_path / "out")
    again = Tokenizer.load(tmp_path / "out")
    assert again.fingerprint == tok.fingerprint
    _, transformers = reference_stack()
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert ref("東京都 <|im_end|> x", add_special_tokens=False)["input_ids"] == tok.encode("東京都 <|im_end|> x", parse_special=True)


# ---------------------------------------------------------------------------- bad files


def _metaspace_json(corpus) -> str:
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False))
    return tok.to_str()


def _wordpiece_json(corpus) -> str:
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(corpus)], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    return tok.to_str()


def _edited(json_dirs, change) -> str:
    spec = json.loads((json_dirs["gpt2"] / "tokenizer.json").read_text())
    change(spec)
    return json.dumps(spec)


@pytest.fixture(scope="module")
def bad_files(json_dirs, tmp_path_factory):
    corpus = make_corpus(tmp_path_factory.mktemp("bad_corpus") / "c.txt", lines=200)
    return {
        "invalid JSON": ('{"model": {"type": "BPE"', "not JSON"),
        "not UTF-8": (b"\xff\xfe{}", "not JSON"),
        "a list": ("[1, 2]", "no \"model\" object"),
        "Metaspace": (_metaspace_json(corpus), r"SentencePiece.*Metaspace.*tokenizer\.model"),
        "WordPiece": (_wordpiece_json(corpus), "WordPiece model"),
        "prefix space": (_edited(json_dirs, lambda s: s["pre_tokenizer"].update(add_prefix_space=True)), "add_prefix_space"),
        "lowercase": (_edited(json_dirs, lambda s: s.update(normalizer={"type": "Lowercase"})), r"normalizer \(Lowercase\)"),
        "broken merges": (_edited(json_dirs, lambda s: s["model"].update(merges=[["no_such", "pieces"]])), "not a valid tokenizer.json"),
    }


@pytest.mark.parametrize("case", ["invalid JSON", "not UTF-8", "a list", "Metaspace", "WordPiece", "prefix space", "lowercase", "broken merges"])
def test_bad_tokenizer_json_is_one_line(bad_files, tmp_path, case):
    content, message = bad_files[case]
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TokenizerError, match=message) as e:
        Tokenizer.load(tmp_path)
    check_api_error(e.value)


@pytest.mark.parametrize("config,message", [
    ("{not json", "tokenizer_config.json is not valid JSON"),
    ('["a"]', "must hold a JSON object"),
    ('{"eos_token": "<|nope|>"}', r"eos_token '<\|nope\|>' is not a token of tokenizer.json"),
    ('{"bos_token": 5}', "bos_token must be a string"),
])
def test_bad_tokenizer_config_is_one_line(json_dirs, tmp_path, config, message):
    (tmp_path / "tokenizer.json").write_bytes((json_dirs["gpt2"] / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(TokenizerError, match=message) as e:
        Tokenizer.load(tmp_path / "tokenizer.json")
    check_api_error(e.value)


def test_missing_files_are_one_line(tmp_path):
    for path, message in [(tmp_path / "missing.json", "tokenizer.json not found"), (tmp_path, "neither tokenizer.model nor tokenizer.json")]:
        with pytest.raises(TokenizerError, match=message) as e:
            Tokenizer.load(path)
        check_api_error(e.value)


def test_a_checkpoint_with_a_broken_tokenizer_json_fails_in_one_line(llama3_model, tmp_path, capsys):
    tok, cfg, params = llama3_model
    d = save_checkpoint(tmp_path / "ckpt", params, cfg, tok)
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "decoder": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer.json") as e:
        load_checkpoint(d)
    check_api_error(e.value)
    sys.path.insert(0, str(REPO))
    import sample

    argv = ["--checkpoint", str(d), "--prompt", "hi", "--max_new_tokens", "2"]
    rc, _, err = run_cli(sample.main, argv, capsys)
    check_cli_outcome("sample.py", rc, err, argv)
    assert rc == 2 and "tokenizer.json" in err
