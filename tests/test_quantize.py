"""Weight-only quantization: error bounds, packing, the quantized matmul against numpy, and the
model under quantized weights (logits near fp32, a trained model's greedy text unchanged)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import devices, forward, init_cache, init_params, native
from jaxllm.model import unstack_layers
from jaxllm.quantize import (
    QuantizedWeight, dequantize, dequantize_params, matmul, pack_int4, quantize, quantize_params, take_rows,
    tile_weight, unpack_int4, untile_weight,
)
from reference import np_forward
from conftest import tiny_config

BUNDLED = Path(jaxllm.__file__).parent / "assets" / "default"


def np_dequantize(qw: QuantizedWeight) -> np.ndarray:
    """Independent reference: unpack nibbles with numpy and apply the scales -> logical [I, O] (or [O, I]),
    without the `pad` zero rows that round I up to a multiple of the group."""
    v, s = np.asarray(qw.values), np.asarray(qw.scales, np.float64)
    if qw.bits == 4:
        g = qw.group_size
        lo = (v & 0xF).astype(np.int16)
        hi = (v >> 4).astype(np.int16)
        lo, hi = np.where(lo > 7, lo - 16, lo), np.where(hi > 7, hi - 16, hi)
        n, o = v.shape[-2:]
        lo, hi = lo.reshape(*v.shape[:-2], n * 2 // g, g // 2, o), hi.reshape(*v.shape[:-2], n * 2 // g, g // 2, o)
        q = np.concatenate([lo, hi], axis=-2)  # [..., I/G, G, O]
        w = (q * s[..., :, None, :]).reshape(*v.shape[:-2], n * 2, o)[..., : n * 2 - qw.pad, :]
    else:
        w = v.astype(np.float64) * s
    return np.swapaxes(w, -1, -2) if qw.transposed else w


@pytest.fixture(params=["native", "xla_blocked", "xla"])
def impl(request):
    """Each formulation a QuantizedWeight may name: jaxllm's CPU kernel (native.py), XLA's blocked
    small-M scan, XLA's whole-weight dequantize (what raw weights run)."""
    if request.param == "native" and not native.available():
        pytest.skip(f"native kernel not in use here: {native.status()}")
    return request.param


def fresh_matmul(x, qw):
    """A new jit wrapper each call, so a test's choice of path is traced anew."""
    return jax.jit(lambda x, qw: matmul(x, qw))(x, qw)


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 96)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    w[5, 7] = 40.0  # an outlier: its channel / group gets a large scale
    return w


def test_int8_error_is_at_most_half_a_step_per_element(weight):
    qw = quantize(weight, 8)
    assert qw.values.dtype == jnp.int8 and qw.values.shape == (256, 96) and qw.scales.shape == (1, 96)
    scale = np.asarray(qw.scales)[0]
    np.testing.assert_allclose(scale, np.abs(weight).max(axis=0) / 127 + (np.abs(weight).max(axis=0) == 0))
    err = np.abs(np_dequantize(qw) - weight)
    assert np.all(err <= scale / 2 * (1 + 1e-6))
    assert np.all(np_dequantize(qw)[:, 3] == 0)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(weight, group_size):
    qw = quantize(weight, 4, group_size)
    assert qw.values.dtype == jnp.uint8 and qw.values.shape == (128, 96)
    assert qw.scales.shape == (256 // group_size, 96)
    scale = np.repeat(np.asarray(qw.scales), group_size, axis=0)  # [I, O]: each element's group scale
    groups = weight.reshape(256 // group_size, group_size, 96)
    step = np.maximum(groups.max(axis=1) / 7, groups.min(axis=1) / -8)  # both extremes fit [-8, 7]
    np.testing.assert_allclose(np.asarray(qw.scales), np.where(step > 0, step, 1.0), rtol=1e-6)
    assert np.all(np.abs(np_dequantize(qw) - weight) <= scale / 2 * (1 + 1e-6))


def test_int4_packing_round_trips_every_value_including_minus_eight():
    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, (128, 10)).astype(np.int8)
    q[:16, 0] = np.arange(-8, 8)  # every nibble value, in the low half of group 0
    q[16:32, 0] = np.arange(-8, 8)  # and in its high half
    packed = pack_int4(jnp.asarray(q), 32)
    assert packed.dtype == jnp.uint8 and packed.shape == (64, 10)
    lo, hi = unpack_int4(packed, 32)
    back = np.concatenate([np.asarray(lo), np.asarray(hi)], axis=1).reshape(128, 10)
    np.testing.assert_array_equal(back, q)
    # the documented layout: within a group, byte j = row j (low nibble) | row j + G/2 (high nibble)
    assert int(packed[3, 0]) == (int(q[3, 0]) & 0xF) | ((int(q[19, 0]) & 0xF) << 4)


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 32), (4, 128)])
@pytest.mark.parametrize("rows", [1, 5, 130])  # xla_blocked: blocks up to SMALL_M rows, whole above
def test_quantized_matmul_equals_dequantize_then_matmul(impl, weight, bits, group_size, rows):
    qw = dataclasses.replace(quantize(weight, bits, group_size or 64), impl=impl)
    x = np.random.default_rng(rows).standard_normal((rows, 256)).astype(np.float32)
    want = x.astype(np.float64) @ np_dequantize(qw)
    got = np.asarray(fresh_matmul(jnp.asarray(x), qw))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,group_size,i", [(8, 0, 100), (8, 0, 768), (4, 32, 256), (4, 32, 80), (4, 128, 384)])
