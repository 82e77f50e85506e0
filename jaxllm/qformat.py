"""The bytes of a quantized weight, as arrays: int4 nibble packing, dequantizing values with
their scales, and the CPU kernel's column tiles.

Legend: I input rows (stored, so I' when padded; see quantize.py), O output columns, G group
size, T columns per tile.

Both quantize.py (the `QuantizedWeight` pytree, `quantize`, the matmul) and native.py (the
kernel, whose XLA reference formulation reads the same bytes) need what the bytes mean; kept
here, below both, native.py does not import quantize.py, which imports it.

int4 packing: within each group of G input rows, packed row j holds row j in its low nibble
and row j + G/2 in its high nibble (two's complement), so unpacking is two shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack_int4(q: jax.Array, group_size: int) -> jax.Array:
    """int values in [-8, 7] [..., I, O] -> uint8 [..., I/2, O]: per group, low nibble = first half."""
    *lead, i, o = q.shape
    g = q.astype(jnp.uint8).reshape(*lead, i // group_size, 2, group_size // 2, o) & 0xF
    return (g[..., 0, :, :] | (g[..., 1, :, :] << 4)).reshape(*lead, i // 2, o)


def unpack_int4(packed: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array]:
    """uint8 [..., I/2, O] -> (first halves, second halves) of each group, int8 [..., I/G, G/2, O] each."""
    *lead, h, o = packed.shape
    p = jax.lax.bitcast_convert_type(packed, jnp.int8).reshape(*lead, h * 2 // group_size, group_size // 2, o)
    return jnp.left_shift(p, 4) >> 4, p >> 4  # arithmetic shifts sign-extend each nibble


def dequantize_values(bits: int, group_size: int, values: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """values [..., I or I/2, O], scales [..., I/G, O] -> float [..., I, O] in `dtype`."""
    if bits == 8:
        return (values.astype(jnp.float32) * scales).astype(dtype)
    lo, hi = unpack_int4(values, group_size)  # [..., I/G, G/2, O]
    w = jnp.concatenate([lo, hi], axis=-2).astype(jnp.float32) * scales[..., None, :]
    return w.reshape(*values.shape[:-2], values.shape[-2] * 2, values.shape[-1]).astype(dtype)


def untile_values(values: jax.Array, columns: int) -> jax.Array:
    """The kernel's layout [ceil(O/T), rows, T] -> [rows, O] (O = `columns`; the last tile's
    padding dropped). The inverse of `quantize.tile_weight`."""
    n, rows, t = values.shape
    return values.transpose(1, 0, 2).reshape(rows, n * t)[:, :columns]
