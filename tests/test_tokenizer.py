"""Tokenizer: exact round trips, special tokens that are never typed by accident, bytes, streaming."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from jaxllm import Tokenizer, TokenizerError
from conftest import MULTILINGUAL

FIXED = MULTILINGUAL + [
    "def f(x):\n\treturn  x  +\t1\n\n\n",
    "    indented\n        more\r\n",
    "  leading and trailing  ",
    "こんにちは世界",
    "🎉👍🏽 family: 👨‍👩‍👧",
    "mixed: abc ДЕЖ 中文 العربية हिन्दी",
    "<s> </s> <unk> <pad> <|user|> typed by a user",
    "\x00\x01 control \u200b zero-width",
    "ﬁ ligature and e\u0301 combining",
    "\u2581", " \u2581 a\u2581b\u2581\u2581 c\u2581",  # SentencePiece's own space symbol, typed
    "",
]
# Text a tokenizer must round-trip: everything but lone surrogates (not valid UTF-8).
any_text = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200),
    st.text(alphabet=" \u2581\nab<>|", max_size=30),  # characters SentencePiece treats specially
)


@pytest.mark.parametrize("text", FIXED)
def test_round_trip_fixed_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(any_text)
def test_round_trip_any_text(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids) == text


def test_unigram_model_round_trips(corpus, tmp_path):
    tok = Tokenizer.train([corpus], tmp_path / "uni", vocab_size=400, model_type="unigram")
    assert tok.sp.get_piece_size() == 400
    for text in FIXED:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_only_when_asked(tokenizer):
    user = tokenizer.special_tokens["<|user|>"]
    text = "<|user|>hi<|end|>"
    parsed = tokenizer.encode(text, parse_special=True)
    assert parsed[0] == user and parsed[-1] == tokenizer.special_tokens["<|end|>"]
    assert parsed[1:-1] == tokenizer.encode("hi")
    plain = tokenizer.encode(text)
    assert not set(plain) & set(tokenizer.special_tokens.values())
    assert tokenizer.decode(plain) == text
    assert tokenizer.decode(parsed) == "hi"
    assert tokenizer.decode(parsed, skip_special=False) == text


def test_bos_eos_pad_ids(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    ids = tokenizer.encode("x", add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.decode(ids) == "x"
    assert tokenizer.encode("<s>") != [tokenizer.bos_id]


@settings(max_examples=100, deadline=None)
@given(any_text)
def test_token_bytes_concatenate_to_the_text(tokenizer, text):
    table, lengths = tokenizer.token_bytes()
    ids = tokenizer.encode(text)
    assert b"".join(table[i, : lengths[i]].tobytes() for i in ids) == text.encode("utf-8")


def test_token_bytes_of_special_and_byte_pieces(tokenizer):
    table, lengths = tokenizer.token_bytes()
    assert table.shape == (tokenizer.vocab_size, lengths.max())
    assert lengths[tokenizer.eos_id] == 0 and lengths[tokenizer.special_tokens["<|user|>"]] == 0
    byte_id = tokenizer.sp.piece_to_id("<0xE3>")
    assert lengths[byte_id] == 1 and table[byte_id, 0] == 0xE3


@settings(max_examples=100, deadline=None)
@given(any_text)
def test_stream_decoder_never_splits_a_character(tokenizer, text):
    stream = tokenizer.stream_decoder()
    pieces = [stream.push([i]) for i in tokenizer.encode(text)] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
    assert "".join(pieces) == text


def test_loads_llama_style_model_with_dummy_prefix(llama_tokenizer):
    # Llama/Gemma-style settings: a leading "▁" is added on encode and dropped on decode.
    tok = llama_tokenizer
    assert tok.sp.encode("hello", out_type=str)[0].startswith("\u2581")
    for text in ["hello world", "  two spaces", "こんにちは", "a\nb", "\u2581x", "a \u2581b\u2581", " \u2581"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        stream = tok.stream_decoder()
        assert "".join(stream.push([i]) for i in ids) + stream.flush() == text


def test_llama_style_continuation_keeps_the_space_before_its_first_word(llama_tokenizer):
    tok = llama_tokenizer
    prompt = tok.encode("this is one of", add_bos=True)
    cont = tok.encode("the words")  # "▁the", ...: a word-initial piece first
    assert tok.sp.id_to_piece(cont[0]) == "\u2581the"
    assert tok.decode(cont, after=prompt) == " the words"
    assert tok.decode(prompt) + tok.decode(cont, after=prompt) == tok.sp.decode(prompt + cont) == "this is one of the words"
    stream = tok.stream_decoder(after=prompt)
    assert "".join(stream.push([i]) for i in cont) + stream.flush() == " the words"
    # after nothing but special tokens the continuation starts the text: its dummy space goes
    assert tok.decode(cont, after=[tok.bos_id]) == tok.decode(cont) == "the words"


def ordinary_pieces(tok):
    """Ids of pieces that are text (not byte, control, unknown or unused): their bytes are valid UTF-8."""
    sp = tok.sp
    return [i for i in range(tok.vocab_size) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_prompt_then_continuation_reads_as_sentencepiece_decodes_them_together(tokenizer, llama_tokenizer, data):
    for tok in (tokenizer, llama_tokenizer):
        text_ids = st.sampled_from(ordinary_pieces(tok))
        prompt = data.draw(st.sampled_from([[], [tok.bos_id]])) + data.draw(st.lists(text_ids, max_size=6))
        cont = data.draw(st.lists(text_ids, max_size=8))
        whole = tok.sp.decode(prompt + cont)  # SentencePiece's own reading of the whole sequence: the oracle
        assert tok.decode(prompt) + tok.decode(cont, after=prompt) == whole
        stream = tok.stream_decoder(after=prompt)
        assert tok.decode(prompt) + "".join(stream.push([i]) for i in cont) + stream.flush() == whole


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_streamed_pieces_join_to_the_decoded_text_for_any_ids(tokenizer, llama_tokenizer, data):
    # Random ids are mostly not UTF-8: byte-fallback pieces in any order, split anywhere.
    for tok in (tokenizer, llama_tokenizer):
        byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
        ids = data.draw(st.lists(st.one_of(st.sampled_from(byte_ids), st.integers(0, tok.vocab_size - 1)), max_size=24))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=4)))
        after = data.draw(st.sampled_from([[], [tok.bos_id], tok.encode("x")]))
        stream = tok.stream_decoder(after=after)
        pieces = [stream.push(ids[a:b]) for a, b in zip([0] + cuts, cuts + [len(ids)])] + [stream.flush()]
        assert "".join(pieces) == tok.decode(ids, after=after)


def test_invalid_utf8_streams_as_it_decodes(tokenizer):
    # E3 81 is the start of a three-byte character that never comes
    ids = [tokenizer.sp.piece_to_id("<0xE3>"), tokenizer.sp.piece_to_id("<0x81>")] + tokenizer.encode("a")
    stream = tokenizer.stream_decoder()
    streamed = "".join(stream.push([i]) for i in ids) + stream.flush()
    assert streamed == tokenizer.decode(ids) == b"\xe3\x81a".decode("utf-8", errors="replace")


def test_batch_encode_decode(tokenizer):
    texts = ["a b", "こんにちは", ""]
    assert tokenizer.decode_batch(tokenizer.encode_batch(texts)) == texts
    texts.append("x\u2581y")
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.decode_batch(tokenizer.encode_batch(texts)) == texts


def test_load_from_directory_and_serialized_bytes(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.model")
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tokenizer.fingerprint
    assert again.encode("def f(x): 42") == tokenizer.encode("def f(x): 42")


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([5, tokenizer.vocab_size])


def test_clear_errors(tmp_path, corpus):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "bad.model").write_bytes(b"this is not a model")
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model"):
        Tokenizer.load(tmp_path / "bad.model")
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.train([tmp_path / "nope.txt"], tmp_path / "t", vocab_size=300)
    with pytest.raises(TokenizerError, match="training failed"):
        Tokenizer.train([corpus], tmp_path / "t", vocab_size=10)


def test_a_model_whose_piece_is_not_utf8_is_refused_on_load(tokenizer):
    """A damaged byte inside a piece still parses as a model; using that piece would fail later."""
    piece = next(p for p in map(tokenizer.sp.id_to_piece, range(tokenizer.vocab_size)) if len(p) >= 2 and p.isascii() and p.isalpha())
    entry = b"\n" + bytes([len(piece)]) + piece.encode()  # field 1 of a SentencePiece: the piece's text
    proto = tokenizer.serialized()
    assert proto.count(entry) >= 1
    damaged = proto.replace(entry, entry[:2] + b"\x96" + entry[3:], 1)
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model.*UTF-8"):
        Tokenizer(damaged)
