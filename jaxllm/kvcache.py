"""The KV cache: a preallocated pytree written at one shared cursor.

Legend: L layers, B batch, S slots, K kv heads, E head dim.

All rows write at the same scalar `cursor`: prompts are left-padded so that they end in
the same column, and each slot's position (-1 for padding or empty) masks what a row must
not see. A per-row cursor would make every write a scatter, which is slow on TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "pos", "cursor"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, S, K, E] keys, RoPE already applied
    v: jax.Array  # [L, B, S, K, E] values
    pos: jax.Array  # [B, S] int32 position of the token in each slot; -1 = empty or padding
    cursor: jax.Array  # [] int32 next slot to write, shared by all rows

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]


def init_cache(cfg: ModelConfig, batch: int, num_slots: int, dtype=None) -> KVCache:
    """An empty cache of `num_slots` slots per row (dtype defaults to the compute dtype)."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.n_layers, batch, num_slots, cfg.n_kv_heads, cfg.dim_per_head)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch, num_slots), -1, jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
    )


def write_positions(cache: KVCache, positions: jax.Array) -> KVCache:
    """Records the positions [B, T] of the tokens about to be written at the cursor."""
    pos = jax.lax.dynamic_update_slice(cache.pos, positions.astype(jnp.int32), (0, cache.cursor))
    return dataclasses.replace(cache, pos=pos)


def write_layer(buf: jax.Array, new: jax.Array, layer: jax.Array, cursor: jax.Array) -> jax.Array:
    """buf: [L, B, S, K, E], new: [B, T, K, E] -> buf with `new` at [layer, :, cursor:cursor+T].

    Writing into the whole stacked buffer (rather than returning a new layer slice)
    lets XLA update it in place inside the layer scan.
    """
    return jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), (layer, 0, cursor, 0, 0))


def advance(cache: KVCache, num_tokens: int) -> KVCache:
    return dataclasses.replace(cache, cursor=cache.cursor + num_tokens)

