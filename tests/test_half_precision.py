"""float16 and bfloat16 compute on every attention backend reachable on a CPU (the einsum, XLA's,
the Pallas kernels in interpret mode): finite everywhere, and as close to float32 as the dtype allows.

The bound: half-precision activations carry a relative rounding error of about eps per operation
(eps = 2^-8 for bfloat16, 2^-11 for float16), and a tiny model's logits go through a few dozen
roundings, so their error is held to 16 eps of the logits' size; garbage (a mask turned into
-inf, NaN from 0 * inf, an unsupported dot silently replaced) is off by the logits' size itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import forward, generate, init_params
from jaxllm.beam import beam_generate
from jaxllm.generate import left_pad
from jaxllm.training import loss_fn
from conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:attention. the Pallas TPU kernel runs in interpret mode")

DTYPES = ["float16", "bfloat16"]
IMPLS = ["reference", "xla", "pallas"]
EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
PROMPTS = [list(range(5, 40)), [3, 4]]  # left padding: row 1 is mostly padding, and the cache has empty slots


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(97)
    params = init_params(cfg, jax.random.key(0))
    return cfg, jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, params)


def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_on_a_left_padded_batch(model, dtype, impl):
    cfg, params = model
    tokens, positions = (jnp.asarray(a) for a in left_pad(PROMPTS, 48, 0))
    run = lambda c: np.asarray(jax.jit(lambda p: forward(p, c, tokens, positions)[0])(params))  # noqa: E731
    f32 = run(cfg)
    half = run(cfg.replace(compute_dtype=dtype, attention_impl=impl))
    assert np.isfinite(half).all()  # padding rows included
    real = np.asarray(positions >= 0)
    assert rms((half - f32)[real]) <= 16 * EPS[dtype] * rms(f32[real])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_training_step(model, dtype, impl):
    cfg, _ = model
    params = init_params(cfg, jax.random.key(0))  # training's own init: the scaled-up params of the
    # other tests make the query/key gradients nearly cancel, which no precision bound describes
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 33)), jnp.int32)
    run = lambda c: jax.jit(jax.value_and_grad(lambda p: loss_fn(p, c, batch)))(params)  # noqa: E731
    loss32, grads32 = run(cfg)
    loss, grads = run(cfg.replace(compute_dtype=dtype, attention_impl=impl))
    assert abs(float(loss) - float(loss32)) <= 16 * EPS[dtype] * float(loss32)
    for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
        g, g32 = np.asarray(g), np.asarray(g32)
        assert np.isfinite(g).all()
        assert rms(g - g32) <= 32 * EPS[dtype] * rms(g32)  # the backward pass rounds about twice as often


CACHES = {"full": {}, "ring_with_sinks": dict(window=16, sinks=4), "int8": dict(kv_cache_dtype="int8")}


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_generation_stays_finite(model, dtype, cache):
    """60 new tokens: the ring of 16 slots wraps several times, and row 1 decodes beside its padding."""
    cfg, params = model
    opts = dict(max_new_tokens=60, temperature=0.0, eos_token_id=[], logprobs=2, **CACHES[cache])
    want = generate(params, cfg, PROMPTS, **opts)
    got = generate(params, cfg.replace(compute_dtype=dtype), PROMPTS, **opts)
    for row in range(len(PROMPTS)):
        lp = np.asarray(got.logprobs[row])
        assert len(lp) == 60 and np.isfinite(lp).all() and (lp <= 0).all()
        # greedy: the chosen token is the most likely one, so its log-probability heads the alternatives
        assert all(max(alt.values()) == pytest.approx(x) for alt, x in zip(got.top_logprobs[row], lp))
        assert got.token_ids[row][0] == want.token_ids[row][0]  # the prefill's choice agrees with float32


def test_generation_through_the_pallas_kernels_in_float16(model):
    cfg, params = model
    prompts = [list(range(1, 90)), [7, 8, 9]]  # prefill blocks of 128 queries through the kernels
    want = generate(params, cfg, prompts, max_new_tokens=8, temperature=0.0, eos_token_id=[], logprobs=0)
    got = generate(params, cfg.replace(compute_dtype="float16", attention_impl="pallas"), prompts, max_new_tokens=8,
                   temperature=0.0, eos_token_id=[], logprobs=0)
    for row in range(2):
        assert np.isfinite(got.logprobs[row]).all()
        assert got.token_ids[row][0] == want.token_ids[row][0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_beam_search(model, dtype):
    cfg, params = model
    opts = dict(num_beams=3, max_new_tokens=6, eos_token_id=[])
    want = beam_generate(params, cfg, PROMPTS, **opts)
    got = beam_generate(params, cfg.replace(compute_dtype=dtype), PROMPTS, **opts)
    assert np.isfinite(got.scores).all()
    np.testing.assert_allclose(got.scores, want.scores, rtol=0.05)
