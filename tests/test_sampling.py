"""Logits processors against plain numpy references (and transformers' processors when installed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxllm.sampling import (
    CANDIDATES, SamplingParams, _cutoff, choose_next, first_argmax, init_history, no_repeat_ngram_mask, bad_words_mask, penalize_frequency_presence,
    penalize_repetition, record, truncate,
)
from jaxllm.errors import GenerationError
from conftest import reference_stack

V = 50


# ---------------------------------------------------------------------------- numpy references


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_top_k(z, k):
    if k <= 0 or k >= len(z):
        return z
    kth = np.sort(z)[::-1][k - 1]
    return np.where(z < kth, -np.inf, z)


def np_top_p(z, p):
    if p >= 1:
        return z
    probs = np_softmax(z)
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(len(z), bool)
    keep[order[before < p]] = True
    keep[order[0]] = True
    return np.where(keep, z, -np.inf)


def np_min_p(z, m):
    probs = np_softmax(z)
    return np.where(probs < m * probs.max(), -np.inf, z)


def np_truncate(z, k, p, m):
    return np_min_p(np_top_p(np_top_k(z, k), p), m)


def np_banned_ngrams(tokens, n):
    if n <= 0 or len(tokens) < n - 1:
        return set()
    prefix = tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else ()
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n - 1]) == prefix}


# ---------------------------------------------------------------------------- greedy choice


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([1, 3, 8]))
def test_first_argmax_is_numpy_argmax_with_ties_and_masked_rows(seed, levels):
    # Few distinct levels make ties common; whole rows of -inf are fully masked rows.
    rng = np.random.default_rng(seed)
    z = rng.integers(0, levels, (6, V)).astype(np.float32)
    z[rng.random((6, V)) < 0.5] = -np.inf
    z[0] = -np.inf
    np.testing.assert_array_equal(jax.jit(first_argmax)(z), np.argmax(z, axis=-1))


def test_first_argmax_never_returns_an_out_of_range_id_for_nan():
    z = np.zeros((2, V), np.float32)
    z[1, 7] = np.nan
    assert list(np.asarray(first_argmax(z))) == [0, V - 1]


# ---------------------------------------------------------------------------- truncation


jit_truncate = jax.jit(truncate)


def truncation_row(vocab):
    """One row's (logits seed, top_k, top_p, min_p, logit scale). Scale 0.01 is nearly flat: top_p
    then keeps thousands of tokens, past the 256 candidates, as does top_k > 256."""
    top_k = sorted({0, 1, 2, 5, 17, 255, 256, 257, 1000, vocab, vocab + 3, -1})
    return st.tuples(
        st.integers(0, 2**31 - 1), st.sampled_from(top_k), st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.1, 1e-4]),
        st.sampled_from([0.0, 0.01, 0.2, 0.9, 1.0]), st.sampled_from([0.01, 0.5, 1.0, 3.0]),
    )


def check_truncation(rows, vocab):
    """truncate() on a batch of `rows` (see truncation_row) against numpy, row by row."""
    z = np.stack([np.random.default_rng(seed).normal(size=vocab) * scale for seed, *_, scale in rows]).astype(np.float32)
    k = np.array([r[1] for r in rows], np.int32)
    p = np.array([r[2] for r in rows], np.float32)
    m = np.array([r[3] for r in rows], np.float32)
    got = np.asarray(jit_truncate(jnp.asarray(z), jnp.asarray(k), jnp.asarray(p), jnp.asarray(m)))
    for b in range(len(rows)):
        # float32 vs float64: a token whose cumulative mass or probability ratio lies within
        # 1e-5 of the threshold may go either way; every other token must agree exactly.
        surely, maybe = (
            np.isfinite(np_truncate(z[b].astype(np.float64), k[b], *nudge(float(p[b]), float(m[b]), sign)))
            for sign in (-1, 1)
        )
        kept = np.isfinite(got[b])
        assert kept[surely].all() and not kept[~maybe].any()
        assert kept.any()  # at least one token is always kept
        np.testing.assert_array_equal(got[b][kept], z[b][kept])


# V = 50 is below the 256 candidates (every row sorts the whole vocabulary); 4096 is a real
# vocabulary's size, where rows take the shortcut through the 256 best logits unless a row of
# the batch needs more, and the batch then sorts everything.
@pytest.mark.parametrize("vocab", [V, 4096])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_truncation_matches_numpy_row_by_row(vocab, data):
    check_truncation(data.draw(st.lists(truncation_row(vocab), min_size=1, max_size=4)), vocab)


def nudge(p, m, sign, eps=1e-5):
    """(top_p, min_p) moved by eps: sign -1 keeps fewer tokens, +1 more."""
    return (p if p >= 1 else p * (1 + sign * eps)), min(1.0, m * (1 - sign * eps))


def test_truncation_at_a_real_vocabulary_size_takes_both_paths():
    vocab = 4096
    sharp = [(1, 0, 0.9, 0.0, 3.0), (2, 40, 0.5, 0.01, 1.0), (3, 255, 1.0, 0.0, 3.0), (4, 0, 0.8, 0.2, 3.0)]
    flat = [(5, 0, 0.9, 0.0, 0.01), (6, 1000, 1.0, 0.0, 1.0)]  # ~3700 and 1000 tokens kept
    for rows, shortcut in ((sharp, True), (sharp[:2] + flat[:1], False), (flat[1:], False)):
        z = np.stack([np.random.default_rng(seed).normal(size=vocab) * scale for seed, *_, scale in rows]).astype(np.float32)
        k, p = jnp.asarray([r[1] for r in rows], jnp.int32), jnp.asarray([r[2] for r in rows], jnp.float32)
        _, fits = _cutoff(jnp.asarray(z), jax.lax.top_k(jnp.asarray(z), CANDIDATES)[0], k, p)
        assert bool(jnp.all(fits)) == shortcut  # the premise: which path this batch takes
        check_truncation(rows, vocab)


def test_top_p_beyond_the_candidate_set_falls_back_to_a_full_sort():
    # A flat distribution over 1000 tokens: top_p = 0.9 keeps ~900 of them, far past 256 candidates.
    z = np.random.default_rng(0).normal(size=(2, 1000)).astype(np.float32) * 0.01
    k, p, m = np.array([0, 400]), np.array([0.9, 1.0], np.float32), np.zeros(2, np.float32)
    got = np.asarray(jit_truncate(jnp.asarray(z), jnp.asarray(k, jnp.int32), jnp.asarray(p), jnp.asarray(m)))
    for b in range(2):
        want = np_truncate(z[b].astype(np.float64), k[b], float(p[b]), 0.0)
        np.testing.assert_array_equal(np.isfinite(got[b]), np.isfinite(want))
    assert 800 < np.isfinite(got[0]).sum() < 1000 and np.isfinite(got[1]).sum() == 400


def test_top_k_keeps_ties_at_the_kth_value():
    z = jnp.asarray([[3.0, 2.0, 2.0, 2.0, 1.0]])
    got = truncate(z, jnp.asarray([2]), jnp.asarray([1.0]), jnp.asarray([0.0]))
    assert np.isfinite(np.asarray(got)).tolist() == [[True, True, True, True, False]]


def test_top_p_always_keeps_the_most_likely_token():
    z = jnp.asarray([[5.0, 1.0, 0.5, 0.0]])
    got = truncate(z, jnp.asarray([0]), jnp.asarray([1e-6]), jnp.asarray([0.0]))
    assert np.isfinite(np.asarray(got)).tolist() == [[True, False, False, False]]


# ---------------------------------------------------------------------------- penalties


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.5, 1.0, 1.3, 2.0]))
def test_repetition_penalty_matches_numpy(seed, theta):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(1, V)).astype(np.float32) * 3
    seen = rng.random((1, V)) < 0.3
    got = np.asarray(penalize_repetition(jnp.asarray(z), jnp.asarray(seen), jnp.asarray([theta], jnp.float32)))
    want = np.where(seen, np.where(z > 0, z / theta, z * theta), z)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_frequency_and_presence_penalties_match_numpy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(2, V)).astype(np.float32)
    counts = rng.integers(0, 4, size=(2, V)).astype(np.int32)
    f, pr = np.array([0.5, 0.0], np.float32), np.array([0.0, 1.5], np.float32)
    got = np.asarray(penalize_frequency_presence(jnp.asarray(z), jnp.asarray(counts), jnp.asarray(f), jnp.asarray(pr)))
    np.testing.assert_allclose(got, z - f[:, None] * counts - pr[:, None] * (counts > 0), rtol=1e-6)


def history_of(rows, buffer_len=8, prompt_len=None):
    """A History holding each row's token list as prompt (left-padded), like the decode loop does."""
    P = prompt_len or max(map(len, rows))
    tokens = np.zeros((len(rows), P), np.int32)
    valid = np.zeros((len(rows), P), bool)
    for r, ids in enumerate(rows):
        if ids:
            tokens[r, P - len(ids) :], valid[r, P - len(ids) :] = ids, True
    return init_history(jnp.asarray(tokens), jnp.asarray(valid), buffer_len, V)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=20), min_size=3, max_size=3), st.lists(st.integers(0, 6), min_size=3, max_size=3))