def test_native_kernel_matches_numpy_on_every_tile_shape(bits, group_size, i):
    # Widths cover the kernel's wide tiles (256/128/64 columns), single vectors and scalar tails
    # (O = 1, 17, 700, 1000); rows of x cover 1-4, and the 8- and 4-row blocks plus remainders (5, 8, 9, 12, 34).
    if not native.available():
        pytest.skip(f"native kernel not in use here: {native.status()}")
    rng = np.random.default_rng(i)
    for o in (1, 17, 700, 1000):
        qw = quantize(rng.standard_normal((i, o)).astype(np.float32), bits, group_size or 64)
        ref = np_dequantize(qw)  # [I, O]; 80 rows at G 32 are stored as 96, the last 16 zero
        pad = qw.pad
        for layout in (qw, tile_weight(qw)):  # [rows, O], and tiles of 128 columns (the last one padded)
            for m in (1, 2, 3, 4, 5, 8, 9, 12, 34):
                x = rng.standard_normal((m, i)).astype(np.float32)
                xp = np.pad(x, ((0, 0), (0, pad)))  # the kernel multiplies the stored rows, zeros included
                got = native.qmatmul(jnp.asarray(xp), layout.values, layout.scales, bits, layout.group_size, layout.tile)
                np.testing.assert_allclose(
                    np.asarray(got), x.astype(np.float64) @ ref, rtol=1e-5, atol=1e-4, err_msg=f"O={o} M={m} tile={layout.tile}",
                )


@pytest.mark.parametrize("i", [48, 130, 768])  # one partial block of rows; two whole and a 2-row rest; 12 whole
def test_native_float32_kernel_matches_numpy(i):
    # Same tile shapes as the quantized kernel; the float32 path also adds blocks of 64 input
    # rows into y one after another, in the vector tiles and the scalar column tail alike.
    if not native.available():
        pytest.skip(f"native kernel not in use here: {native.status()}")
    rng = np.random.default_rng(i)
    for o in (1, 17, 700, 1000):
        w = rng.standard_normal((i, o)).astype(np.float32)
        for m in (1, 2, 3, 4, 5, 8, 9, 12, 34):
            x = rng.standard_normal((m, i)).astype(np.float32)
            got = native.matmul_f32(jnp.asarray(x), jnp.asarray(w))
            np.testing.assert_allclose(
                np.asarray(got), x.astype(np.float64) @ w, rtol=1e-5, atol=1e-4, err_msg=f"O={o} M={m}",
            )


