"""Attention with position-based masks.

Legend: B batch, T queries, S keys (cache slots), H query heads, K kv heads, G = H // K
query heads per kv head, E head dim.

Masks are built from positions, not indices: a key at position -1 is empty or padding
and is never attended to; otherwise a query at position p sees keys at positions <= p.
The same rule serves a full forward, a left-padded batch, and a cache whose slots may
later be reused (a ring buffer), without special cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A finite "minus infinity": a fully masked row (a padding query) then averages values
# instead of producing NaN, and 0 * value stays finite for every key.
MASKED = -1e30


def causal_mask(q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """q_pos: [B, T], k_pos: [B, S] -> bool [B, T, S], True where the query may see the key."""
    return (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Reference grouped-query attention (einsum), softmax in float32.

    q: [B, T, H, E], k/v: [B, S, K, E], q_pos: [B, T], k_pos: [B, S] -> [B, T, H, E]
    """
    B, T, H, E = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, E)
    scores = jnp.einsum("btkge,bske->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (E**-0.5)
    mask = causal_mask(q_pos, k_pos)[:, None, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1)
    out = jnp.einsum("bkgts,bske->btkge", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, E)