def test_no_repeat_ngram_matches_brute_force(rows, ns):
    banned = np.asarray(jax.jit(no_repeat_ngram_mask, static_argnums=2)(history_of(rows, prompt_len=20), jnp.asarray(ns), V))
    for r, (ids, n) in enumerate(zip(rows, ns)):
        assert set(np.flatnonzero(banned[r])) == np_banned_ngrams(ids, n), (ids, n)


def test_no_repeat_ngram_sees_generated_tokens_too():
    h = history_of([[1, 2, 3]])
    for t in (1, 2):  # generate "1 2": now "3" after "1 2" would repeat the trigram 1 2 3
        h = record(h, jnp.asarray([t]), jnp.asarray([True]))
    banned = np.asarray(no_repeat_ngram_mask(h, jnp.asarray([3]), V))
    assert set(np.flatnonzero(banned[0])) == {3}


def test_bad_words_ban_the_token_that_would_complete_them():
    sp = SamplingParams.make(2, V, bad_words_ids=[[7], [1, 2, 3], [4, 5]])
    h = history_of([[9, 1, 2], [4, 1]])
    banned = np.asarray(bad_words_mask(h, sp, V))
    assert set(np.flatnonzero(banned[0])) == {3}  # "1 2" is followed by the banned 3
    assert set(np.flatnonzero(banned[1])) == set()  # last token 1: nothing completes
    assert np.asarray(sp.bias)[:, 7].tolist() == [-np.inf, -np.inf]  # one-token bad word: always banned


