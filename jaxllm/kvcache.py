"""The KV cache: a preallocated pytree, linear or a ring buffer, written at one shared cursor or one per row.

Legend: L layers, B batch, S slots, K kv heads, E head dim, T tokens written in one call,
N sink slots, R = S - N ring slots.

A batch writes at one scalar `cursor` (a column count): prompts are left-padded so that they
end in the same column, and each slot's position (-1 for padding or empty) masks what a row
must not see. Each write is then one in-place slice update. A decoder whose rows move at their
own pace (speculative decoding: each row keeps the drafts it accepted) gives the cache a
per-row cursor [B] (`per_row`): each write becomes a scatter of the new columns at each row's
own slots. Reads never look at the cursor, only at `pos`.

Two layouts (static, chosen when the cache is made):

    linear   column c lives in slot c; S >= every column ever written
    ring     slots [0, N) are attention sinks: each row's tokens at positions 0..N-1 (StreamingLLM,
             Xiao et al. 2023); slots [N, S) are a ring: column c lives in slot N + c % R, so
             the cache keeps the last R columns and never grows. With N = 0 this is the
             sliding-window cache of a Mistral-style model (R = its window).

In a ring with sinks, positions inside attention are the slots' positions in the kept
sequence, not the tokens' original ones, so keys are stored without RoPE and rotated when
read (model.py).

Keys and values are stored heads-major, [L, B, K, S, E], as HF transformers and vLLM store
them: a decode step's attention contracts each row and kv head's [S, E] block with its
queries, and here that block is contiguous. Stored [L, B, S, K, E], XLA:CPU transposed the
whole cache for keys and values in every layer and step (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.errors import GenerationError

KV_DTYPES = ("", "int8")  # "" = the compute dtype


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """How generation lays out its cache (static: part of the compiled program's key).

    window: keep only the last `window` tokens in a ring of that many slots (0: the model's own
    sliding window if it has one, else one slot per position); sinks: of those slots, how many
    keep the first tokens for good (attention sinks); prefill_chunk: the prompt block is fed to
    the model this many columns at a time (0 = all at once), which bounds prefill's peak memory.
    """

    window: int = 0
    sinks: int = 0
    prefill_chunk: int = 512
    dtype: str = ""  # "" = the compute dtype; "int8": values in int8, one float32 scale per token and head

    def check(self, cfg: ModelConfig) -> "CacheSpec":
        """Raises GenerationError naming a bad value; returns self."""
        for name in ("window", "sinks", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GenerationError(f"{name} must be an integer >= 0, got {value!r}")
        if self.sinks and not self.window:
            raise GenerationError("sinks need a window (the cache keeps the sinks and the last window - sinks tokens)")
        if self.dtype not in KV_DTYPES:
            raise GenerationError(f"kv_cache_dtype must be {' or '.join(repr(d or None) for d in KV_DTYPES)}, got {self.dtype!r}")
        if self.window and self.sinks >= self.window:
            raise GenerationError(f"sinks ({self.sinks}) must be smaller than window ({self.window})")
        return self

    def ring_size(self, cfg: ModelConfig) -> int:
        """Slots of the ring cache, or 0 for a linear cache."""
        return self.window or cfg.sliding_window

    def num_slots(self, cfg: ModelConfig, columns: int) -> tuple[int, bool]:
        """(slots, ring?) for a generation that writes `columns` columns in all."""
        ring = self.ring_size(cfg)
        if ring and (ring < columns or self.sinks):
            return ring, True
        return columns, False


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k", "v", "pos", "cursor", "k_scale", "v_scale"],
    meta_fields=["ring", "sinks", "lookahead", "view"],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, B, K, S, E] keys (RoPE applied, except in a ring with sinks); int8 if quantized
    v: jax.Array  # [L, B, K, S, E] values; int8 if quantized
    pos: jax.Array  # [B, S] int32 position of the token in each slot; -1 = empty or padding
    cursor: jax.Array  # [] int32 columns written so far, shared by all rows; or [B], one per row (`per_row`)
    k_scale: jax.Array | None = None  # [L, B, K, S] float32 when int8: key = k * k_scale
    v_scale: jax.Array | None = None  # [L, B, K, S] float32 when int8
    ring: bool = False  # static: ring layout (see the module docstring)
    sinks: int = 0  # static: N sink slots at the front of a ring
    # static: ring slots beyond the window, for columns written ahead and then taken back
    # (speculative decoding's rejected drafts); queries still see only the window
    lookahead: int = 0
    # static, linear only: queries read slots [0, view) (0: all). A caller that knows no row has
    # written past `view` (the server, whose slots hold requests of different lengths) sets it
    # per program, so attention reads what is in use instead of every slot.
    view: int = 0

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    @property
    def ring_slots(self) -> int:
        return self.num_slots - self.sinks

    @property
    def rows(self) -> int:
        """Rows this cache holds positions for: the batch, or (a decoder running only the first
        rows of a larger cache, as the server does) the first `rows` rows of `k` and `v`."""
        return self.pos.shape[0]

    @property
    def read_slots(self) -> int:
        """Slots a linear cache's queries read: [0, view), or all of them."""
        return self.view or self.num_slots

    @property
    def window_slots(self) -> int:
        """Slots a query may see (sinks included): all of them, less a ring's lookahead."""
        return self.num_slots - self.lookahead

    @property
    def rope_on_read(self) -> bool:
        """Keys are stored un-rotated and rotated by slot position when read."""
        return self.ring and self.sinks > 0


def init_cache(
    cfg: ModelConfig, batch: int, num_slots: int, dtype=None, *, ring: bool = False, sinks: int = 0, lookahead: int = 0
) -> KVCache:
    """An empty cache of `num_slots` slots per row (dtype defaults to the compute dtype; "int8"
    stores int8 values with a float32 scale per token and kv head). A ring's `lookahead` slots
    are part of `num_slots` but outside the window queries see."""
    dtype = dtype or cfg.compute_dtype
    shape = (cfg.n_layers, batch, cfg.n_kv_heads, num_slots, cfg.dim_per_head)
    layout = dict(ring=ring, sinks=sinks, lookahead=lookahead if ring else 0)
    if dtype == "int8":
        scale = jnp.zeros(shape[:-1], jnp.float32)
        return dataclasses.replace(init_cache(cfg, batch, num_slots, jnp.int8, **layout), k_scale=scale, v_scale=scale)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        pos=jnp.full((batch, num_slots), -1, jnp.int32),
        cursor=jnp.zeros((), jnp.int32),
        **layout,
    )


