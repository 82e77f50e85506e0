"""The model: numerics against a numpy reference, the cache against a full forward, and JAX transforms."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import forward, init_cache, init_params
from jaxllm.generate import left_pad
from reference import np_forward
from conftest import tiny_config


def full_logits(params, cfg, ids):
    toks = jnp.asarray([ids], jnp.int32)
    return np.asarray(forward(params, cfg, toks, jnp.arange(len(ids))[None])[0][0])


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy_reference(tied):
    cfg = tiny_config(97, tie_embeddings=tied, n_kv_heads=2)  # GQA: 2 query heads per kv head
    params = init_params(cfg, jax.random.key(1))
    params = jax.tree_util.tree_map(lambda x: x * 10 if x.ndim > 1 else x, params)
    ids = list(np.random.default_rng(0).integers(0, 97, size=11))
    np.testing.assert_allclose(full_logits(params, cfg, ids), np_forward(params, cfg, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompt_len", [1, 4, 9])
def test_incremental_decoding_equals_full_forward(cfg, params, prompt_len):
    ids = list(np.random.default_rng(prompt_len).integers(4, cfg.vocab_size, size=14))
    want = full_logits(params, cfg, ids)
    cache = init_cache(cfg, 1, 24)
    logits, cache = forward(params, cfg, jnp.asarray([ids[:prompt_len]]), jnp.arange(prompt_len)[None], cache)
    got = [np.asarray(logits[0])]
    for t in range(prompt_len, len(ids)):
        logits, cache = forward(params, cfg, jnp.asarray([[ids[t]]]), jnp.asarray([[t]]), cache)
        got.append(np.asarray(logits[0]))
    np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5, rtol=0)
    assert int(cache.cursor) == len(ids)


def test_left_padded_batch_with_cache_equals_each_row_alone(cfg, params):
    rng = np.random.default_rng(7)
    prompts = [list(rng.integers(4, cfg.vocab_size, size=n)) for n in (3, 8, 5)]
    extra = [list(rng.integers(4, cfg.vocab_size, size=4)) for _ in prompts]
    tokens, positions = left_pad(prompts, 8, pad_id=0)
    cache = init_cache(cfg, 3, 16)
    logits, cache = forward(params, cfg, jnp.asarray(tokens), jnp.asarray(positions), cache)
    steps = [np.asarray(logits)]
    next_pos = positions.max(axis=1) + 1
    for t in range(4):
        col = np.array([[e[t]] for e in extra])
        logits, cache = forward(params, cfg, jnp.asarray(col), jnp.asarray(next_pos + t)[:, None], cache)
        steps.append(np.asarray(logits))
    for row, (p, e) in enumerate(zip(prompts, extra)):
        want = full_logits(params, cfg, p + e)
        got = np.concatenate([steps[0][row, 8 - len(p) :]] + [s[row] for s in steps[1:]])
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def moved_arrays(hlo: str, *shapes) -> list[str]:
    """The transposes and copies in compiled HLO text whose shape, size-1 axes dropped, is a
    permutation of one of `shapes`."""
    wanted = [sorted(shape) for shape in shapes]
    moved = []
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\{[^}]*\} (transpose|copy)\(", line)
        if m and sorted(int(n) for n in m.group(1).split(",") if n and int(n) > 1) in wanted:
            moved.append(line.strip())
    return moved


def unfused_dots(hlo: str) -> list[str]:
    """The dots of compiled HLO text outside fused computations (a fusion's dot runs in a library)."""
    dots, fused = [], False
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):  # a computation's header
            fused = "fused_computation" in line.split("(")[0]
        elif not fused and re.search(r"= \S+ dot\(", line):
            dots.append(line.strip())
    return dots


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("unstacked", [False, True])
def test_a_decode_step_reads_the_cache_as_stored(cfg, params, kv_dtype, unstacked):
    """The cache is heads-major [L, B, K, S, E], the layout the decode step's attention einsums
    contract, so the compiled step neither transposes nor copies a layer of keys or values, with
    layers in a scan or unrolled (what `generate` runs on CPU). (Stored [L, B, S, K, E], XLA:CPU
    transposed each layer's keys and values in every step; with v as a dot's left operand, the
    attention dot left XNNPACK for XLA's slow generic one.)"""
    from jaxllm.model import unstack_layers

    params = unstack_layers(params) if unstacked else params
    B, S, K, E = 3, 16, cfg.n_kv_heads, cfg.dim_per_head
    assert len({B, S, K, E}) == 4  # distinct sizes, so a shape tells the axes apart
    step = jax.jit(
        lambda p, c: forward(p, cfg, jnp.ones((B, 1), jnp.int32), jnp.full((B, 1), 5), c), donate_argnums=1
    )
    hlo = step.lower(params, init_cache(cfg, B, S, kv_dtype)).compile().as_text()
    assert "dynamic-update-slice" in hlo  # the step's cache write is in the text read
    assert moved_arrays(hlo, (B, K, S, E), (cfg.n_layers, B, K, S, E)) == []  # neither a layer nor the stack
    if "ynn_fusion" in hlo:  # XLA:CPU with XNNPACK: the attention dots run there, not in XLA's generic emitter
        assert unfused_dots(hlo) == []


