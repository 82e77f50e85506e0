"""Attention: every backend equals the reference einsum; windows, ALiBi and RoPE scaling equal numpy."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import forward, init_params
from jaxllm.attention import alibi_slopes, attend, resolve_impl
from jaxllm.errors import ConfigError
from conftest import tiny_config
from reference import np_forward

CPU_IMPLS = ["xla", "auto"]  # cudnn needs an NVIDIA GPU; pallas: tests/test_flash.py


def random_qkv(B=3, T=7, S=12, H=4, K=2, E=16, seed=0):
    """q: [B, T, H, E], k/v: [B, K, S, E] (heads-major, the cache's layout)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((B, T, H, E), (B, K, S, E), (B, K, S, E)))
    return q, k, v


def left_padded_positions(B, length, lengths):
    pos = np.full((B, length), -1, np.int32)
    for r, n in enumerate(lengths):
        pos[r, length - n :] = np.arange(n)
    return jnp.asarray(pos)


CASES = {
    "causal": dict(K=4, window=0, lengths=(12, 12, 12)),
    "padded_gqa": dict(K=2, window=0, lengths=(12, 5, 9)),
    "mqa": dict(K=1, window=0, lengths=(3, 12, 7)),
    "windowed_gqa": dict(K=2, window=4, lengths=(12, 6, 10)),
}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alibi", [False, True])
def test_every_backend_equals_the_reference(impl, case, alibi):
    c = CASES[case]
    q, k, v = random_qkv(K=c["K"], seed=len(case))
    k_pos = left_padded_positions(3, 12, c["lengths"])
    q_pos = k_pos[:, -7:]  # the last 7 keys' tokens are the queries (a prefill chunk over a cache)
    slopes = alibi_slopes(4) if alibi else None
    want = attend(q, k, v, q_pos, k_pos, window=c["window"], slopes=slopes, impl="reference")
    got = attend(q, k, v, q_pos, k_pos, window=c["window"], slopes=slopes, impl=impl)
    real = np.asarray(q_pos >= 0)  # padding queries average all values; their output is unused
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5, rtol=2e-5)


def test_the_window_really_hides_old_keys():
    q, k, v = random_qkv(B=1, T=1, S=12, K=2)
    pos = jnp.arange(12)[None]
    full = attend(q, k, v, pos[:, -1:], pos)
    windowed = attend(q, k, v, pos[:, -1:], pos, window=3)
    only_last3 = attend(q, k[:, :, -3:], v[:, :, -3:], pos[:, -1:], pos[:, -3:])
    np.testing.assert_allclose(np.asarray(windowed), np.asarray(only_last3), atol=1e-6)
    assert np.abs(np.asarray(windowed) - np.asarray(full)).max() > 1e-3


def test_unavailable_backends_fall_back_with_a_warning_naming_why():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU fallback")
    from jaxllm import attention

    q, k, _ = random_qkv()
    cases = [("cudnn", q, "xla", "needs an NVIDIA GPU"), ("xla", q.astype(jnp.float16), "reference", "float16 dot"),
             ("pallas", q, "pallas", "interpret mode")]
    for impl, query, runs, why in cases:
        attention._warned.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve_impl(impl, query, k) == runs
        assert any(why in str(w.message) for w in caught), (impl, [str(w.message) for w in caught])
    # measured on CPU (benchmarks/RESULTS.md): XLA's for blocks of queries, the einsum for one
    assert resolve_impl("auto", q, k) == "xla" and resolve_impl("auto", q[:, :1], k) == "reference"
    assert resolve_impl("auto", q.astype(jnp.float16), k) == "reference"  # XLA:CPU has no f16 x f16 -> f32 dot


@pytest.mark.parametrize("backend,T,block", [("gpu", 7, "cudnn"), ("tpu", 7, "xla"), ("tpu", 128, "pallas"), ("cpu", 7, "xla")])
def test_auto_decodes_with_the_einsum_on_every_backend(monkeypatch, backend, T, block):
    # One query reads the heads-major cache as stored; blocks of queries take the backend's kernel
    # (on a TPU the Pallas kernels from one whole block of 128 queries: 7 queries get XLA's).
    q, k, _ = random_qkv(T=T)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    q = q.astype(jnp.bfloat16)
    for impl in ("auto", "pallas", "xla", "reference"):
        assert resolve_impl(impl, q[:, :1], k) == "reference"
    assert resolve_impl("auto", q, k) == block