def per_row(cache: KVCache) -> KVCache:
    """The cache with one cursor per row (all at the shared cursor's column), so rows can advance and
    take back columns on their own (`rewind` with a [B] cursor)."""
    if cache.cursor.ndim:
        return cache
    return dataclasses.replace(cache, cursor=jnp.full(cache.pos.shape[:1], cache.cursor, jnp.int32))


def take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache whose row r is a copy of row `rows[r]` (rows: [R] int; R may differ from B):
    every field follows, scales and layout included, so beams keep a ring, sinks and int8."""
    # One gather per layer: each layer's rows are contiguous, where a gather along axis 1 of
    # the stacked [L, B, K, S, E] buffer moved strided pieces (2.5x slower on CPU).
    follow = lambda buf: None if buf is None else jnp.stack([buf[layer][rows] for layer in range(buf.shape[0])])
    return dataclasses.replace(
        cache, k=follow(cache.k), v=follow(cache.v), k_scale=follow(cache.k_scale), v_scale=follow(cache.v_scale),
        pos=cache.pos[rows], cursor=cache.cursor[rows] if cache.cursor.ndim else cache.cursor,
    )


def write_positions(cache: KVCache, positions: jax.Array) -> KVCache:
    """Records the positions [B, T] of the tokens about to be written at the cursor."""
    # slots on axis 1 here: written as a one-head [B, 1, S] buffer, pos was copied in every step
    return dataclasses.replace(cache, pos=write_slots(cache, cache.pos, positions.astype(jnp.int32), positions, axis=1))


Buffer = tuple  # (values [L, B, K, S, E], float32 scales [L, B, K, S] or None): keys or values


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [B, K, T, E] -> (int8 [B, K, T, E], float32 scale [B, K, T]); symmetric, per token and head."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def read(buf: Buffer, layer, dtype, slots: int | None = None, rows: int | None = None) -> jax.Array:
    """One layer's keys or values [B, K, S, E] in `dtype` (dequantized when int8); with `slots`
    and `rows` (static), only the first that many slots and rows [rows, K, slots, E]."""
    values, scale = buf
    cut = (slice(None, rows), slice(None), slice(None, slots))
    if scale is None:
        return values[layer][cut]
    return (values[layer][cut].astype(jnp.float32) * scale[layer][cut][..., None]).astype(dtype)


def as_stored(buf: Buffer, new: jax.Array, dtype) -> jax.Array:
    """new: [B, K, T, E] -> the values `read` will give back once they are written into `buf`."""
    if buf[1] is None:
        return new
    q, scale = quantize(new)
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def write_layer(cache: KVCache, buf: Buffer, new: jax.Array, layer, positions: jax.Array) -> Buffer:
    """buf: (values [L, B, K, S, E], scales), new: [B, K, T, E], positions [B, T] -> buf with `new`
    in layer `layer`'s slots for the T columns at the cursor (quantized first when int8).

    Writing into the whole stacked buffer (rather than returning a new layer slice) lets XLA
    update it in place inside the layer scan.
    """
    values, scale = buf
    if scale is None:
        return _write_layer(cache, values, new, layer, positions), None
    q, s = quantize(new)
    return _write_layer(cache, values, q, layer, positions), _write_layer(cache, scale, s, layer, positions)


def _write_layer(cache: KVCache, buf: jax.Array, new: jax.Array, layer, positions: jax.Array) -> jax.Array:
    """buf: values [L, B, K, S, E] or scales [L, B, K, S]; new: [B, K, T, ...]."""
    new = new.astype(buf.dtype)
    tail = (0,) * (buf.ndim - 4)
    if cache.cursor.ndim and not cache.sinks:  # per-row cursors: one scatter into the stacked buffer
        return _scatter_rows(cache, buf, new, axis=2, layer=layer)
    if not cache.ring or (new.shape[2] == 1 and not cache.sinks):
        slot = cache.cursor % cache.ring_slots if cache.ring else cache.cursor
        return jax.lax.dynamic_update_slice(buf, new[None], (layer, 0, 0, slot) + tail)
    layer_buf = write_slots(cache, jax.lax.dynamic_index_in_dim(buf, layer, keepdims=False), new, positions)
    return jax.lax.dynamic_update_slice(buf, layer_buf[None], (layer, 0, 0, 0) + tail)


def write_slots(cache: KVCache, buf: jax.Array, new: jax.Array, positions: jax.Array, axis: int = 2) -> jax.Array:
    """buf: [B, K, S, ...], new: [B, K, T, ...], positions: [B, T] -> buf with the T columns at the
    cursor; slots (and columns) on `axis`: 2 for a layer's keys/values or scales, 1 for `pos` [B, S].

    Linear: slots cursor..cursor+T-1. Ring: sink slots take each row's tokens at positions
    0..N-1 wherever they are in the block (a per-row gather: exact); ring slots take the last
    min(T, R) columns at N + column % R.
    """
    new = new.astype(buf.dtype)

    def at(slot):  # start indices of an update at `slot`
        return tuple(slot if d == axis else 0 for d in range(buf.ndim))

    if cache.cursor.ndim:
        return _write_rows(cache, buf, new, positions, axis)
    if not cache.ring:
        return jax.lax.dynamic_update_slice(buf, new, at(cache.cursor))
    N, R, T = cache.sinks, cache.ring_slots, new.shape[axis]
    buf = _write_sinks(cache, buf, new, positions, axis)
    if T == 1:  # a decode step never wraps: an in-place slice update
        return jax.lax.dynamic_update_slice(buf, new, at(N + cache.cursor % R))
    keep = min(T, R)
    slots = N + (cache.cursor + T - keep + jnp.arange(keep)) % R  # distinct: keep <= R
    ring = (slice(None),) * axis + (slots,)
    return buf.at[ring].set(jax.lax.slice_in_dim(new, T - keep, T, axis=axis), unique_indices=True)


def _row_slots(cache: KVCache, T: int) -> tuple[jax.Array, int]:
    """Per-row cursors: ([B, keep] slots, keep) for the last `keep` of T columns written at each
    row's cursor (a ring keeps the last min(T, R); its sink slots are filled by position)."""
    if not cache.ring:
        return cache.cursor[:, None] + jnp.arange(T), T
    keep = min(T, cache.ring_slots)
    columns = cache.cursor[:, None] + T - keep + jnp.arange(keep)
    return cache.sinks + columns % cache.ring_slots, keep