def test_float32_linear_takes_the_kernel_only_for_prepared_weights_and_decode_sized_rows():
    from jaxllm.model import linear

    if not native.available():
        pytest.skip(f"native kernel not in use here: {native.status()}")
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((96, 40)).astype(np.float32))
    lo, hi = devices.F32_KERNEL_ROWS
    ready = native.Float32Weight(w, (lo, hi))
    for b, t in ((1, 1), (1, lo), (2, hi // 2), (hi + 1, 1), (4, 8)):
        x = jnp.asarray(rng.standard_normal((b, t, 96)).astype(np.float32))
        hlo = jax.jit(lambda x, w: linear(x, w, jnp.float32)).lower(x, ready).compile().as_text()
        assert (native.TARGET_F32 in hlo) == (lo <= b * t <= hi), (b, t)
        raw = jax.jit(lambda x, w: linear(x, w, jnp.float32)).lower(x, w).compile().as_text()
        assert native.TARGET_F32 not in raw  # a raw weight is XLA's dot, whatever the backend
        np.testing.assert_allclose(np.asarray(linear(x, ready, jnp.float32)), np.asarray(x) @ np.asarray(w), rtol=1e-5, atol=1e-4)
    # bfloat16 compute keeps XLA's dot; gradients of the kernel's path are the plain matmul's
    x = jnp.asarray(rng.standard_normal((2, 3, 96)).astype(np.float32))
    assert native.TARGET_F32 not in jax.jit(lambda x, w: linear(x, w, jnp.bfloat16)).lower(x, ready).as_text()
    loss = lambda f: (lambda x, w: jnp.sum(jnp.sin(f(x, w))))  # noqa: E731
    got = jax.grad(loss(lambda x, w: linear(x, native.Float32Weight(w, (lo, hi)), jnp.float32)), argnums=(0, 1))(x, w)
    xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
    c = np.cos(xn @ wn)  # d sum(sin(x @ w)): cos(x @ w) @ w.T for x, x.T @ cos(x @ w) for w
    for a, b in zip(got, (c @ wn.T, np.einsum("bti,bto->io", xn, c))):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-4)


def _kernel_calls(hlo: str, target: str) -> list[str]:
    return [line for line in hlo.splitlines() if target in line and "custom-call" in line]


@pytest.mark.parametrize("kind", ["int8", "int4", "float32"])
def test_the_kernel_under_vmap_runs_once_over_all_rows_and_matches_numpy(weight, kind):
    """vmap (and a nested vmap) folds the mapped axes into the rows of x: one kernel call, no
    loop; results and gradients through vmap equal numpy's; a mapped weight still works."""
    if not native.available():
        pytest.skip(f"native kernel not in use here: {native.status()}")
    if kind == "float32":
        w_np, target = weight.astype(np.float64), native.TARGET_F32
        f = lambda x, w=jnp.asarray(weight): native.matmul_f32(x, w)  # noqa: E731
    else:
        qw = tile_weight(quantize(weight, 8 if kind == "int8" else 4, 32))
        w_np, target = np_dequantize(untile_weight(qw)), native.TARGET
        f = lambda x, qw=qw: native.qmatmul(x, qw.values, qw.scales, qw.bits, qw.group_size, qw.tile)  # noqa: E731
    x = np.random.default_rng(7).standard_normal((2, 3, 4, 256)).astype(np.float32)  # [B2, B1, M, I]
    once, twice = jax.vmap(f), jax.vmap(jax.vmap(f))
    for fn, xs in ((once, x[0]), (twice, x)):
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(xs)), xs.astype(np.float64) @ w_np, rtol=1e-5, atol=1e-4)
        hlo = jax.jit(fn).lower(xs).compile().as_text()
        calls = _kernel_calls(hlo, target)
        assert len(calls) == 1 and f"= f32[{xs.size // 256},96]" in calls[0], calls  # all B * M rows at once
        assert " while(" not in hlo  # no per-element loop
    g = jax.jit(jax.grad(lambda x: jnp.sum(twice(x) ** 2) / 2))(x)
    want = (x.astype(np.float64) @ w_np) @ w_np.T
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-3)
    if kind == "float32":  # one weight per element: XLA's dot
        ws = np.stack([weight, 2 * weight])
        got = jax.vmap(native.matmul_f32)(jnp.asarray(x[0, :2]), jnp.asarray(ws))
        np.testing.assert_allclose(np.asarray(got), np.einsum("bmi,bio->bmo", x[0, :2], ws), rtol=1e-5, atol=1e-4)
    else:
        scales = jnp.stack([qw.scales, 2 * qw.scales])
        got = jax.vmap(lambda x, s: native.qmatmul(x, qw.values, s, qw.bits, qw.group_size, qw.tile))(jnp.asarray(x[0, :2]), scales)
        np.testing.assert_allclose(np.asarray(got), x[0, :2] @ w_np * np.array([1, 2])[:, None, None], rtol=1e-5, atol=1e-4)


