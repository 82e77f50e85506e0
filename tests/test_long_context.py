"""Long context: the ring-buffer cache, attention sinks and chunked prefill against full forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import forward, init_cache, init_params
from jaxllm.generate import left_pad
from jaxllm.kvcache import CacheSpec
from jaxllm.model import prefill
from conftest import tiny_config


def scaled_params(cfg, seed=0):
    params = init_params(cfg, jax.random.key(seed))
    return jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, params)


def full_logits(params, cfg, ids, positions=None):
    positions = np.arange(len(ids)) if positions is None else np.asarray(positions)
    return np.asarray(forward(params, cfg, jnp.asarray([ids], jnp.int32), jnp.asarray(positions)[None])[0][0])


_step = jax.jit(forward, static_argnames="cfg")


def decode_each(params, cfg, cache, prompts, extra):
    """Prefill a left-padded batch, then feed `extra[r][t]` one step at a time: -> per-row logits."""
    tokens, positions = left_pad(prompts, max(map(len, prompts)), pad_id=0)
    logits, cache = _step(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    P = tokens.shape[1]
    rows = [[np.asarray(logits[r, P - len(p) :])] for r, p in enumerate(prompts)]
    nxt = np.asarray([len(p) for p in prompts])
    for t in range(len(extra[0])):
        logits, cache = _step(params, cfg, jnp.asarray([[e[t]] for e in extra]), jnp.asarray(nxt + t)[:, None], cache)
        for r in range(len(prompts)):
            rows[r].append(np.asarray(logits[r]))
    return [np.concatenate(r) for r in rows], cache


# ---------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("position_encoding", ["rope", "alibi"])
def test_ring_decode_equals_banded_full_forward_after_many_wraps(position_encoding):
    W = 6
    cfg = tiny_config(97, sliding_window=W, position_encoding=position_encoding)
    params = scaled_params(cfg)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 97, size=n)) for n in (9, 4, 7)]  # the first is longer than the ring
    extra = [list(rng.integers(1, 97, size=27)) for _ in prompts]  # the ring wraps ~6 times
    got, cache = decode_each(params, cfg, init_cache(cfg, 3, W, ring=True), prompts, extra)
    assert cache.k.shape[3] == W
    for r, (p, e) in enumerate(zip(prompts, extra)):
        np.testing.assert_allclose(got[r], full_logits(params, cfg, p + e), atol=1e-4, rtol=0)
    # the window matters: the same model without it gives other logits
    unbanded = full_logits(params, cfg.replace(sliding_window=0), prompts[0] + extra[0])
    assert np.abs(unbanded[-1] - got[0][-1]).max() > 1e-2


def test_a_linear_cache_with_a_window_model_equals_the_ring():
    cfg = tiny_config(97, sliding_window=5)
    params = scaled_params(cfg)
    prompts, extra = [[5, 6, 7, 8, 9, 10, 11]], [[12, 13, 14, 15, 16, 17, 18, 19]]
    ring, _ = decode_each(params, cfg, init_cache(cfg, 1, 5, ring=True), prompts, extra)
    linear, _ = decode_each(params, cfg, init_cache(cfg, 1, 16), prompts, extra)
    np.testing.assert_allclose(ring[0], linear[0], atol=1e-5)


# ---------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("ring", [False, True])
def test_chunked_prefill_equals_one_shot_prefill(ring):
    W = 12
    cfg = tiny_config(97, sliding_window=W if ring else 0)
    params = scaled_params(cfg, 1)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(1, 97, size=n)) for n in (40, 23)]
    tokens, positions = map(jnp.asarray, left_pad(prompts, 40, pad_id=0))
    slots = W if ring else 49  # the chunked prefill writes 48 columns (whole chunks), then one step
    one, cache1 = prefill(params, cfg, tokens, positions, init_cache(cfg, 2, slots, ring=ring))
    chunked, cache2 = prefill(params, cfg, tokens, positions, init_cache(cfg, 2, slots, ring=ring), chunk=16)  # 40 -> 3 chunks
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(one), atol=1e-4)
    # both caches then decode alike (the chunked one was written 8 padding columns further on)
    step = jnp.asarray([[3], [4]])
    pos = jnp.asarray([[40], [23]])
    a = forward(params, cfg, step, pos, cache1)[0]
    b = forward(params, cfg, step, pos, cache2)[0]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    want = [full_logits(params, cfg, p + [s])[-1] for p, s in zip(prompts, (3, 4))]
    np.testing.assert_allclose(np.asarray(b[:, 0]), np.stack(want), atol=1e-4)
    if ring:
        assert cache2.k.shape[3] == W  # a 40-token prompt through a 12-slot ring


# ---------------------------------------------------------------------------- attention sinks


def kept(ids, t, W, S):
    """The tokens an attention-sinks cache of W slots (S sinks) holds when token t is fed."""
    seen = ids[: t + 1]
    return seen if len(seen) <= W else seen[:S] + seen[len(seen) - (W - S) :]


@pytest.mark.parametrize("position_encoding", ["rope", "alibi"])
@pytest.mark.parametrize("prompt_len", [3, 14])
def test_sinks_decode_equals_a_forward_over_the_kept_tokens(position_encoding, prompt_len):
    # One layer: its keys depend only on each token, so the cached ones equal a fresh forward's.
    W, S = 8, 2
    cfg = tiny_config(97, n_layers=1, position_encoding=position_encoding)
    params = scaled_params(cfg, 3)
    ids = list(np.random.default_rng(prompt_len).integers(1, 97, size=30))
    cache = init_cache(cfg, 1, W, ring=True, sinks=S)
    got, cache = decode_each(params, cfg, cache, [ids[:prompt_len]], [ids[prompt_len:]])
    for t in range(prompt_len - 1, len(ids)):
        keep = kept(ids, t, W, S)
        want = full_logits(params, cfg, keep)[-1]  # at positions 0..len(keep)-1: by slot
        np.testing.assert_allclose(got[0][t], want, atol=1e-4, rtol=0, err_msg=f"token {t}")
    assert cache.k.shape[3] == W


def test_sinks_change_nothing_until_the_window_fills():
    cfg = tiny_config(97)
    params = scaled_params(cfg, 4)
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(1, 97, size=n)) for n in (6, 3)]
    extra = [list(rng.integers(1, 97, size=9)) for _ in prompts]
    got, _ = decode_each(params, cfg, init_cache(cfg, 2, 16, ring=True, sinks=4), prompts, extra)
    for r, (p, e) in enumerate(zip(prompts, extra)):
        np.testing.assert_allclose(got[r], full_logits(params, cfg, p + e), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- through generate


def test_window_model_generates_past_its_context_like_the_banded_reference():
    from jaxllm import generate
    from reference import np_greedy

    cfg = tiny_config(97, sliding_window=8, max_seq_len=32)
    params = scaled_params(cfg, 6)
    prompts = [list(np.random.default_rng(6).integers(1, 97, size=20)), [1, 2, 3]]
    out = generate(params, cfg, prompts, max_new_tokens=24, temperature=0.0, eos_token_id=[], prefill_chunk=16)
    for p, got in zip(prompts, out.token_ids):
        assert got == np_greedy(params, cfg, p, 24)  # 44 positions > max_seq_len 32


def test_chunked_prefill_through_generate_gives_the_same_tokens(cfg, params):
    from jaxllm import generate

    prompts = [list(np.random.default_rng(2).integers(4, cfg.vocab_size, size=40)), [1, 5, 6]]
    kw = dict(max_new_tokens=8, temperature=0.0, eos_token_id=[])
    assert generate(params, cfg, prompts, prefill_chunk=16, **kw).token_ids == generate(params, cfg, prompts, prefill_chunk=0, **kw).token_ids


def test_sinks_generate_five_contexts_long_in_constant_memory(cfg, params):
    from jaxllm import SamplingParams, StopParams, generate, generate_tokens

    n = 5 * cfg.max_seq_len
    tokens, positions = left_pad([[1, 40, 41, 42], [1, 50]], 16, pad_id=0)
    spec = CacheSpec(window=32, sinks=4)
    run = jax.jit(lambda p, t, q: generate_tokens(
        p, cfg, t, q, SamplingParams.make(2, cfg.vocab_size, temperature=0.0, seed=0), StopParams.make(2, n),
        buffer_len=n, chunk=64, spec=spec, num_alternatives=1))
    state = run(params, jnp.asarray(tokens), jnp.asarray(positions))
    assert state.cache.k.shape[3] == 32 and state.cache.pos.shape == (2, 32)
    assert np.all(np.asarray(state.length) == n)
    assert np.all(np.isfinite(np.asarray(state.logits))) and np.all(np.isfinite(np.asarray(state.logprobs)))
    assert int(np.asarray(state.cache.pos).max()) == 4 + n - 1  # every chosen token is fed; the first 4 stay as sinks
    assert sorted(np.asarray(state.cache.pos)[0, :4]) == [0, 1, 2, 3]
    out = generate(params, cfg, [[1, 40, 41, 42], [1, 50]], max_new_tokens=n, temperature=0.0, eos_token_id=[], window=32, sinks=4)
    assert out.token_ids == [np.asarray(state.tokens)[r].tolist() for r in range(2)]


def test_bad_window_settings_raise_clear_errors(cfg, params):
    from jaxllm import GenerationError, generate

    for kw, match in ((dict(window=8, sinks=8), "sinks"), (dict(window=-1), "window"), (dict(sinks=2), "window"),
                      (dict(prefill_chunk=-4), "prefill_chunk")):
        with pytest.raises(GenerationError, match=match):
            generate(params, cfg, [[1, 2]], max_new_tokens=4, **kw)
    with pytest.raises(GenerationError, match="context"):  # without a window the context still binds
        generate(params, cfg, [[1] * 100], max_new_tokens=cfg.max_seq_len)


# ---------------------------------------------------------------------------- int8 cache


def test_int8_quantization_round_trips_within_half_a_step():
    from jaxllm.kvcache import quantize

    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 16)) * jnp.asarray([0.01, 1.0, 30.0])[None, :, None, None]
    q, scale = quantize(x)  # [B, K, T, E]: 3 kv heads of very different ranges
    assert q.dtype == jnp.int8 and scale.shape == (2, 3, 5)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale)[..., None] - np.asarray(x))
    assert np.all(err <= np.asarray(scale)[..., None] / 2 + 1e-7)  # per token and head: small heads stay precise


@pytest.mark.parametrize("ring", [False, True])
def test_int8_cache_decode_logits_stay_close_to_the_float_cache(cfg, ring):
    params = init_params(cfg, jax.random.key(0))  # training's init scale (the shared fixture is 5x sharper)
    rng = np.random.default_rng(9)
    prompts = [list(rng.integers(4, cfg.vocab_size, size=n)) for n in (11, 6)]
    extra = [list(rng.integers(4, cfg.vocab_size, size=20)) for _ in prompts]
    slots = 16 if ring else 32
    want, _ = decode_each(params, cfg, init_cache(cfg, 2, slots, ring=ring, sinks=2 * ring), prompts, extra)
    got, cache = decode_each(params, cfg, init_cache(cfg, 2, slots, "int8", ring=ring, sinks=2 * ring), prompts, extra)
    assert cache.k.dtype == jnp.int8 and cache.k_scale.shape == cache.k.shape[:-1]
    for g, w in zip(got, want):
        # stated tolerance: every logit within 1% of the largest, on average within 0.2% (int8 steps
        # are 1/254 of each token-head's range; the 5x sharper fixture model reaches ~10% at worst,
        # which the greedy test below bounds instead)
        err = np.abs(g - w) / np.abs(w).max()
        assert err.max() < 0.01 and err.mean() < 0.002, (err.max(), err.mean())
        assert not np.array_equal(g, w)  # really quantized


def test_int8_cache_logits_err_no_more_than_int8_rounding_explains(cfg, params):
    # The 5x sharper fixture model, where a small error in the cache moves logits the most.
    # The tolerance comes from int8's step: the numpy reference rounds every cached key and value
    # to int8 steps (max |x| / 127 per token and head), and the logits move by `moved`; the int8
    # cache may move them about as much (rounding in float32 rather than float64 flips a few
    # half-way values), not more.
    from reference import np_forward

    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(4, cfg.vocab_size, size=n)) for n in (11, 6)]
    extra = [list(rng.integers(4, cfg.vocab_size, size=12)) for _ in prompts]
    want, _ = decode_each(params, cfg, init_cache(cfg, 2, 32), prompts, extra)
    got, cache = decode_each(params, cfg, init_cache(cfg, 2, 32, "int8"), prompts, extra)
    assert cache.k.dtype == jnp.int8
    for g, w, p, e in zip(got, want, prompts, extra):
        exact = np_forward(params, cfg, p + e)
        rounded = np_forward(params, cfg, p + e, int8_kv=True)
        moved = np.abs(rounded - exact).max()
        np.testing.assert_allclose(w, exact, atol=1e-3, rtol=0)  # the float cache is the reference's
        assert 1e-3 < moved  # int8 rounding does matter for this model
        assert np.abs(g - w).max() <= 1.25 * moved
        assert np.abs(g - rounded).max() <= 0.25 * moved  # the error is int8 rounding's, logit by logit


def test_int8_cache_rejects_other_dtypes(cfg, params):
    from jaxllm import generate

    with pytest.raises(Exception, match="kv_cache_dtype"):
        generate(params, cfg, [[1, 40]], max_new_tokens=4, temperature=0.0, eos_token_id=[], kv_cache_dtype="int4")


def test_sinks_batch_of_ragged_prompts_equals_each_alone_past_the_window(cfg, params):
    from jaxllm import generate

    prompts = [list(np.random.default_rng(4).integers(4, cfg.vocab_size, size=n)) for n in (30, 5, 17)]
    kw = dict(max_new_tokens=40, temperature=0.0, eos_token_id=[], window=16, sinks=3, prefill_chunk=16)
    together = generate(params, cfg, prompts, **kw).token_ids
    assert together == [generate(params, cfg, [p], **kw).token_ids[0] for p in prompts]
