"""Speculative decoding: exactly the target's greedy output; exactly the target's distribution when sampling."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import GenerationError, SamplingParams, generate, init_params
from jaxllm.sampling import init_history
from jaxllm.speculative import distribution, speculative_generate, speculative_generate_stream
from jaxllm.model import forward
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
    assert copies.timing["tokens_per_block"] > mixed.timing["tokens_per_block"]  # the blocks did fall differently
    assert copies.token_ids == [mixed.token_ids[2]] * 3
    other = speculative_generate(params, cfg, close, cfg, [PROMPTS[0]] * 3, seed=12, temperature=1.0, **kw)
    assert other.token_ids[0] != copies.token_ids[0]  # the seed does decide it


def test_an_identical_draft_accepts_every_sampled_token(cfg, params):
    out = speculative_generate(params, cfg, params, cfg, PROMPTS, num_speculative_tokens=3, max_new_tokens=16,
                               temperature=1.0, top_p=0.9, seed=3, eos_token_id=[])
    assert out.timing["acceptance_rate"] == 1.0
    assert out.timing["tokens_per_block"] > 3.5  # G + 1 = 4 kept per block, but the last block is cut short


def test_sampled_tokens_follow_the_targets_processed_distribution():
    # V = 4: the joint law of the first three tokens (64 outcomes) against the exact one
    cfg = tiny_config(4, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
    target = jax.tree_util.tree_map(lambda x: x * 30 if x.ndim > 1 else x, init_params(cfg, jax.random.key(1)))
    noise = jax.tree_util.tree_map(lambda x: 0.5 * x, init_params(cfg, jax.random.key(2)))
    draft = jax.tree_util.tree_map(lambda a, b: a + b * 30 if a.ndim > 1 else a, target, noise)  # close but not equal
    prompt = [1, 2]
    settings = dict(temperature=0.9, top_k=3, repetition_penalty=1.3)

    # exact: p(t1) p(t2 | t1) p(t3 | t1 t2) with the same processors
    prefixes = [list(p) for n in range(3) for p in itertools.product(range(4), repeat=n)]
    law = {}
    for prefix in prefixes:
        seq = prompt + prefix
        logits = forward(target, cfg, jnp.asarray([seq]), jnp.arange(len(seq))[None])[0][:, -1]
        history = init_history(jnp.asarray([seq]), jnp.ones((1, len(seq)), bool), 4, 4)
        law[tuple(prefix)] = np.asarray(distribution(logits, SamplingParams.make(1, 4, **settings, seed=0), history, jnp.zeros((0,), jnp.int32))[0])[0]
    exact = {t: law[()][t[0]] * law[t[:1]][t[1]] * law[t[:2]][t[2]] for t in itertools.product(range(4), repeat=3)}

    counts = dict.fromkeys(exact, 0)
    rows, calls = 40, 80  # rows are independent of their batch mates, so a wide batch is as good as many calls
    accepted = []
    for c in range(calls):
        out = speculative_generate(target, cfg, draft, cfg, [prompt] * rows, num_speculative_tokens=2, max_new_tokens=3,
                                   eos_token_id=[], seed=list(range(c * rows, (c + 1) * rows)), **settings)
        accepted.append(out.timing["acceptance_rate"])
        for ids in out.token_ids:
            counts[tuple(ids)] += 1
    assert 0.2 < np.mean(accepted) < 0.98  # both the accept and the residual paths ran
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
    other = dcfg.replace(vocab_size=cfg.vocab_size + 1)
    with pytest.raises(GenerationError, match="vocab_size"):
        speculative_generate(params, cfg, init_params(other, jax.random.key(0)), other, PROMPTS)
