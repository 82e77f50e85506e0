"""A Llama-style decoder as pure functions over a params pytree.

Legend: B batch, T tokens in this call, S cache slots, V vocab, D d_model, L layers,
H query heads, K kv heads, E head dim, F d_ff.

    params = {
        "embed":      [V, D],
        "layers": {                      # stacked on a leading L axis, run with lax.scan
            "attn_norm": [L, D],
            "wq": [L, D, H*E], "wk": [L, D, K*E], "wv": [L, D, K*E], "wo": [L, H*E, D],
            "bq": [L, H*E], "bk": [L, K*E], "bv": [L, K*E],   # only with cfg.qkv_bias (Qwen2)
            "mlp_norm":  [L, D],
            "w_gate": [L, D, F], "w_up": [L, D, F], "w_down": [L, F, D],
        },
        "final_norm": [D],
        "lm_head":    [D, V],            # absent when cfg.tie_embeddings
    }

Model families are options of this one decoder (config.py): q/k/v biases (Qwen2); GeGLU,
embeddings scaled by sqrt(D) and (1 + w) norm gains (Gemma).

One `forward` serves training (no cache), prefill and decode (with a cache). Positions
are given explicitly per token; -1 marks padding, which no query ever attends to. Queries are
token-major [B, T, H, E]; keys and values heads-major [B, K, T, E], the cache's layout.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import kvcache, native
from jaxllm.attention import (
    alibi_bias, alibi_slopes, attend, causal_mask, grouped, scores_reference, softmax_values,
)
from jaxllm.native import Float32Weight
from jaxllm.quantize import QuantizedWeight, matmul as quantized_matmul, take_rows
from jaxllm.config import ModelConfig
from jaxllm.kvcache import KVCache

Params = dict


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random init: normal(0.02); output projections scaled by 1/sqrt(2L) (GPT-2)."""
    D, F, L, V = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size
    HE, KE = cfg.n_heads * cfg.dim_per_head, cfg.n_kv_heads * cfg.dim_per_head
    dtype = jnp.dtype(cfg.param_dtype)
    keys = iter(jax.random.split(key, 9))

    def normal(shape, std=0.02):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    out_std = 0.02 / (2 * L) ** 0.5
    gain = lambda shape: jnp.full(shape, 1.0 - cfg.norm_offset, dtype)  # norms start at a gain of 1
    params = {
        "embed": normal((V, D)),
        "layers": {
            "attn_norm": gain((L, D)),
            "wq": normal((L, D, HE)),
            "wk": normal((L, D, KE)),
            "wv": normal((L, D, KE)),
            "wo": normal((L, HE, D), out_std),
            "mlp_norm": gain((L, D)),
            "w_gate": normal((L, D, F)),
            "w_up": normal((L, D, F)),
            "w_down": normal((L, F, D), out_std),
        },
        "final_norm": gain((D,)),
    }
    if cfg.qkv_bias:
        params["layers"].update(bq=jnp.zeros((L, HE), dtype), bk=jnp.zeros((L, KE), dtype), bv=jnp.zeros((L, KE), dtype))
    if not cfg.tie_embeddings:
        params["lm_head"] = normal((D, V))
    return params


def param_shapes(cfg: ModelConfig) -> Params:
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


# ---------------------------------------------------------------------------- building blocks


def linear(x: jax.Array, w: jax.Array | QuantizedWeight | Float32Weight, dtype, out_dtype=None) -> jax.Array:
    """The model's one matmul: x [..., Din] @ w [Din, Dout] in `dtype` -> [..., Dout] in `out_dtype`
    (default `dtype`).

    Products accumulate in at least float32 for float32 and quantized weights. Which matmul runs
    follows from the weight alone (and the rows of x): a plain array is XLA's dot on every
    backend; a QuantizedWeight runs the formulation in its `impl`; a `native.Float32Weight`
    (made by `devices.prepare`) runs the CPU kernel for its range of rows in float32.
    """
    if isinstance(w, QuantizedWeight):
        return quantized_matmul(x, w, dtype, out_dtype=out_dtype)
    if isinstance(w, Float32Weight):
        lead, (i, o) = x.shape[:-1], w.shape
        m = int(np.prod(lead))
        if jnp.dtype(dtype) == jnp.float32 and w.rows[0] <= m <= w.rows[1]:
            y = native.matmul_f32(x.reshape(m, i).astype(jnp.float32), w.w)
            return y.astype(out_dtype or dtype).reshape(*lead, o)
        w = w.w
    return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype), preferred_element_type=out_dtype)


