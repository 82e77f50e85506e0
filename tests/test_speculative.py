"""Speculative decoding: exactly the target's greedy output; exactly the target's distribution when sampling."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import GenerationError, SamplingParams, generate, generate_stream, init_params
from jaxllm.kvcache import init_cache, per_row, rewind, take_rows, write_positions
from jaxllm.sampling import init_history, per_row as per_row_steps, record
from jaxllm.speculative import distribution, lookup, speculative_generate, speculative_generate_stream
from jaxllm.model import forward
from jaxllm.request import Draft
from conftest import tiny_config

PROMPTS = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58], [1, 60]]


@pytest.fixture(scope="module")
def draft(cfg):
    dcfg = cfg.replace(n_layers=1)
    return jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, init_params(dcfg, jax.random.key(9))), dcfg


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_output_equals_the_targets_own(cfg, params, tokenizer, draft, gamma):
    dparams, dcfg = draft
    kw = dict(tokenizer=tokenizer, max_new_tokens=20, temperature=0.0, stop=["zz"], repetition_penalty=1.2)
    want = generate(params, cfg, PROMPTS, **kw)
    got = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, num_speculative_tokens=gamma, **kw)
    assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons and got.texts == want.texts
    assert got.timing["acceptance_rate"] < 1.0  # a random draft: the rejection path ran
    if gamma == 4:
        same = speculative_generate(params, cfg, params, cfg, PROMPTS, num_speculative_tokens=gamma, **kw)
        assert same.token_ids == want.token_ids and same.timing["acceptance_rate"] == 1.0


def test_generate_runs_a_request_with_a_draft_as_speculative_decoding(cfg, params, draft):
    dparams, dcfg = draft
    kw = dict(max_new_tokens=12, temperature=0.0, eos_token_id=[], num_speculative_tokens=3)
    got = generate(params, cfg, PROMPTS, draft=Draft(dparams, dcfg), **kw)
    assert got.timing["target_forwards"] > 0  # speculative decoding ran
    assert got.token_ids == speculative_generate(params, cfg, dparams, dcfg, PROMPTS, **kw).token_ids


def test_streamed_pieces_concatenate_to_the_text(cfg, params, tokenizer, draft):
    dparams, dcfg = draft
    kw = dict(tokenizer=tokenizer, max_new_tokens=20, temperature=0.0, stop=["zz"], repetition_penalty=1.2, num_speculative_tokens=4)
    whole = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, **kw)
    pieces = list(speculative_generate_stream(params, cfg, dparams, dcfg, PROMPTS, **kw))
    *pieces, (last, result) = pieces
    assert last == -1 and result.texts == whole.texts
    for row, text in enumerate(whole.texts):
        assert "".join(piece for r, piece in pieces if r == row) == text
    assert len(pieces) > len(PROMPTS)  # 20 tokens come in two chunks: some row was streamed in several pieces


def test_logprobs_are_the_targets_own_from_a_full_forward(cfg, params, draft):
    dparams, dcfg = draft
    out = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, num_speculative_tokens=4, max_new_tokens=12,
                               temperature=0.0, eos_token_id=[], logprobs=2, num_return_sequences=2)
    assert out.prompt_index == [0, 0, 1, 1, 2, 2]
    for row, ids in enumerate(out.token_ids):
        seq = PROMPTS[out.prompt_index[row]] + ids
        logits, _ = forward(params, cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None])  # no cache, no draft
        logp = np.asarray(jax.nn.log_softmax(logits[0, len(seq) - len(ids) - 1 : -1], axis=-1))  # [T, V]
        np.testing.assert_allclose(out.logprobs[row], logp[np.arange(len(ids)), ids], atol=1e-4)
        for t, alternatives in enumerate(out.top_logprobs[row]):
            best = np.argsort(-logp[t])[:2]
            assert sorted(alternatives) == sorted(best.tolist())
            np.testing.assert_allclose([alternatives[i] for i in best], logp[t, best], atol=1e-4)


# The cache options apply to both models; greedy output, logprobs and finish reasons must stay the
# target's own with the same options. 12-slot windows: the 20 new tokens wrap the ring.
CACHES = {"ring with sinks": dict(window=12, sinks=2), "int8 ring": dict(window=12, kv_cache_dtype="int8")}


@pytest.mark.parametrize("cache", CACHES)
def test_greedy_with_a_ring_sinks_or_int8_cache_equals_the_target_alone_with_it(cfg, params, draft, cache):
    dparams, dcfg = draft
    kw = dict(max_new_tokens=20, temperature=0.0, eos_token_id=[], num_return_sequences=2, logprobs=1, **CACHES[cache])
    want = generate(params, cfg, PROMPTS, **kw)
    got = speculative_generate(params, cfg, dparams, dcfg, PROMPTS, num_speculative_tokens=4, **kw)
    assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons
    np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(want.logprobs), atol=1e-4)
    assert got.timing["acceptance_rate"] < 1.0  # rejected drafts were taken back from the ring
    # the cache options matter: the target with a plain cache says otherwise
    assert generate(params, cfg, PROMPTS, **{**kw, **dict(window=0, sinks=0)}).token_ids != want.token_ids


def test_a_sampled_row_is_the_same_whatever_its_batch_mates(cfg, params, tokenizer):
    # A draft close to the target: a sampled row accepts most of its drafts, so its blocks are long
    # when its mates are copies of it, and short when a mate rejects early (a greedy row, another
    # temperature). Its tokens must not care where its blocks start.
    noise = init_params(cfg, jax.random.key(9))
    close = jax.tree_util.tree_map(lambda a, b: a + 0.5 * b if a.ndim > 1 else a, params, noise)
    kw = dict(tokenizer=tokenizer, max_new_tokens=20, stop=["zz"], repetition_penalty=1.2, num_speculative_tokens=4, eos_token_id=[])
    copies = speculative_generate(params, cfg, close, cfg, [PROMPTS[0]] * 3, seed=11, temperature=1.0, **kw)
    mixed = speculative_generate(params, cfg, close, cfg, [PROMPTS[2], PROMPTS[1], PROMPTS[0]], seed=[7, 8, 11],
                                 temperature=[1.5, 0.0, 1.0], **kw)
    assert copies.timing["tokens_per_block"] > mixed.timing["tokens_per_block"]  # the mates accept less
    assert copies.token_ids == [mixed.token_ids[2]] * 3
    other = speculative_generate(params, cfg, close, cfg, [PROMPTS[0]] * 3, seed=12, temperature=1.0, **kw)
    assert other.token_ids[0] != copies.token_ids[0]  # the seed does decide it


def test_an_identical_draft_accepts_every_sampled_token(cfg, params):
    out = speculative_generate(params, cfg, params, cfg, PROMPTS, num_speculative_tokens=3, max_new_tokens=16,
                               temperature=1.0, top_p=0.9, seed=3, eos_token_id=[])
    assert out.timing["acceptance_rate"] == 1.0
    assert out.timing["tokens_per_block"] > 3.5  # G + 1 = 4 kept per block, but the last block is cut short


@pytest.mark.parametrize("drafter", ["draft model", "prompt lookup"])
def test_sampled_tokens_follow_the_targets_processed_distribution(drafter):
    # V = 4: the joint law of the first three tokens (64 outcomes) against the exact one. Prompt
    # lookup proposes with certainty (q one-hot): accepted with probability p(x), else drawn from p
    # without x.
    cfg = tiny_config(4, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
    target = jax.tree_util.tree_map(lambda x: x * 30 if x.ndim > 1 else x, init_params(cfg, jax.random.key(1)))
    noise = jax.tree_util.tree_map(lambda x: 0.5 * x, init_params(cfg, jax.random.key(2)))
    draft = jax.tree_util.tree_map(lambda a, b: a + b * 30 if a.ndim > 1 else a, target, noise)  # close but not equal
    prompt = [1, 2, 3, 1, 2] if drafter == "prompt lookup" else [1, 2]
    drafting = dict(prompt_lookup_max=2) if drafter == "prompt lookup" else {}
    dparams, dcfg = (None, None) if drafter == "prompt lookup" else (draft, cfg)
    settings = dict(temperature=0.9, top_k=3, repetition_penalty=1.3)

    # exact: p(t1) p(t2 | t1) p(t3 | t1 t2) with the same processors
    prefixes = [list(p) for n in range(3) for p in itertools.product(range(4), repeat=n)]
    law = {}
    for prefix in prefixes:
        seq = prompt + prefix
        logits = forward(target, cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None])[0][:, -1]
        history = init_history(jnp.asarray([seq[: len(prompt)]]), jnp.ones((1, len(prompt)), bool), 4, 4)
        for t in prefix:
            history = record(history, jnp.asarray([t]), jnp.asarray([True]))
        law[tuple(prefix)] = np.asarray(distribution(logits, SamplingParams.make(1, 4, **settings, seed=0), history, jnp.zeros((0,), jnp.int32))[0])[0]
    exact = {t: law[()][t[0]] * law[t[:1]][t[1]] * law[t[:2]][t[2]] for t in itertools.product(range(4), repeat=3)}

    counts = dict.fromkeys(exact, 0)
    rows, calls = 40, 80  # rows are independent of their batch mates, so a wide batch is as good as many calls
    accepted = []
    for c in range(calls):
        out = speculative_generate(target, cfg, dparams, dcfg, [prompt] * rows, num_speculative_tokens=2, max_new_tokens=3,
                                   eos_token_id=[], seed=list(range(c * rows, (c + 1) * rows)), **settings, **drafting)
        accepted.append(out.timing["acceptance_rate"])
        for ids in out.token_ids:
            counts[tuple(ids)] += 1
    assert 0.1 < np.mean(accepted) < 0.98  # both the accept and the residual paths ran
    n = rows * calls
    expected = {t: p * n for t, p in exact.items()}
    small = [t for t in exact if expected[t] < 5]
    assert sum(counts[t] for t in exact if exact[t] == 0) == 0  # impossible outcomes never happen
    cells = [(counts[t], expected[t]) for t in exact if expected[t] >= 5]
    cells.append((sum(counts[t] for t in small), sum(expected[t] for t in small)))
    chi2 = sum((o - e) ** 2 / e for o, e in cells if e > 0)
    dof = sum(1 for _, e in cells if e > 0) - 1
    assert chi2 < dof + 4.5 * np.sqrt(2 * dof), (chi2, dof)  # ~ p < 0.001 for these dof


def test_bad_arguments(cfg, params, draft):
    dparams, dcfg = draft
    with pytest.raises(GenerationError, match="num_speculative_tokens"):
        speculative_generate(params, cfg, dparams, dcfg, PROMPTS, num_speculative_tokens=0)
    with pytest.raises(GenerationError, match="needs a draft model or prompt_lookup_max"):
        speculative_generate(params, cfg, None, None, PROMPTS)
    with pytest.raises(GenerationError, match="draft and prompt_lookup_max"):
        speculative_generate(params, cfg, dparams, dcfg, PROMPTS, prompt_lookup_max=2)
    other = dcfg.replace(vocab_size=cfg.vocab_size + 1)
    with pytest.raises(GenerationError, match="vocab_size"):
        speculative_generate(params, cfg, init_params(other, jax.random.key(0)), other, PROMPTS)


# ---------------------------------------------------------------------------- prompt lookup


def brute_force_lookup(seq: list[int], max_ngram: int, count: int) -> list[int]:
    """What followed the most recent earlier occurrence of seq's last n tokens (largest n first);
    past the present, the matched stretch repeats; no match: the last token again."""
    for n in range(min(max_ngram, len(seq)), 0, -1):
        for end in range(len(seq) - 2, n - 2, -1):  # where the occurrence ends: before the suffix's own end
            if seq[end - n + 1 : end + 1] == seq[-n:]:
                stretch = seq[end + 1 :]
                return [stretch[k % len(stretch)] for k in range(count)]
    return [seq[-1]] * count


def test_lookup_proposes_what_followed_the_last_match():
    rng = np.random.default_rng(0)
    for trial in range(30):
        B, P, V = 3, 12, int(rng.integers(2, 6))  # a small vocabulary: matches of every length
        lengths = rng.integers(1, P + 1, B)
        prompt = np.zeros((B, P), np.int32)
        valid = np.zeros((B, P), bool)
        for r, n in enumerate(lengths):  # left-padded with tokens that must never match
            prompt[r, : P - n] = 99
            prompt[r, P - n :] = rng.integers(0, V, n)
            valid[r, P - n :] = True
        history = per_row_steps(init_history(jnp.asarray(prompt), jnp.asarray(valid), 10, 100))
        outputs = [[] for _ in range(B)]
        for _ in range(int(rng.integers(0, 8))):  # rows emit different numbers of tokens
            token, active = rng.integers(0, V, B), rng.random(B) < 0.7
            history = record(history, jnp.asarray(token, jnp.int32), jnp.asarray(active))
            for r in np.flatnonzero(active):
                outputs[r].append(int(token[r]))
        max_ngram, count = int(rng.integers(1, 4)), 5
        got = np.asarray(lookup(history, max_ngram, count))
        for r in range(B):
            seq = prompt[r, P - lengths[r] :].tolist() + outputs[r]
            assert got[r].tolist() == brute_force_lookup(seq, max_ngram, count), (trial, r, seq)


# Prompts that repeat, and a repetition penalty below 1 (tokens already seen are favoured): the
# random model's greedy output loops, so drafts are accepted in some blocks and rejected in others.
LOOPING = [[1, 40, 41, 42, 43, 40, 41, 42, 43, 40, 41], [1, 50, 51, 52, 53, 54, 55, 56, 57, 58], [1, 60], [1, 7, 8, 9, 7, 8, 9, 7, 8]]
LOOKUP_CASES = {
    "plain": dict(stop=["zz"]),
    "n=2, logprobs": dict(num_return_sequences=2, logprobs=2),
    "ring with sinks": dict(window=12, sinks=2),
    "int8 ring": dict(window=12, kv_cache_dtype="int8"),
    "int8 linear": dict(kv_cache_dtype="int8"),
    "json": dict(json=True, repetition_penalty=1.0),
}


@pytest.mark.parametrize("case", LOOKUP_CASES)
def test_prompt_lookup_greedy_output_equals_the_targets_own(cfg, params, tokenizer, case):
    kw = {**dict(tokenizer=tokenizer, max_new_tokens=20, temperature=0.0, eos_token_id=[], repetition_penalty=0.3),
          **LOOKUP_CASES[case]}
    want = generate(params, cfg, LOOPING, **kw)
    got = generate(params, cfg, LOOPING, prompt_lookup_max=3, num_speculative_tokens=4, **kw)  # generate runs it
    assert got.token_ids == want.token_ids and got.finish_reasons == want.finish_reasons and got.texts == want.texts
    assert 0 < got.timing["acceptance_rate"] < 1  # drafts were accepted and taken back
    if "logprobs" in kw:
        np.testing.assert_allclose(np.concatenate(got.logprobs), np.concatenate(want.logprobs), atol=1e-4)
        assert [sorted(a) for row in got.top_logprobs for a in row] == [sorted(a) for row in want.top_logprobs for a in row]


def test_prompt_lookup_streams_the_text_it_returns(cfg, params, tokenizer):
    kw = dict(tokenizer=tokenizer, max_new_tokens=20, temperature=0.0, repetition_penalty=0.3, prompt_lookup_max=2)
    *pieces, (last, result) = list(generate_stream(params, cfg, LOOPING, **kw))
    assert last == -1 and result.texts == generate(params, cfg, LOOPING, **kw).texts
    for row, text in enumerate(result.texts):
        assert "".join(piece for r, piece in pieces if r == row) == text


def test_a_stream_goes_on_in_chunks_after_the_row_ahead_of_it_finishes(cfg, params, tokenizer):
    # Row 0 accepts long runs of drafts and ends (at an EOS chosen from its own late output) far
    # ahead of row 1; row 1 must still come out a chunk at a time, not in one piece at the end.
    prompts, kw = [LOOPING[2], LOOPING[1]], dict(max_new_tokens=40, temperature=0.0, repetition_penalty=0.2, prompt_lookup_max=3)
    ahead, behind = generate(params, cfg, prompts, eos_token_id=[], **kw).token_ids
    eos = next(t for i, t in enumerate(ahead) if i >= 30 and t not in ahead[:i] and t not in behind)
    pieces = list(generate_stream(params, cfg, prompts, tokenizer=tokenizer, eos_token_id=[eos], chunk=2, **kw))[:-1]
    last_of_row_0 = max(i for i, (row, _) in enumerate(pieces) if row == 0)
    assert sum(row == 1 for row, _ in pieces[last_of_row_0:]) >= 4


def test_each_row_keeps_the_drafts_it_accepted(cfg, params, tokenizer):
    # Each row keeps its own accepted drafts: the same tokens as when every row keeps only the
    # fewest any row accepted (a cursor shared by the batch), in fewer target forwards, and each
    # row's tokens are those it gets alone.
    kw = dict(max_new_tokens=24, temperature=0.0, eos_token_id=[], repetition_penalty=0.2, prompt_lookup_max=3)
    own = speculative_generate(params, cfg, None, None, LOOPING, **kw)
    shared = speculative_generate(params, cfg, None, None, LOOPING, batch_minimum=True, **kw)
    assert own.token_ids == shared.token_ids
    assert own.timing["target_forwards"] < shared.timing["target_forwards"]
    assert own.timing["tokens_per_block"] > shared.timing["tokens_per_block"]
    for row, prompt in enumerate(LOOPING):
        assert speculative_generate(params, cfg, None, None, [prompt], **kw).token_ids == [own.token_ids[row]]


def test_every_lookup_row_is_the_same_whatever_its_batch_mates(cfg, params):
    # Mates that change the batch's layout (a 20-token prompt: a 32-column block instead of 16),
    # finish early (a stop on the first token of row 1) or run greedy next to sampled rows.
    prompts = LOOPING + [list(range(1, 21))]
    seeds, temperatures = [1, 2, 3, 4, 5], [0.0, 1.5, 0.7, 0.7, 1.0]
    kw = dict(max_new_tokens=20, eos_token_id=[], repetition_penalty=0.2, prompt_lookup_max=3, top_k=3)
    mixed = speculative_generate(params, cfg, None, None, prompts, seed=seeds, temperature=temperatures, **kw)
    assert mixed.timing["acceptance_rate"] > 0
    alone = [speculative_generate(params, cfg, None, None, [p], seed=s, temperature=t, **kw).token_ids[0]
             for p, s, t in zip(prompts, seeds, temperatures)]
    assert mixed.token_ids == alone
    assert len(set(map(tuple, alone))) == len(alone)


def test_a_per_row_cursor_writes_and_takes_back_each_rows_own_slots(cfg):
    # The cache's slot for column c (linear: c; ring: sinks + c % ring slots) per row, against numpy
    for ring, sinks in [(False, 0), (True, 0), (True, 2)]:
        cache = per_row(init_cache(cfg, 2, 10, ring=ring, sinks=sinks, lookahead=3))
        cursor = np.array([3, 9 if ring else 6])  # a ring wraps row 1
        cache = dataclasses.replace(cache, cursor=jnp.asarray(cursor, jnp.int32))
        positions = np.array([[5, 6, 7], [20, 21, 22]])
        written = write_positions(cache, jnp.asarray(positions, jnp.int32))
        want = np.full((2, 10), -1)
        slot = lambda c: sinks + c % (10 - sinks) if ring else c
        for r in range(2):
            for t in range(3):
                want[r, slot(cursor[r] + t)] = positions[r, t]
        np.testing.assert_array_equal(np.asarray(written.pos), want)
        # row 0 keeps one of its three columns, row 1 all three
        back = rewind(dataclasses.replace(written, cursor=written.cursor + 3), jnp.asarray(cursor + [1, 3], jnp.int32), 3)
        if ring:  # a ring marks what it took back empty (a linear cache's next writes cover it)
            want[0, slot(cursor[0] + 1)] = want[0, slot(cursor[0] + 2)] = -1
        np.testing.assert_array_equal(np.asarray(back.pos), want)
        np.testing.assert_array_equal(np.asarray(back.cursor), cursor + [1, 3])
        swapped = take_rows(back, jnp.asarray([1, 0]))  # rows keep their own cursors when reordered
        np.testing.assert_array_equal(np.asarray(swapped.cursor), (cursor + [1, 3])[::-1])