def _write_sinks(cache: KVCache, buf: jax.Array, new: jax.Array, positions: jax.Array, axis: int) -> jax.Array:
    """A ring's sink slots take each row's tokens at positions 0..N-1 wherever they are in `new`."""
    N = cache.sinks
    if not N:
        return buf
    shape = tuple(-1 if d == 0 else N if d == axis else 1 for d in range(buf.ndim))  # broadcasts over the other axes
    hit = positions[:, :, None] == jnp.arange(N)  # [B, T, N]
    idx = jnp.argmax(hit, axis=1).reshape(shape)  # the column holding position n
    found = jnp.any(hit, axis=1).reshape(shape)
    sinks = jnp.where(found, jnp.take_along_axis(new, idx, axis=axis), jax.lax.slice_in_dim(buf, 0, N, axis=axis))
    return jax.lax.dynamic_update_slice(buf, sinks, (0,) * buf.ndim)


def _write_rows(cache: KVCache, buf: jax.Array, new: jax.Array, positions: jax.Array, axis: int) -> jax.Array:
    """`write_slots` for per-row cursors: the sink slots by position, the rest a scatter at each row's slots."""
    return _scatter_rows(cache, _write_sinks(cache, buf, new, positions, axis), new, axis)


def _scatter_rows(cache: KVCache, buf: jax.Array, new: jax.Array, axis: int, layer=None) -> jax.Array:
    """buf [B, ...] (or, given `layer`, the stacked [L, B, ...]) with the columns of `new` [B, ...]
    (T on `axis`) at each row's slots (`_row_slots`): one scatter."""
    T = new.shape[axis]
    slots, keep = _row_slots(cache, T)
    kept = jnp.moveaxis(jax.lax.slice_in_dim(new, T - keep, T, axis=axis), axis, 1)  # [B, keep, ...]: indexed dims lead
    index = (jnp.arange(new.shape[0])[:, None],) + (slice(None),) * (axis - 1) + (slots,)
    return buf.at[index if layer is None else (layer,) + index].set(kept, unique_indices=True)


