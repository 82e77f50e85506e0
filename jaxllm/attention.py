"""Attention with position-based masks, behind one function and several backends.

Legend: B batch, T queries, S keys (cache slots), H query heads, K kv heads, G = H // K
query heads per kv head, E head dim.

Queries and outputs are token-major [B, T, H, E], as the projections make them; keys and values
are heads-major [B, K, S, E], the KV cache's layout (kvcache.py), so a decode step's einsums read
the cache as stored. The backends that want [B, S, K, E] (dot_product_attention) transpose
inside their call.

Masks are built from positions, not indices: a key at position -1 is empty or padding
and is never attended to; otherwise a query at position p sees keys at positions <= p,
and with a sliding window W only those at positions > p - W (Mistral: W keys, the query's
own included). The same rule serves a full forward, a left-padded batch, and a ring-buffer
cache whose slots are reused, without special cases.

Backends (`impl`), all computing the same function:

    "reference"  einsum + float32 softmax: the oracle the tests compare the others with
    "xla"        jax.nn.dot_product_attention(implementation="xla")
    "cudnn"      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention,
                 NVIDIA GPUs, bfloat16/float16, head dim a multiple of 8 and <= 256; anything
                 else falls back to "xla" with a warning naming the reason
    "pallas"     jaxllm's flash-attention kernels for TPUs (flash.py): the position mask is built
                 inside each block, so padding, causality, chunks of a prompt against the cache,
                 sliding windows and ALiBi all run in the kernel with memory linear in T, and
                 grouped-query heads share their K/V without copies. Off a TPU it runs in Pallas'
                 interpret mode (slow: for tests), with a warning
    "auto"       for one query (decode steps) the einsum on every backend: it reads the
                 heads-major cache as stored (on CPU as fast or faster than XLA's, as measured
                 in benchmarks/RESULTS.md), and a flash kernel has nothing to tile. For blocks of
                 queries (prefill, training): cudnn on GPU (when supported; XLA otherwise),
                 pallas on TPU (for blocks of at least 128 queries; XLA below), "xla" on CPU
                 (1.2-1.6x faster than the einsum there)

Decode steps (one query) take the einsum under every setting. A ring cache with attention sinks
re-rotates its keys per segment (model._ring_attention) and always takes the einsum; `describe`
says so. XLA:CPU has no float16 dot with float32 results, which dot_product_attention asks
for, so float16 on a CPU takes the einsum (whose float32 accumulation XLA:CPU does support).

ALiBi (Press et al., 2022, "Train Short, Test Long") adds -slope_h * (q_pos - k_pos) to the
scores instead of rotating q and k.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import flash

# A finite "minus infinity": a fully masked row (a padding query) then averages values
# instead of producing NaN, and 0 * value stays finite for every key.
MASKED = -1e30


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, window: int = 0, min_pos: int = 0) -> jax.Array:
    """q_pos: [B, T], k_pos: [B, S] -> bool [B, T, S], True where the query may see the key.

    window W > 0 keeps keys at positions in (q_pos - W, q_pos]; min_pos hides keys below it
    (the ring part of an attention-sinks cache, whose first tokens live in the sink slots).
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    ok = (k >= max(min_pos, 0)) & (k <= q)
    if window:
        ok &= k > q - window
    return ok