def test_tiled_layout_round_trips_and_keeps_the_logical_weight(weight):
    for bits in (8, 4):
        qw = quantize(weight, bits, 32)
        t = tile_weight(qw, tile=64)  # 96 columns -> two tiles of 64, the second half padding
        assert t.values.shape == (2, qw.values.shape[0], 64) and t.shape == qw.shape
        assert np.all(np.asarray(t.values)[1, :, 32:] == 0)
        np.testing.assert_array_equal(np.asarray(t.values)[0], np.asarray(qw.values)[:, :64])
        np.testing.assert_array_equal(np.asarray(untile_weight(t).values), np.asarray(qw.values))
        np.testing.assert_array_equal(np.asarray(dequantize(t)), np.asarray(dequantize(qw)))
        assert tile_weight(t) is t and untile_weight(qw) is qw


@pytest.mark.parametrize("bits", [8, 0])  # int8, and float32 weights
def test_prepared_params_tile_for_the_kernel_and_checkpoint_as_their_originals(tmp_path, bits):
    from jaxllm.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config(96)
    params = init_params(cfg, jax.random.key(0))
    params = quantize_params(params, bits) if bits else params
    ready = devices.prepare(params, cfg)
    kernel = jax.default_backend() == "cpu" and native.available()
    is_node = lambda x: isinstance(x, (QuantizedWeight, native.Float32Weight))  # noqa: E731
    nodes = [x for x in jax.tree.leaves(ready, is_leaf=is_node) if is_node(x)]
    if bits:
        tiled = [x for x in nodes if x.tile]
        assert len(tiled) == (7 * cfg.n_layers + 1 if kernel else 0)  # every projection and the untied head
    else:
        assert len(nodes) == (7 * cfg.n_layers + 1 if kernel else 0)
    assert devices.prepare(ready, cfg) is ready  # idempotent: prepared params pass through
    save_checkpoint(tmp_path / "ckpt", ready, cfg)
    back, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decoding_program_calls_the_kernel_and_never_widens_a_whole_weight(weight):
    if not native.available():
        pytest.skip(f"native kernel not in use here: {native.status()}")
    qw = dataclasses.replace(quantize(weight, 8), impl="native")
    hlo = jax.jit(lambda x, qw: matmul(x, qw)).lower(jnp.ones((1, 256)), qw).compile().as_text()
    assert native.TARGET in hlo
    assert "f32[256,96]" not in hlo  # the float weight is never materialized


def test_without_the_kernel_prepared_params_run_the_blocked_xla_matmul(tmp_path):
    # A compiler that fails: the reason is reported, prepare picks XLA's blocked formulation, and
    # its products equal those of the dequantized weight.
    code = (
        "import numpy as np, jax.numpy as jnp\n"
        "from jaxllm import devices, native\n"
        "from jaxllm.quantize import dequantize, matmul, quantize\n"
        "w = np.random.default_rng(0).standard_normal((1, 64, 32)).astype(np.float32)\n"  # one stacked layer
        "ready = devices.prepare({'layers': {'w_up': quantize(w, 8)}})\n"
        "print(native.available(), native.status())\n"
        "w = ready['layers'][0]['w_up']; print(w.impl)\n"
        "x = jnp.linspace(-1, 1, 2 * 64).reshape(2, 64); print(float(abs(matmul(x, w) - x @ dequantize(w)).max()))\n"
    )
    import subprocess, sys, os

    for env in ({"CXX": "/bin/false"}, {"JAXLLM_NATIVE": "0"}):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "JAXLLM_KERNEL_DIR": str(tmp_path), **env},
        ).stdout.splitlines()
        reasons = ("build failed", "JAXLLM_NATIVE=0")
        assert out[0].startswith("False") and any(r in out[0] for r in reasons), out
        assert out[1] == ("xla_blocked" if jax.default_backend() == "cpu" else "xla")
        assert float(out[2]) < 1e-4
    assert not list(tmp_path.glob("*.so"))  # a failed build leaves nothing behind


@pytest.mark.parametrize("bits,d", [(8, 64), (4, 64), (4, 48)])  # D 48 at G 32: stored as 64 rows
def test_embedding_lookup_dequantizes_the_rows_and_the_tied_head_uses_the_transpose(bits, d):
    table = np.random.default_rng(2).standard_normal((50, d)).astype(np.float32)  # [V, D]
    qw = quantize(table, bits, 32, transposed=True)
    assert qw.shape == (50, d) and qw.values.shape[-1] == 50  # stored [D, V]
    ref = np_dequantize(qw)  # [V, D]
    ids = jnp.asarray([[3, 49, 0], [7, 7, 12]])
    np.testing.assert_allclose(np.asarray(take_rows(qw, ids, jnp.float32)), ref[np.asarray(ids)], rtol=1e-6)
    h = np.random.default_rng(3).standard_normal((2, d)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(h), qw)), h @ ref.T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("bits,rows", [(8, 256), (4, 256), (4, 176)])  # 176 rows at G 64: stored as 192