def advance(cache: KVCache, num_tokens: int) -> KVCache:
    return dataclasses.replace(cache, cursor=cache.cursor + num_tokens)


def rewind(cache: KVCache, cursor: jax.Array, written: int) -> KVCache:
    """Takes back the columns from `cursor` on ([] or, per-row cursors, [B]), of the `written`
    (static) at most written past it: the cursor moves back and their slots are marked empty (pos -1).

    A linear cache needs only the cursor (its next writes cover those slots before anything
    reads them), but a ring's block write (T > 1) reads the old ring beside its own keys, where
    a taken-back key at a position the block writes again would be seen twice.
    """
    if not cache.ring:
        return dataclasses.replace(cache, cursor=cursor)
    B = cache.pos.shape[0]
    column = lambda c: jnp.broadcast_to(c, (B,))[:, None]  # [B, 1]: each row's (per-row cursors) or the one
    columns = column(cursor) + jnp.arange(written)  # distinct slots in a row: `written` <= the ring's lookahead
    slots = cache.sinks + columns % cache.ring_slots
    rows = jnp.arange(B)[:, None]
    taken = columns < column(cache.cursor)
    pos = cache.pos.at[rows, slots].set(jnp.where(taken, -1, cache.pos[rows, slots]))
    return dataclasses.replace(cache, cursor=cursor, pos=pos)
