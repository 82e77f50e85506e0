"""Generation controls end to end: each checked against a free greedy run (the reference)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxllm import generate, generate_stream, init_params
from jaxllm.compilation import CompileCounter
from jaxllm.stopping import cut_at_stop, holdback, repetition_hit
from conftest import tiny_config
from reference import np_forward

PROMPTS = ["def f(x):", "the of and", "こんにちは"]
GREEDY = dict(max_new_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def free(params, cfg, tokenizer):
    """Unconstrained greedy outputs: what every control is compared against."""
    return generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], **GREEDY)


def ascii_piece(tokenizer, i):
    table, lengths = tokenizer.token_bytes()
    b = table[i, : lengths[i]].tobytes()
    return len(b) >= 2 and all(32 <= c < 127 for c in b)


@pytest.mark.parametrize("span", [2, 3])
def test_stop_string_across_token_boundaries_stops_at_the_right_token(params, cfg, tokenizer, free, span):
    ids = free.token_ids[0]
    text = lambda n: tokenizer.decode(ids[:n])
    # a stop string that starts inside token k and ends inside token k + span - 1
    k = next(k for k in range(2, len(ids) - span) if ascii_piece(tokenizer, ids[k]) and ascii_piece(tokenizer, ids[k + span - 1]))
    start, end = len(text(k)) + 1, len(text(k + span)) - 1
    stop = text(k + span)[start:end]
    assert text(k + span - 1).find(stop) < 0  # not complete before the token that finishes it
    out = generate(params, cfg, PROMPTS[:1], tokenizer=tokenizer, eos_token_id=[], stop=[stop, "never appears \x01"], **GREEDY)
    assert out.finish_reasons == ["stop"]
    assert out.token_ids[0] == ids[: k + span]
    assert out.texts[0] == text(k + span)[:start]
    kept = generate(params, cfg, PROMPTS[:1], tokenizer=tokenizer, eos_token_id=[], stop=[stop], include_stop_str_in_output=True, **GREEDY)
    assert kept.texts[0] == text(k + span)[:end]


def test_eos_list_and_min_new_tokens(params, cfg, tokenizer, free):
    ids = free.token_ids[1]
    eos = ids[2]
    first = ids.index(eos)
    out = generate(params, cfg, PROMPTS[1:2], tokenizer=tokenizer, eos_token_id=[eos], **GREEDY)
    assert out.token_ids[0] == ids[: first + 1] and out.finish_reasons == ["eos"]
    late = generate(params, cfg, PROMPTS[1:2], tokenizer=tokenizer, eos_token_id=[eos], min_new_tokens=first + 3, **GREEDY)
    assert eos not in late.token_ids[0][: first + 3]
    assert len(late.token_ids[0]) > first + 3 or late.finish_reasons == ["length"]


def test_repetition_stop_fires_on_a_looping_model(params, cfg, tokenizer):
    loop = tokenizer.encode("ab")  # allow only these tokens: greedy must cycle among them
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, allowed_token_ids=loop[:1], stop_on_repetition=5, eos_token_id=[], **GREEDY)
    assert out.finish_reasons == ["repetition"] * 3
    assert out.token_ids == [[loop[0]] * 5] * 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=0, max_size=24), st.integers(2, 5))
def test_repetition_detection_matches_brute_force(tokens, r):
    def brute(seq):
        return any(len(seq) >= n * r and all(seq[-i - 1] == seq[-i - 1 - n] for i in range(n * (r - 1))) for n in range(1, 9))

    padded = np.zeros(32, np.int32)
    valid = np.zeros(32, bool)
    if tokens:
        padded[-len(tokens):], valid[-len(tokens):] = tokens, True
    got = repetition_hit(jnp.asarray(padded[None]), jnp.asarray(valid[None]), jnp.asarray([r]))
    assert bool(got[0]) == brute(tokens)


def test_custom_predicate_stops_rows(params, cfg, tokenizer, free):
    # a token row 0 emits after a few steps and rows 1 and 2 never do
    target = next(t for t in free.token_ids[0][3:] if t not in free.token_ids[1] + free.token_ids[2])
    stop_fn = lambda h: jnp.any((h.tokens == target) & h.valid & (jnp.arange(h.tokens.shape[1]) >= h.prompt_len), axis=1)
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], stop_fn=stop_fn, **GREEDY)
    first = free.token_ids[0].index(target)
    assert first < len(free.token_ids[0]) - 1
    assert out.token_ids[0] == free.token_ids[0][: first + 1] and out.finish_reasons[0] == "custom"
    assert out.token_ids[1:] == free.token_ids[1:] and out.finish_reasons[1:] == ["length", "length"]


def test_banned_tokens_never_appear_when_sampling(params, cfg, tokenizer, free):
    banned = sorted(set(sum(free.token_ids, [])))[:20]
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], bad_words_ids=[[b] for b in banned],
                   temperature=1.5, max_new_tokens=24, seed=0, num_return_sequences=3)
    assert not set(sum(out.token_ids, [])) & set(banned)
    allowed = banned[:3]
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], allowed_token_ids=allowed, temperature=1.5, max_new_tokens=24, seed=0)
    assert set(sum(out.token_ids, [])) <= set(allowed)


def test_multi_token_bad_word_is_never_completed(params, cfg, tokenizer, free):
    ids = free.token_ids[0]
    bigram = ids[3:5]
    out = generate(params, cfg, PROMPTS[:1], tokenizer=tokenizer, eos_token_id=[], bad_words_ids=[bigram], **GREEDY)
    got = out.token_ids[0]
    assert got[:4] == ids[:4] and got[4] != ids[4]
    assert all(got[i : i + 2] != bigram for i in range(len(got) - 1))


def test_no_repeat_ngram_end_to_end(params, cfg, tokenizer):
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], no_repeat_ngram_size=2, **GREEDY)
    for prompt, got in zip(PROMPTS, out.token_ids):
        seq = tokenizer.encode(prompt, add_bos=True) + got
        bigrams = [tuple(seq[i : i + 2]) for i in range(len(seq) - 1)]
        assert len(bigrams) == len(set(bigrams))


def test_logit_bias_and_repetition_penalty_change_greedy_choices(params, cfg, tokenizer, free):
    favored = free.token_ids[0][0] + 1
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], logit_bias={favored: 100.0}, **GREEDY)
    assert all(t == [favored] * 24 for t in out.token_ids)
    out = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], repetition_penalty=1e6, **GREEDY)
    for prompt, got in zip(PROMPTS, out.token_ids):  # an enormous penalty: nothing seen is ever chosen
        assert len(set(got)) == len(got) and not set(got) & set(tokenizer.encode(prompt, add_bos=True))


def test_greedy_logprobs_equal_the_reference_log_softmax(params, cfg, tokenizer, free):
    out = generate(params, cfg, PROMPTS[:1], tokenizer=tokenizer, eos_token_id=[], logprobs=3, **GREEDY)
    seq = tokenizer.encode(PROMPTS[0], add_bos=True) + out.token_ids[0]
    ref = np_forward(params, cfg, seq)
    P = len(seq) - 24
    for t in range(24):
        z = ref[P - 1 + t]
        lse = np.log(np.exp(z - z.max()).sum()) + z.max()
        assert out.logprobs[0][t] == pytest.approx(z[seq[P + t]] - lse, abs=1e-4)
        best = np.argsort(-z)[:3]
        assert list(out.top_logprobs[0][t]) == best.tolist()


def test_rows_do_not_leak_settings_into_each_other(params, cfg, tokenizer, free):
    mixed = generate(params, cfg, PROMPTS, tokenizer=tokenizer, eos_token_id=[], max_new_tokens=24,
                     temperature=[0.0, 1.2, 0.0], top_k=[0, 5, 0], repetition_penalty=[1.0, 1.5, 1.0],
                     presence_penalty=[0.0, 0.0, 0.0], seed=[0, 1, 2])
    assert mixed.token_ids[0] == free.token_ids[0] and mixed.token_ids[2] == free.token_ids[2]


def test_num_return_sequences_gives_independent_reproducible_samples(params, cfg, tokenizer):
    kw = dict(tokenizer=tokenizer, eos_token_id=[], max_new_tokens=12, temperature=1.0, seed=5, num_return_sequences=3)
    a = generate(params, cfg, PROMPTS[:2], **kw)
    b = generate(params, cfg, PROMPTS[:2], **kw)
    assert a.token_ids == b.token_ids and a.prompt_index == [0, 0, 0, 1, 1, 1]
    assert len({tuple(t) for t in a.token_ids[:3]}) == 3


def test_streamed_text_equals_the_final_text(params, cfg, tokenizer, free):
    stop = tokenizer.decode(free.token_ids[1])[5:9]
    kw = dict(tokenizer=tokenizer, eos_token_id=[], stop=[stop], max_new_tokens=24, temperature=0.0, chunk=4)
    pieces = {r: [] for r in range(3)}
    for row, item in generate_stream(params, cfg, PROMPTS, **kw):
        if row >= 0:
            pieces[row].append(item)
            assert stop not in "".join(pieces[row])  # a stop string is never shown
        else:
            result = item
    assert ["".join(pieces[r]) for r in range(3)] == result.texts == generate(params, cfg, PROMPTS, **kw).texts
    assert result.finish_reasons[1] == "stop"


def streamed_and_final(params, cfg, prompts, **kw):
    """-> (each row's streamed pieces joined, the stream's final result)."""
    pieces = {}
    for row, item in generate_stream(params, cfg, prompts, **kw):
        if row >= 0:
            pieces[row] = pieces.get(row, "") + item
        else:
            result = item
    return [pieces.get(r, "") for r in range(len(result.token_ids))], result


def test_streamed_text_equals_the_final_text_for_invalid_utf8(params, cfg, tokenizer):
    # Sampling among the bytes E3 and 81 and a few words: outputs are full of characters begun
    # and never finished (E3 81 then "a"), which a decoder may replace by one U+FFFD or two.
    table, lengths = tokenizer.token_bytes()
    allowed = [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xE3, 0x81)] + tokenizer.encode(" the of a")
    kw = dict(tokenizer=tokenizer, eos_token_id=[], max_new_tokens=24, temperature=1.0, seed=[0, 1, 2],
              allowed_token_ids=allowed, chunk=4)
    streamed, result = streamed_and_final(params, cfg, PROMPTS, **kw)
    raw = [b"".join(table[i, : lengths[i]].tobytes() for i in ids) for ids in result.token_ids]
    assert any(re.search(rb"\xe3\x81(?![\x80-\xbf])", r) for r in raw)  # the inputs do reach the case at issue
    assert streamed == result.texts == generate(params, cfg, PROMPTS, **kw).texts
    assert result.texts == [r.decode("utf-8", errors="replace") for r in raw]


def test_llama_style_texts_read_as_the_prompt_continued(llama_tokenizer):
    tok = llama_tokenizer
    cfg = tiny_config(tok.vocab_size)
    params = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(cfg, jax.random.key(1)))
    words = [i for i in range(tok.vocab_size) if tok.sp.id_to_piece(i).startswith("\u2581") and len(tok.sp.id_to_piece(i)) > 1]
    prompts = ["this is one of", "こんにちは", ""]  # "" is the BOS alone: the output starts the text
    kw = dict(tokenizer=tok, eos_token_id=[], max_new_tokens=6, temperature=1.0, seed=3, allowed_token_ids=words, chunk=4)
    streamed, result = streamed_and_final(params, cfg, prompts, **kw)
    assert streamed == result.texts == generate(params, cfg, prompts, **kw).texts
    for prompt, ids, text in zip(prompts, result.token_ids, result.texts):
        whole = tok.sp.decode(tok.encode(prompt, add_bos=True) + ids)  # SentencePiece reading prompt and output together
        assert prompt + text == whole
        assert text.startswith(" ") == bool(prompt)  # every output begins with a word-initial "▁" piece


def test_changing_any_sampling_value_does_not_recompile(params, cfg, tokenizer):
    base = dict(tokenizer=tokenizer, max_new_tokens=8, eos_token_id=[2], stop=["xyz"], bad_words_ids=[[5, 6]], seed=0)
    generate(params, cfg, PROMPTS, **base)
    variants = [
        dict(temperature=0.0), dict(temperature=0.3, top_k=5), dict(top_p=0.5), dict(min_p=0.1),
        dict(repetition_penalty=1.3), dict(presence_penalty=0.5, frequency_penalty=0.2), dict(no_repeat_ngram_size=3),
        dict(min_new_tokens=4), dict(logit_bias={7: 2.0}), dict(allowed_token_ids=[5, 6, 7]), dict(seed=9),
        dict(stop=["abc"]), dict(bad_words_ids=[[8, 9]]), dict(max_new_tokens=5), dict(stop_on_repetition=3),
    ]
    with CompileCounter() as c:
        for v in variants:
            generate(params, cfg, PROMPTS, **{**base, **v})
    assert c.count == 0


def test_cut_at_stop_and_holdback():
    assert cut_at_stop("hello world. bye", ["world", "o w"]) == "hell"
    assert cut_at_stop("a.b", ["."], include=True) == "a."
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert holdback("the end is ne", ["near"]) == 2 and holdback("abc", ["zz"]) == 0