def test_padded_full_forward_equals_unpadded(cfg, params):
    ids = [9, 10, 11, 12, 13]
    tokens, positions = left_pad([ids], 8, pad_id=3)
    logits, _ = forward(params, cfg, jnp.asarray(tokens), jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(logits[0, 3:]), full_logits(params, cfg, ids), atol=1e-5, rtol=0)


def test_grad_matches_finite_differences(cfg):
    params = init_params(cfg, jax.random.key(3))
    tokens = jnp.asarray([[5, 9, 17, 33, 2, 8]])
    positions = jnp.arange(6)[None]

    def loss(p):
        logits, _ = forward(p, cfg, tokens[:, :-1], positions[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grads = jax.grad(loss)(params)
    # Directional derivative along a random direction, central differences.
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    direction = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    eps = 1e-3
    shifted = lambda s: jax.tree_util.tree_map(lambda p, d: p + s * eps * d, params, direction)
    numeric = (loss(shifted(1.0)) - loss(shifted(-1.0))) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=2e-2)


def test_forward_composes_with_jit_and_vmap(cfg, params):
    tokens = jnp.asarray(np.random.default_rng(1).integers(4, cfg.vocab_size, size=(3, 7)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(7), (3, 7))
    batched = jax.jit(forward, static_argnames="cfg")(params, cfg, tokens, positions)[0]
    one = lambda t, p: forward(params, cfg, t[None], p[None])[0][0]
    mapped = jax.vmap(one)(tokens, positions)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(batched), atol=1e-5, rtol=0)


def test_bfloat16_compute_stays_close_to_float32(cfg, params):
    ids = [5, 6, 7, 8, 9, 10, 11]
    f32 = full_logits(params, cfg, ids)
    bf16 = full_logits(params, cfg.replace(compute_dtype="bfloat16"), ids)
    assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
    assert not np.array_equal(bf16, f32)  # the option really changes the arithmetic


def test_unstacked_layers_give_the_same_logits_and_cache(cfg, params):
    from jaxllm.model import unstack_layers

    ids = jnp.asarray([[5, 6, 7, 8, 9]])
    pos = jnp.arange(5)[None]
    flat = unstack_layers(params)
    assert isinstance(flat["layers"], list) and len(flat["layers"]) == cfg.n_layers
    np.testing.assert_allclose(np.asarray(forward(flat, cfg, ids, pos)[0]), np.asarray(forward(params, cfg, ids, pos)[0]), atol=1e-5)
    a = forward(params, cfg, ids, pos, init_cache(cfg, 1, 8))
    b = forward(flat, cfg, ids, pos, init_cache(cfg, 1, 8))
    np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(a[1].k), np.asarray(b[1].k), atol=1e-5)