def test_sampling_params_reject_out_of_range_values():
    for kwargs, name in [
        (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
        (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(seed=-1), "seed"),
        (dict(logit_bias={V: 1.0}), "logit_bias"), (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(temperature=[1.0, 2.0, 3.0]), "temperature"), (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(seed=2**64), "seed is out of range"), (dict(top_k=2**40), "top_k is out of range"),  # were OverflowErrors
    ]:
        with pytest.raises(GenerationError, match=name):
            SamplingParams.make(2, V, **kwargs)


# ---------------------------------------------------------------------------- the whole chain


def test_sampled_frequencies_match_the_processed_distribution():
    # chi-square goodness of fit of top_k + top_p + temperature sampling, one seed per row
    logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n, t, k, p = 30000, 0.9, 4, 0.8
    sp = SamplingParams.make(n, 6, temperature=t, top_k=k, top_p=p, seed=np.arange(n))
    history = init_history(jnp.zeros((n, 1), jnp.int32), jnp.zeros((n, 1), bool), 2, 6)
    tokens, logprobs = jax.jit(choose_next)(jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 6)), sp, history, jnp.zeros((0,), jnp.int32))
    want = np_softmax(np_truncate(logits / t, k, p, 0.0))
    np.testing.assert_allclose(np.exp(np.asarray(logprobs[0])), want, atol=1e-6)
    observed = np.bincount(np.asarray(tokens), minlength=6)
    expected = want * n
    support = expected > 0
    assert observed[~support].sum() == 0
    chi2 = (((observed[support] - expected[support]) ** 2) / expected[support]).sum()
    critical = {1: 10.83, 2: 13.82, 3: 16.27}[support.sum() - 1]  # chi-square, p = 0.001
    assert chi2 < critical


def test_matches_transformers_processors():
    torch, tf = reference_stack()
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, size=(3, 12))
    z = rng.normal(size=(3, V)).astype(np.float32) * 2
    t, k, p, m, theta, n = 0.7, 10, 0.8, 0.05, 1.3, 2
    chain = tf.LogitsProcessorList([
        tf.RepetitionPenaltyLogitsProcessor(theta), tf.NoRepeatNGramLogitsProcessor(n),
        tf.TemperatureLogitsWarper(t), tf.TopKLogitsWarper(k), tf.TopPLogitsWarper(p), tf.MinPLogitsWarper(m),
    ])
    want = chain(torch.from_numpy(ids), torch.from_numpy(z.copy())).numpy()
    sp = SamplingParams.make(3, V, temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=theta, no_repeat_ngram_size=n, seed=0)
    _, logprobs = choose_next(jnp.asarray(z), sp, history_of([list(r) for r in ids]), jnp.zeros((0,), jnp.int32))
    got = np.asarray(logprobs)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    want_lp = want - np.log(np.exp(np.where(np.isfinite(want), want, -np.inf)).sum(-1, keepdims=True))
    np.testing.assert_allclose(got[np.isfinite(got)], want_lp[np.isfinite(want)], atol=1e-5)