def test_unknown_attention_impl_is_refused():
    with pytest.raises(ConfigError, match="attention_impl"):
        tiny_config(97, attention_impl="flash")
    with pytest.raises(ConfigError, match="position_encoding"):
        tiny_config(97, position_encoding="learned")
    with pytest.raises(ConfigError, match="sliding_window"):
        tiny_config(97, sliding_window=-1)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)])
    # 6 heads: the 4-head sequence, then every other slope of the 8-head one
    np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


# ---------------------------------------------------------------------------- the model against numpy


def scaled_params(cfg, seed):
    params = init_params(cfg, jax.random.key(seed))
    return jax.tree_util.tree_map(lambda x: x * 10 if x.ndim > 1 else x, params)


def model_logits(params, cfg, ids):
    return np.asarray(forward(params, cfg, jnp.asarray([ids], jnp.int32), jnp.arange(len(ids))[None])[0][0])


MODEL_CASES = {
    "alibi_4_heads": dict(position_encoding="alibi"),
    "alibi_6_heads": dict(position_encoding="alibi", n_heads=6, n_kv_heads=3, d_model=48),
    "sliding_window": dict(sliding_window=4),
    "alibi_window": dict(position_encoding="alibi", sliding_window=5),
    "rope_linear": dict(rope_scaling="linear", rope_factor=4.0),
    "rope_ntk": dict(rope_scaling="ntk", rope_factor=4.0),
    "rope_llama3": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16),
    "xla_backend": dict(attention_impl="xla", sliding_window=6),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_forward_matches_numpy_reference(case):
    cfg = tiny_config(97, **MODEL_CASES[case])
    params = scaled_params(cfg, 2)
    ids = list(np.random.default_rng(1).integers(0, 97, size=13))
    np.testing.assert_allclose(model_logits(params, cfg, ids), np_forward(params, cfg, ids), atol=2e-4, rtol=2e-4)


def test_the_reference_tells_the_options_apart():
    """Each option changes the numpy reference's logits, so the tests above can fail."""
    base = tiny_config(97)
    params = scaled_params(base, 2)
    ids = list(np.random.default_rng(1).integers(0, 97, size=13))
    plain = np_forward(params, base, ids)
    for case in ("alibi_4_heads", "sliding_window", "rope_linear", "rope_ntk", "rope_llama3"):
        other = np_forward(params, base.replace(**MODEL_CASES[case]), ids)
        assert np.abs(other - plain).max() > 1e-2, case


# ---------------------------------------------------------------------------- accelerators (benchmarks/gpu_check.sh)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs an NVIDIA GPU")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])  # float16: the mask bias must stay finite
def test_cudnn_flash_equals_the_reference_in_half_precision(case, dtype):
    c = CASES[case]
    q, k, v = (x.astype(dtype) for x in random_qkv(T=8, S=16, K=c["K"], E=64, seed=len(case)))
    k_pos = left_padded_positions(3, 16, [min(n + 4, 16) for n in c["lengths"]])
    q_pos = k_pos[:, -8:]
    assert resolve_impl("cudnn", q, k) == "cudnn"
    want = attend(*(x.astype(jnp.float32) for x in (q, k, v)), q_pos, k_pos, window=c["window"])
    got = attend(q, k, v, q_pos, k_pos, window=c["window"], impl="cudnn")
    real = np.asarray(q_pos >= 0)
    np.testing.assert_allclose(np.asarray(got, np.float32)[real], np.asarray(want)[real], atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="the compiled (not interpreted) Pallas kernels need a TPU")
def test_pallas_flash_equals_the_reference_on_a_tpu():
    q, k, v = random_qkv(T=128, S=256, K=2, E=128)
    k_pos = left_padded_positions(3, 256, (256, 200, 130))
    q_pos = k_pos[:, -128:]
    assert resolve_impl("pallas", q, k) == "pallas"
    want = attend(q, k, v, q_pos, k_pos, window=64)
    got = attend(q, k, v, q_pos, k_pos, window=64, impl="pallas")
    real = np.asarray(q_pos >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-2, rtol=2e-2)
