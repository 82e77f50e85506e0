"""The Pallas flash-attention kernels (jaxllm/flash.py) against the reference einsum, on a CPU.

Off a TPU the kernels run in Pallas' interpret mode: the same kernel bodies, block by block, so
these tests check what a TPU would compute (its compiler's layout rules aside). Padding queries
(position -1) are never compared: their outputs are unused, and the kernel returns zeros there
where the einsum averages every value.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxllm import flash, init_params
from jaxllm.attention import alibi_slopes, attend
from jaxllm.generate import left_pad
from jaxllm.kvcache import init_cache
from jaxllm.model import forward, prefill
from jaxllm.training import loss_fn
from conftest import tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:attention. the Pallas TPU kernel runs in interpret mode")


def qkv(B, T, S, H, K, E, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = ((B, T, H, E), (B, K, S, E), (B, K, S, E))
    return [jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype) for s in shapes]


def left_padded(B, S, lengths):
    pos = np.full((B, S), -1, np.int32)
    for r, n in enumerate(lengths):
        pos[r, S - n :] = np.arange(n)
    return pos


def ring_positions(S, first, count):
    """A ring of S slots after `count` tokens from position `first`: slot (p % S) holds p."""
    pos = np.full(S, -1, np.int32)
    for p in range(first, first + count):
        pos[p % S] = p
    return pos


# Each case: query and key positions [B, T] / [B, S], and attend's mask options.
def _cases():
    padded = left_padded(3, 200, (200, 37, 130))  # self-attention of a left-padded batch
    chunk = left_padded(2, 384, (300, 150))  # a 64-query chunk of a prompt against a cache with empty slots
    chunk[:, 300:] = -1
    chunk_q = np.stack([np.arange(236, 300), np.arange(86, 150)]).astype(np.int32)
    ring = np.stack([ring_positions(256, 0, 700), ring_positions(256, 40, 300)])  # wrapped ring slots
    ring_q = np.stack([np.arange(690, 700), np.arange(330, 340)]).astype(np.int32)
    long = np.arange(512, dtype=np.int32)[None]  # 256 queries from position 200: blocks of keys and
    long_q = long[:, 200:456]  # queries do not line up, as in a chunk at a cursor
    return {
        "padded_gqa": dict(q_pos=padded, k_pos=padded, K=2),
        "mqa_alibi": dict(q_pos=padded, k_pos=padded, K=1, slopes=True),
        "window": dict(q_pos=padded, k_pos=padded, K=2, window=50),
        "chunk_against_cache": dict(q_pos=chunk_q, k_pos=chunk, K=2),
        "ring_window_min_pos": dict(q_pos=ring_q, k_pos=ring, K=4, window=200, min_pos=4),
        # small blocks: most key blocks lie wholly in the future of a query block or wholly out of
        # its window, so the kernels skip them, and a wrong skip shows
        "many_blocks_skipped": dict(q_pos=long_q, k_pos=long, K=2, window=100, blocks=(64, 128)),
    }


CASES = _cases()


def run_case(case, dtype=jnp.float32, grads=True):
    c = CASES[case]
    q_pos, k_pos = jnp.asarray(c["q_pos"]), jnp.asarray(c["k_pos"])
    (B, T), S, H, E = q_pos.shape, k_pos.shape[1], 4, 16
    q, k, v = qkv(B, T, S, H, c["K"], E, seed=len(case), dtype=dtype)
    opts = dict(window=c.get("window", 0), min_pos=c.get("min_pos", 0), slopes=alibi_slopes(H) if c.get("slopes") else None)
    real = np.asarray(q_pos >= 0)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, E)) * real[:, :, None, None], jnp.float32)

    def loss(fn, q, k, v):  # a loss that ignores padding queries, as training's does
        return jnp.sum(weights * fn(q, k, v).astype(jnp.float32))

    ref = lambda q, k, v: attend(q, k, v, q_pos, k_pos, **opts)  # noqa: E731
    bq, bk = c.get("blocks", (None, None))
    ker = lambda q, k, v: flash.flash_attention(q, k, v, q_pos, k_pos, **opts, block_q=bq, block_k=bk, interpret=True)  # noqa: E731
    out = (np.asarray(jax.jit(ref)(q, k, v), np.float32), np.asarray(jax.jit(ker)(q, k, v), np.float32))
    if not grads:
        return real, out, None
    g = [jax.jit(jax.grad(lambda *a, f=f: loss(f, *a), argnums=(0, 1, 2)))(q, k, v) for f in (ref, ker)]
    return real, out, g


@pytest.mark.parametrize("case", CASES)
def test_the_kernel_and_its_gradients_equal_the_einsum(case):
    real, (want, got), (gw, gg) = run_case(case)
    np.testing.assert_allclose(got[real], want[real], atol=2e-5, rtol=2e-5)
    for a, b in zip(gg, gw):
        scale = float(np.abs(np.asarray(b)).max())
        assert scale > 1e-3  # the case has gradients to compare
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5 * scale, rtol=1e-4)


def test_bfloat16_is_as_close_to_float32_as_the_einsum_in_bfloat16():
    real, (f32, _), _ = run_case("padded_gqa", grads=False)
    _, (ref16, ker16), _ = run_case("padded_gqa", jnp.bfloat16, grads=False)
    rms = lambda x: float(np.sqrt(np.mean(x[real] ** 2)))  # noqa: E731
    assert rms(ker16 - f32) <= 1.25 * rms(ref16 - f32)
    np.testing.assert_allclose(ker16[real], ref16[real], atol=5e-2, rtol=5e-2)


def test_the_kernel_runs_under_tpu_interpret_mode():
    """TPU interpret mode simulates the chip's memories (SMEM scalars, VMEM scratch, DMAs): slower
    than the plain interpreter the other tests use, so one small case."""
    q_pos = jnp.asarray(np.arange(136, 200)[None], jnp.int32)
    k_pos = jnp.asarray(np.where(np.arange(256) < 200, np.arange(256), -1)[None], jnp.int32)
    q, k, v = qkv(1, 64, 256, 2, 1, 16, seed=3)
    want = attend(q, k, v, q_pos, k_pos, window=100)
    dq_ref = jax.grad(lambda q: jnp.sum(attend(q, k, v, q_pos, k_pos, window=100)))(q)
    with pltpu.force_tpu_interpret_mode():
        got = flash.flash_attention(q, k, v, q_pos, k_pos, window=100)
        dq = jax.grad(lambda q: jnp.sum(flash.flash_attention(q, k, v, q_pos, k_pos, window=100)))(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(dq), np.asarray(dq_ref), atol=1e-4, rtol=1e-4)


def test_no_array_spans_queries_and_keys():
    """Flash: memory linear in T. Neither a dense mask nor a bias nor the scores exist whole."""
    T = S = 1024
    q, k, v = qkv(1, T, S, 4, 2, 16)
    pos = jnp.arange(T)[None]

    def widest(fn):  # the most dims of T or S rows that any array in the program has
        hlo = jax.jit(fn).lower(q, k, v).as_text()
        shapes = [tuple(map(int, m.rstrip("x").split("x"))) for m in re.findall(r"tensor<((?:\d+x)+)[a-z]", hlo)]
        return max(sum(d >= T for d in shape) for shape in shapes)

    assert widest(lambda q, k, v: flash.flash_attention(q, k, v, pos, pos, interpret=True)) == 1
    assert widest(lambda q, k, v: attend(q, k, v, pos, pos)) == 2  # the check sees a dense score matrix


def test_vmap_over_the_kernel_equals_each_call():
    c = CASES["window"]
    pos = jnp.asarray(c["k_pos"])[:2, :136]
    q, k, v = qkv(2, 136, 136, 4, 2, 16, seed=5)
    f = lambda q, k, v: flash.flash_attention(q[None], k[None], v[None], pos[:1], pos[:1], window=50, interpret=True)[0]  # noqa: E731
    batched = jax.vmap(f)(q, k, v)
    for r in range(2):
        np.testing.assert_allclose(np.asarray(batched[r]), np.asarray(f(q[r], k[r], v[r])), atol=1e-6)


def test_block_sizes_pad_to_whole_blocks():
    assert flash.block_size(1) == (8, 8)
    assert flash.block_size(100) == (104, 104)
    assert flash.block_size(300) == (128, 384)  # 384 = 3 blocks of 128
    assert flash.block_size(1024) == (512, 1024)
    assert flash.block_size(640) == (128, 640)
    assert flash.block_size(200, 64) == (64, 256)


# ---------------------------------------------------------------------------- the model through the kernels


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(97, max_seq_len=512)
    params = init_params(cfg, jax.random.key(0))
    return cfg, jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, params)


def padded_batch(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    tokens, positions = left_pad([list(rng.integers(0, 97, n)) for n in lengths], width, 0)
    return jnp.asarray(tokens), jnp.asarray(positions)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_on_a_left_padded_batch(model, dtype):
    cfg, params = model
    tokens, positions = padded_batch((150, 40, 200), 200)
    cfg = cfg.replace(compute_dtype=dtype)
    run = lambda impl: np.asarray(jax.jit(lambda p: forward(p, cfg.replace(attention_impl=impl), tokens, positions)[0])(params))  # noqa: E731
    want, got = run("reference"), run("pallas")
    real = np.asarray(positions >= 0)
    if dtype == "float32":
        np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    else:  # as close to float32 as the einsum in bfloat16 is
        f32 = np.asarray(forward(params, cfg.replace(compute_dtype="float32"), tokens, positions)[0])
        err = lambda x: float(np.sqrt(np.mean((x - f32)[real] ** 2)))  # noqa: E731
        assert err(got) <= 1.25 * err(want)


@pytest.mark.parametrize("window", [0, 24])
def test_chunked_prefill_into_the_cache(model, window):
    """A 200-token prompt fed 64 columns at a time (a scan over chunks whose cursor is traced), into
    a full cache or, with a sliding window, a ring of 24 slots that the prompt wraps many times."""
    cfg, params = model
    cfg = cfg.replace(sliding_window=window)
    tokens, positions = padded_batch((200, 77), 200, seed=1)
    slots = window or 256

    def run(impl):
        c = cfg.replace(attention_impl=impl)
        cache = init_cache(c, 2, slots, ring=bool(window))
        h, cache = jax.jit(lambda p: prefill(p, c, tokens, positions, cache, chunk=64))(params)
        filled = np.asarray(cache.pos >= 0)  # [B, S]: slots holding real tokens (padding's K/V are never read)
        by_slot = lambda x: np.asarray(x).transpose(1, 3, 0, 2, 4)[filled]  # noqa: E731  [L, B, K, S, E] -> [n, L, K, E]
        return np.asarray(h), by_slot(cache.k), by_slot(cache.v)

    for got, want in zip(run("pallas"), run("reference")):
        assert got.size
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_training_step_loss_and_gradients(model):
    cfg, params = model
    batch = jnp.asarray(np.random.default_rng(2).integers(0, 97, (2, 129)), jnp.int32)
    run = lambda impl: jax.jit(jax.value_and_grad(lambda p: loss_fn(p, cfg.replace(attention_impl=impl), batch)))(params)  # noqa: E731
    (lw, gw), (lg, gg) = run("reference"), run("pallas")
    np.testing.assert_allclose(float(lg), float(lw), rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gg), jax.tree_util.tree_leaves(gw)):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale, rtol=1e-3, err_msg=str(path))