def embed_tokens(table: jax.Array | QuantizedWeight, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [B, T] -> rows of the [V, D] table [B, T, D] (a quantized table dequantizes only those rows)."""
    if isinstance(table, QuantizedWeight):
        return take_rows(table, tokens, dtype)
    return table[tokens].astype(dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """Normalizes in float32, multiplies by (offset + weight) in float32 (Gemma stores its gains
    as weight = gain - 1, so offset 1), and returns x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32)
    return (y * (w + offset if offset else w)).astype(x.dtype)


def norm(x: jax.Array, weight: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The model's RMSNorm with cfg's epsilon and gain offset."""
    return rms_norm(x, weight, cfg.norm_eps, cfg.norm_offset)


ACTIVATION_FNS = {"silu": jax.nn.silu, "gelu": partial(jax.nn.gelu, approximate=False),
                  "gelu_tanh": partial(jax.nn.gelu, approximate=True)}


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [E/2] of the rotary embedding, with cfg's RoPE scaling applied."""
    E = cfg.dim_per_head
    theta = cfg.rope_theta
    if cfg.rope_scaling == "ntk":  # NTK-aware: stretch the base so the lowest frequency spans factor x more
        theta = theta * cfg.rope_factor ** (E / (E - 2))
    inv_freq = 1.0 / theta ** (np.arange(0, E, 2, dtype=np.float64) / E)
    if cfg.rope_scaling == "linear":  # position interpolation: positions / factor
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        # Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, and the
        # band in between blended smoothly.
        context = cfg.rope_original_max_len or cfg.max_seq_len
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        smooth = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    return inv_freq.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, heads_major: bool = False) -> jax.Array:
    """Rotary embedding, "rotate half" layout (HF Llama). x: [B, T, N, E] ([B, N, T, E] when
    heads_major), positions: [B, T]."""
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None] * inv_freq  # [B, T, E/2]
    head_axis = 1 if heads_major else 2
    cos, sin = jnp.expand_dims(jnp.cos(angles), head_axis), jnp.expand_dims(jnp.sin(angles), head_axis)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _qkv(x, lp, cfg: ModelConfig, positions, rotate: bool = True):
    """x: [B, T, D] -> q [B, T, H, E], k/v [B, K, T, E] (RoPE applied to q and k when the model
    uses RoPE and `rotate`). Only this block's keys are transposed to the cache's layout."""
    B, T, _ = x.shape
    dt = cfg.compute_dtype
    h = norm(x, lp["attn_norm"], cfg)

    def project(w, b, heads):
        y = linear(h, lp[w], dt)
        if cfg.qkv_bias:  # Qwen2: the bias is added to the product, before RoPE
            y = y + lp[b].astype(y.dtype)
        return y.reshape(B, T, heads, cfg.dim_per_head)

    q, k, v = project("wq", "bq", cfg.n_heads), project("wk", "bk", cfg.n_kv_heads), project("wv", "bv", cfg.n_kv_heads)
    if cfg.position_encoding == "rope" and rotate:
        inv_freq = rope_inv_freq(cfg)
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    return q, k.swapaxes(1, 2), v.swapaxes(1, 2)


def _slopes(cfg: ModelConfig):
    return alibi_slopes(cfg.n_heads) if cfg.position_encoding == "alibi" else None


def _finish_block(x, attn, lp, cfg: ModelConfig):
    """Attention output projection, residual, then the gated MLP (SwiGLU or GeGLU) and its residual."""
    B, T = x.shape[:2]
    dt = cfg.compute_dtype
    x = x + linear(attn.reshape(B, T, -1), lp["wo"], dt)
    h = norm(x, lp["mlp_norm"], cfg)
    gated = ACTIVATION_FNS[cfg.activation](linear(h, lp["w_gate"], dt)) * linear(h, lp["w_up"], dt)
    return x + linear(gated, lp["w_down"], dt)


# ---------------------------------------------------------------------------- forward