def test_quantized_matmul_composes_with_grad_and_vmap(impl, weight, bits, rows):
    qw = dataclasses.replace(quantize(weight[:rows], bits, 64), impl=impl)
    if impl == "native":
        qw = tile_weight(qw)  # as devices.prepare lays it out for the kernel
    x = jnp.asarray(np.random.default_rng(4).standard_normal((3, rows)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(matmul(x, qw) ** 2))(x)
    w = dequantize(qw)
    np.testing.assert_allclose(np.asarray(g), np.asarray(2 * (x @ w) @ w.T), rtol=1e-4, atol=1e-3)
    # the scales are float parameters: their gradient too
    ds = jax.grad(lambda s: jnp.sum(matmul(x, dataclasses.replace(qw, scales=s))))(qw.scales)
    ds_ref = jax.grad(lambda s: jnp.sum(x @ dequantize(dataclasses.replace(qw, scales=s, impl="xla"))))(qw.scales)
    np.testing.assert_allclose(np.asarray(ds), np.asarray(ds_ref), rtol=1e-4, atol=1e-3)
    per_row = jax.vmap(lambda r: matmul(r, qw))(x)
    np.testing.assert_allclose(np.asarray(per_row), np.asarray(matmul(x, qw)), rtol=1e-6, atol=1e-5)


def test_bad_options_name_the_argument():
    with pytest.raises(jaxllm.ConfigError, match="bits must be one of"):
        quantize(np.ones((64, 4)), 9)
    with pytest.raises(jaxllm.ConfigError, match="group_size must be one of"):
        quantize(np.ones((64, 4)), 4, 48)


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 32)])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_model_equals_the_numpy_forward_of_its_dequantized_weights(bits, group_size, tied):
    cfg = tiny_config(97, tie_embeddings=tied)
    params = quantize_params(init_params(cfg, jax.random.key(1)), bits, group_size or 64)
    ids = list(np.random.default_rng(0).integers(0, 97, size=11))
    want = np_forward(jax.device_get(dequantize_params(params)), cfg, ids)
    for p in (params, unstack_layers(params)):  # stacked (scan) and unstacked layers
        got = forward(p, cfg, jnp.asarray([ids]), jnp.arange(len(ids))[None])[0][0]
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_int8_decode_logits_stay_within_tolerance_of_fp32(cfg, params):
    """Cached decoding, step by step, of the shared tiny model (random weights scaled x5, so errors
    are amplified): int8 logits equal fp32 decoding of the dequantized weights (1e-4), stay within
    6% of the fp32 logits' range, and pick the same argmax at >= 90% of the steps."""
    q = unstack_layers(quantize_params(params, 8))
    ids = list(np.random.default_rng(5).integers(4, cfg.vocab_size, size=12))

    def decode(p):
        cache = init_cache(cfg, 1, 16)
        logits, cache = forward(p, cfg, jnp.asarray([ids[:4]]), jnp.arange(4)[None], cache)
        out = [logits[0]]
        for t in range(4, len(ids)):
            logits, cache = forward(p, cfg, jnp.asarray([[ids[t]]]), jnp.asarray([[t]]), cache)
            out.append(logits[0])
        return np.concatenate([np.asarray(o) for o in out])

    want, got = decode(params), decode(q)
    np.testing.assert_allclose(got, decode(dequantize_params(q)), atol=1e-4, rtol=1e-4)
    assert np.max(np.abs(got - want)) <= 0.06 * np.ptp(want)
    assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) >= 0.9


@pytest.mark.skipif(not BUNDLED.exists(), reason="the bundled model is missing")
def test_trained_model_greedy_text_is_unchanged_under_int8():
    params, cfg, tok = jaxllm.load_checkpoint(BUNDLED)
    kw = dict(tokenizer=tok, max_new_tokens=32, temperature=0.0, eos_token_id=[])
    prompts = ["def __init__(self", "import os\n"]
    want = jaxllm.generate(params, cfg, prompts, **kw).token_ids
    got = jaxllm.generate(quantize_params(params, 8), cfg, prompts, **kw).token_ids
    assert got == want