def alibi_slopes(n_heads: int) -> np.ndarray:
    """ALiBi's per-head slopes [H]: the geometric sequence 2^(-8/n), 2^(-16/n), ... for a power of
    two n; otherwise those of the largest power of two below n, then every other slope of twice
    that many (the interleaving rule of the paper's reference code)."""

    def geometric(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    n = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(n)
    if n < n_heads:
        slopes += geometric(2 * n)[0::2][: n_heads - n]
    return np.asarray(slopes, np.float32)


def alibi_bias(slopes: np.ndarray, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """slopes [H], q_pos [B, T], k_pos [B, S] -> float32 [B, H, T, S] = -slope * (q_pos - k_pos)."""
    dist = (q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)
    return -jnp.asarray(slopes)[None, :, None, None] * dist[:, None]


def scores_reference(q: jax.Array, k: jax.Array) -> jax.Array:
    """q: [B, T, H, E], k: [B, K, S, E] -> scaled float32 scores [B, K, G, T, S] (head h = k * G + g)."""
    B, T, H, E = q.shape
    K = k.shape[1]
    s = jnp.einsum("btkge,bkse->bkgts", q.reshape(B, T, K, H // K, E), k, preferred_element_type=jnp.float32)
    return s * (E**-0.5)


def grouped(bias: jax.Array, K: int) -> jax.Array:
    """[B, H, T, S] -> [B, K, G, T, S], the layout of `scores_reference`."""
    B, H, T, S = bias.shape
    return bias.reshape(B, K, H // K, T, S)


def softmax_values(scores: jax.Array, mask: jax.Array, v: jax.Array) -> jax.Array:
    """scores [B, K, G, T, S] f32, mask [B, T, S] bool, v [B, K, S, E] -> [B, T, H, E]."""
    B, K, G, T, S = scores.shape
    probs = jax.nn.softmax(jnp.where(mask[:, None, None], scores, MASKED), axis=-1)
    # probs @ v in this operand order: jnp.einsum put v first, and XLA:CPU then ran the dot with its
    # generic emitter instead of XNNPACK (1.6 ms of a small-config batch-8 decode step)
    out = jax.lax.dot_general(probs.astype(v.dtype), v, (((4,), (2,)), ((0, 1), (0, 1))))  # [B, K, G, T, E]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, v.shape[-1])


def attend_reference(q, k, v, mask, bias=None):
    """The oracle. q: [B, T, H, E], k/v: [B, K, S, E], mask: [B, T, S], bias: [B, H, T, S] or None."""
    scores = scores_reference(q, k)
    if bias is not None:
        scores = scores + grouped(bias, k.shape[1])
    return softmax_values(scores, mask, v)


def _attend_dpa(q, k, v, mask, bias, implementation):
    """jax.nn.dot_product_attention with the position mask as a bool mask (xla) or an additive bias
    (cudnn takes arbitrary masks only as a bias). It wants k/v as [B, S, K, E]."""
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if implementation == "cudnn":
        # cuDNN takes the bias in q's dtype: -1e30 would be -inf in float16, and a padding row of
        # -inf turns into NaN that reaches real rows through 0 * NaN; half the dtype's lowest stays
        # finite with an ALiBi bias added
        add = jnp.where(mask[:, None], 0.0, float(jnp.finfo(q.dtype).min) / 2).astype(jnp.float32)
        bias = add if bias is None else bias + add
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), implementation="cudnn")
    return jax.nn.dot_product_attention(
        q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask[:, None], implementation="xla"
    )


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:  # once per reason, not once per traced layer
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def _fallback(reason: str, to: str = "xla") -> str:
    _warn_once(f"attention: {reason}; using the {'XLA implementation' if to == 'xla' else 'einsum'}")
    return to


PALLAS_MIN_QUERIES = 128  # "auto" on a TPU: blocks of fewer queries than one kernel block take XLA's


def _unsupported(impl: str, backend: str, dtype, E: int) -> str | None:
    """Why `impl` cannot run here for this dtype and head dim (None: it can)."""
    if impl == "cudnn":
        if backend != "gpu":
            return f"cudnn attention needs an NVIDIA GPU (this is {backend})"
        if dtype not in (jnp.bfloat16, jnp.float16):
            return f"cudnn flash attention needs bfloat16/float16 (compute dtype is {jnp.dtype(dtype).name})"
        if E % 8 or E > 256:
            return f"cudnn flash attention needs a head dim that is a multiple of 8 and <= 256 (got {E})"
    if impl == "xla" and backend == "cpu" and dtype == jnp.float16:
        return "XLA:CPU's dot_product_attention asks for a float16 dot with float32 results, which XLA:CPU lacks"
    return None


def resolve_impl(impl: str, q: jax.Array, k: jax.Array) -> str:
    """The backend that will really run for q [B, T, H, E] against k [B, K, S, E] on this device
    (static: at trace time). Explicit choices that cannot run warn once and fall back."""
    backend = jax.default_backend()
    E, T = q.shape[-1], q.shape[1]
    if T == 1:  # decode steps: the einsum reads the heads-major cache as stored, on every backend
        return "reference"  # (dot_product_attention would transpose it; nothing for flash to tile)
    explicit = impl != "auto"
    if not explicit:
        impl = {"gpu": "cudnn", "tpu": "pallas"}.get(backend, "xla")
        if impl == "pallas" and T < PALLAS_MIN_QUERIES:
            impl = "xla"
    if impl == "pallas":
        if backend != "tpu":
            _warn_once(f"attention: the Pallas TPU kernel runs in interpret mode on {backend} (slow; meant for tests)")
        return impl
    why = _unsupported(impl, backend, q.dtype, E)
    if why:
        to = _resolve_xla(backend, q.dtype, E) if impl == "cudnn" else "reference"
        return _fallback(why, to) if explicit else to
    return impl


def _resolve_xla(backend, dtype, E) -> str:
    return "reference" if _unsupported("xla", backend, dtype, E) else "xla"


def describe(impl: str, dtype, head_dim: int, *, sinks: bool = False) -> str:
    """One line for --verbose: which backend runs attention for blocks of queries (prefill,
    training) and for decode steps on this device, and why."""
    backend = jax.default_backend()
    dtype = jnp.dtype(dtype)
    block = impl
    if impl == "auto":
        block = {"gpu": "cudnn", "tpu": "pallas"}.get(backend, "xla")
    why = None if block == "pallas" else _unsupported(block, backend, dtype, head_dim)
    if why:
        block = "xla" if block == "cudnn" else "reference"
        block = "reference" if _unsupported(block, backend, dtype, head_dim) else block
    names = {"reference": "the einsum", "xla": "XLA's dot_product_attention", "cudnn": "cuDNN flash attention",
             "pallas": "the Pallas flash kernels" + ("" if backend == "tpu" else " in interpret mode (slow)")}
    text = f"attention ({impl}): blocks of queries take {names[block]}"
    if why:
        text += f" ({why})"
    if impl == "auto" and backend == "tpu":
        text += f" for >= {PALLAS_MIN_QUERIES} queries, XLA's below"
    text += "; decode steps take the einsum (one query reads the heads-major cache as stored)"
    if sinks:
        text += "; with attention sinks every block takes the einsum (keys are re-rotated per segment)"
    return text


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
    *, window: int = 0, min_pos: int = 0, slopes: np.ndarray | None = None, impl: str = "reference",
) -> jax.Array:
    """Grouped-query attention under the position mask, by the backend `impl` (static).

    q: [B, T, H, E], k/v: [B, K, S, E], q_pos: [B, T], k_pos: [B, S] -> [B, T, H, E]
    window: sliding window W (0 = none); min_pos: see `causal_mask`; slopes [H]: ALiBi (None =
    none; RoPE is the caller's). Softmax in float32. Queries that see no key (padding) return
    values that are never used: the average of all values, or zeros from the flash kernels.
    """
    impl = resolve_impl(impl, q, k)
    if impl == "pallas":
        return flash.flash_attention(q, k, v, q_pos, k_pos, window=window, min_pos=min_pos, slopes=slopes,
                                     interpret=jax.default_backend() != "tpu")
    bias = None if slopes is None else alibi_bias(slopes, q_pos, k_pos)
    mask = causal_mask(q_pos, k_pos, window, min_pos)
    if impl == "reference":
        return attend_reference(q, k, v, mask, bias)
    return _attend_dpa(q, k, v, mask, bias, impl)