def unstack_layers(params: Params) -> Params:
    """The same params with `layers` as a list of per-layer dicts.

    `forward` then runs the layers as an unrolled Python loop instead of a `lax.scan`
    (`devices.prepare` says on which backends decoding does, and why). Costs compile time
    proportional to depth.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree_util.tree_map(lambda w: w[i], layers) for i in range(n)]}


def _run_layers(layer, carry, layers):
    """carry = layer(carry, lp, i) for every layer: a `lax.scan` over stacked params (i traced),
    or a Python loop when `layers` is a list (i static; see `unstack_layers`)."""
    if isinstance(layers, (list, tuple)):
        for i, lp in enumerate(layers):
            carry = layer(carry, lp, i)
        return carry

    def body(state, lp):
        carry, i = state
        return (layer(carry, lp, i), i + 1), None

    (carry, _), _ = jax.lax.scan(body, (carry, jnp.zeros((), jnp.int32)), layers)
    return carry


def _ring_attention(q, k, v, q_pos, k_pos, cache: KVCache, cfg: ModelConfig) -> jax.Array:
    """Attention over a ring cache's keys k/v [B, K, S', E] at positions k_pos [B, S']: the first
    N = cache.sinks are sink slots (seen by every later query), the rest ring or new keys (seen
    within the window; positions below N live in the sink slots, so are hidden here).

    With sinks, positions inside attention are those of the kept sequence (StreamingLLM): the
    sinks keep 0..N-1, the query at p takes min(p, S - 1) against them, and the other keys keep
    their distance p - r to it. Those keys and the queries are counted from a per-row origin c
    (the earliest real query's p - (S - 1), or 0), so every rotation angle stays below S + T
    however long generation runs.
    """
    N, S = cache.sinks, cache.window_slots  # a lookahead's slots beyond the window stay out of sight
    window = min(S - N, cfg.sliding_window or S - N)
    slopes = _slopes(cfg)
    if not N:  # a plain sliding window: original positions, keys stored rotated
        return attend(q, k, v, q_pos, k_pos, window=window, slopes=slopes, impl=cfg.attention_impl)
    # with sinks: two segments rotated differently, so the scores are built here (the einsum's)
    mask = jnp.concatenate(
        [causal_mask(q_pos, k_pos[:, :N]), causal_mask(q_pos, k_pos[:, N:], window, min_pos=N)], axis=-1
    )
    first = jnp.min(jnp.where(q_pos >= 0, q_pos, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    c = jnp.maximum(first - (S - 1), 0) * (first < jnp.iinfo(jnp.int32).max)  # [B, 1]
    qs_pos, ks_pos = jnp.minimum(q_pos, S - 1), k_pos[:, :N]
    qr_pos, kr_pos = q_pos - c, k_pos[:, N:] - c
    qs, qr, ks, kr = q, q, k[:, :, :N], k[:, :, N:]
    if cfg.position_encoding == "rope":
        inv_freq = rope_inv_freq(cfg)
        qs, qr = rope(q, qs_pos, inv_freq), rope(q, qr_pos, inv_freq)
        ks, kr = rope(ks, ks_pos, inv_freq, heads_major=True), rope(kr, kr_pos, inv_freq, heads_major=True)
    scores = jnp.concatenate([scores_reference(qs, ks), scores_reference(qr, kr)], axis=-1)
    if slopes is not None:
        bias = jnp.concatenate([alibi_bias(slopes, qs_pos, ks_pos), alibi_bias(slopes, qr_pos, kr_pos)], axis=-1)
        scores = scores + grouped(bias, k.shape[1])
    return softmax_values(scores, mask, v)


def hidden_states(
    params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None
) -> tuple[jax.Array, KVCache | None]:
    """tokens, positions: [B, T] -> final-normed hidden states [B, T, D] and the updated cache.

    With a cache, the T new tokens are written at `cache.cursor` and attend to every
    filled slot they may see (a ring cache: the sinks and the window; see kvcache.py); the
    cursor then moves on by T. cfg.sliding_window and ALiBi apply with or without a cache.
    """
    x = embed_tokens(params["embed"], tokens, cfg.compute_dtype)
    if cfg.embed_scale:  # Gemma: sqrt(d_model), rounded to the stored dtype as its reference does
        x = x * jnp.asarray(cfg.d_model**0.5, cfg.param_dtype).astype(x.dtype)
    opts = dict(window=cfg.sliding_window, slopes=_slopes(cfg), impl=cfg.attention_impl)

    if cache is None:

        def layer(x, lp, i):
            q, k, v = _qkv(x, lp, cfg, positions)
            return _finish_block(x, attend(q, k, v, positions, positions, **opts), lp, cfg)

        x = _run_layers(layer, x, params["layers"])
        return norm(x, params["final_norm"], cfg), cache

    old = cache
    cache = kvcache.write_positions(cache, positions)
    T, N = tokens.shape[1], cache.sinks
    # A block of T > 1 columns attends to the ring as it was plus itself, then is written: writing
    # first would overwrite keys its earlier queries still see. A decode step (T = 1) can write
    # first: the slot it takes held the one key that just left the window.
    concat = cache.ring and T > 1

    def layer(carry, lp, i):
        x, kb, vb = carry  # kvcache.Buffer: (values, int8 scales or None)
        q, k, v = _qkv(x, lp, cfg, positions, rotate=not cache.rope_on_read)
        dt = q.dtype
        k_old, v_old = kvcache.read(kb, i, dt), kvcache.read(vb, i, dt)  # read by a ring's block only
        kb = kvcache.write_layer(cache, kb, k, i, positions)
        vb = kvcache.write_layer(cache, vb, v, i, positions)
        if not cache.ring:  # the slots in use (`view`), or all
            S, B = cache.read_slots, cache.rows
            keys, vals = kvcache.read(kb, i, dt, S, B), kvcache.read(vb, i, dt, S, B)
            attn = attend(q, keys, vals, positions, cache.pos[:, :S], **opts)
        elif concat:  # the block's own keys as the cache holds them (int8-rounded), as a decode step sees them
            keys, vals = kvcache.read(kb, i, dt), kvcache.read(vb, i, dt)
            keys = jnp.concatenate([keys[:, :, :N], k_old[:, :, N:], kvcache.as_stored(kb, k, dt)], axis=2)
            vals = jnp.concatenate([vals[:, :, :N], v_old[:, :, N:], kvcache.as_stored(vb, v, dt)], axis=2)
            k_pos = jnp.concatenate([cache.pos[:, :N], old.pos[:, N:], positions], axis=1)
            attn = _ring_attention(q, keys, vals, positions, k_pos, cache, cfg)
        else:
            keys, vals = kvcache.read(kb, i, dt), kvcache.read(vb, i, dt)
            attn = _ring_attention(q, keys, vals, positions, cache.pos, cache, cfg)
        return _finish_block(x, attn, lp, cfg), kb, vb

    carry = (x, (cache.k, cache.k_scale), (cache.v, cache.v_scale))
    x, (k, k_scale), (v, v_scale) = _run_layers(layer, carry, params["layers"])
    cache = kvcache.advance(dataclasses.replace(cache, k=k, v=v, k_scale=k_scale, v_scale=v_scale), T)
    return norm(x, params["final_norm"], cfg), cache


def prefill_length(P: int, chunk: int) -> int:
    """Columns `prefill` feeds for a [B, P] block: P, or P rounded up to whole chunks."""
    return P if not chunk or P <= chunk else -(-P // chunk) * chunk


def prefill(
    params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache, chunk: int = 0
) -> tuple[jax.Array, KVCache]:
    """Feeds a left-padded block tokens, positions: [B, P] into `cache`, `chunk` columns at a time.

    Returns the last column's hidden state [B, D] and the cache. Chunking bounds the attention
    scores to [B, H, chunk, S] instead of [B, H, P, P]: a `lax.scan` over chunks, so compile time
    does not grow with the prompt. A block that is not whole chunks gets more left padding
    (`prefill_length(P, chunk)` columns are written). Into a ring cache, a prompt longer than
    the ring is consumed and only what the ring keeps remains.
    """
    B, P = tokens.shape
    n = prefill_length(P, chunk)
    if n == P and (not chunk or P <= chunk):
        h, cache = hidden_states(params, cfg, tokens, positions, cache)
        return h[:, -1], cache
    tokens = jnp.pad(tokens, ((0, 0), (n - P, 0)))
    positions = jnp.pad(positions, ((0, 0), (n - P, 0)), constant_values=-1)
    split = lambda a: a.reshape(B, n // chunk, chunk).swapaxes(0, 1)  # [chunks, B, chunk]

    def body(cache, block):
        h, cache = hidden_states(params, cfg, block[0], block[1], cache)
        return cache, h[:, -1]

    cache, last = jax.lax.scan(body, cache, (split(tokens), split(positions)))
    return last[-1], cache


def unembed(params: Params, cfg: ModelConfig, h: jax.Array) -> jax.Array:
    """h: [..., D] -> float32 logits [..., V] (the embedding matrix when tied)."""
    w = params["embed"] if cfg.tie_embeddings else params["lm_head"]
    dt = cfg.compute_dtype
    if cfg.tie_embeddings and not isinstance(w, QuantizedWeight):  # [V, D]; quantized, it is stored [D, V] (quantize.py)
        return jnp.einsum("...d,vd->...v", h.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
    return linear(h, w, dt, out_dtype=jnp.float32)


def forward(
    params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None
) -> tuple[jax.Array, KVCache | None]:
    """tokens, positions: [B, T] int -> (logits [B, T, V] float32, updated cache or None).

    Pure: composes with `jax.jit` (cfg static), `jax.vmap` and `jax.grad`.
    """
    h, cache = hidden_states(params, cfg, tokens, positions, cache)
    return unembed(params, cfg, h), cache