# Input sizes that int4's group does not divide: d_ff 176 and 688 at G 64, 704 (the bundled
# model's d_ff) at G 128, a d_model of 32 at G 64, and an odd size. Each used to get another group.
UNEVEN = [(176, 64), (688, 64), (704, 128), (32, 64), (75, 32)]


@pytest.mark.parametrize("i,group_size", UNEVEN)
def test_int4_keeps_the_group_asked_for_and_pads_the_input_rows_with_zeros(i, group_size):
    o = 8
    w = np.random.default_rng(i).standard_normal((i, o)).astype(np.float32)
    qw = quantize(w, 4, group_size)
    n = -(-i // group_size)  # groups: I rounded up to a multiple of G, over G
    assert qw.group_size == group_size and qw.shape == (i, o) and dequantize(qw).shape == (i, o)
    assert qw.values.shape == (n * group_size // 2, o) and qw.scales.shape == (n, o)
    padded = np.zeros((n * group_size, o), np.float32)
    padded[:i] = w
    groups = padded.reshape(n, group_size, o)
    step = np.maximum(groups.max(axis=1) / 7, groups.min(axis=1) / -8)
    np.testing.assert_allclose(np.asarray(qw.scales), np.where(step > 0, step, 1.0), rtol=1e-6)
    # every stored nibble past row I is 0; the real rows are within half a step
    v = np.asarray(qw.values).reshape(n, group_size // 2, o)
    nibbles = np.concatenate([v & 0xF, v >> 4], axis=1).reshape(n * group_size, o)
    assert np.all(nibbles[i:] == 0)
    scale = np.repeat(np.asarray(qw.scales), group_size, axis=0)[:i]
    assert np.all(np.abs(np_dequantize(qw) - w) <= scale / 2 * (1 + 1e-6))


@pytest.mark.parametrize("i,group_size", UNEVEN[:4])
@pytest.mark.parametrize("rows", [1, 5, 130])
def test_padded_int4_matmul_equals_dequantize_then_matmul(impl, i, group_size, rows):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((i, 40)).astype(np.float32)
    qw = dataclasses.replace(quantize(w, 4, group_size), impl=impl)
    x = rng.standard_normal((2, rows, i)).astype(np.float32)  # leading axes as in the model: [B, T, I]
    want = x.astype(np.float64) @ np_dequantize(qw)
    for layout in (qw, tile_weight(qw)) if impl == "native" else (qw,):
        np.testing.assert_allclose(np.asarray(fresh_matmul(jnp.asarray(x), layout)), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("overrides,group_size", [
    (dict(d_ff=176), 64),  # the case: w_down's 176 rows used to get groups of 44
    (dict(d_ff=704, d_model=256, n_heads=4, n_kv_heads=2), 128),  # the bundled model's shape: w_down got 64
    (dict(d_model=96, n_heads=4, n_kv_heads=2, d_ff=128), 64),  # a d_model (every other input) not a multiple of G
])
@pytest.mark.parametrize("tied", [True, False])
def test_int4_checkpoint_of_uneven_shapes_loads_with_the_group_asked_for(tmp_path, overrides, group_size, tied):
    from jaxllm.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config(97, tie_embeddings=tied, **overrides)
    q = quantize_params(init_params(cfg, jax.random.key(2)), 4, group_size)
    save_checkpoint(tmp_path / "ckpt", q, cfg)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization"] == {"bits": 4, "group_size": group_size}
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    weights = [x for x in jax.tree.leaves(loaded, is_leaf=is_q) if is_q(x)]
    assert weights and all(w.group_size == group_size for w in weights)
    assert jax.tree.structure(loaded) == jax.tree.structure(q)  # pad, bits and group are static fields
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = list(np.random.default_rng(0).integers(0, 97, size=7))
    want = np_forward(jax.tree.map(lambda x: np_dequantize(x) if is_q(x) else np.asarray(x), loaded, is_leaf=is_q), cfg, ids)
    for p in (loaded, devices.prepare(loaded, cfg)):  # raw (XLA), and prepared (the kernel, or XLA's blocks)
        got = forward(p, cfg, jnp.asarray([ids]), jnp.arange(len(ids))[None])[0][0]
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
