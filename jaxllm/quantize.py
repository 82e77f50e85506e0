"""Weight-only quantization: int8 per output channel, int4 with group-wise scales.

Legend: I input features (the contracted axis), O output features, G group size, M rows of x.

A `QuantizedWeight` is a pytree node that stands in for a float weight in the [I, O]
orientation that `x @ w` reads, with groups running down the input axis:

    bits=8: values int8  [..., I, O]     scales f32 [..., 1, O]      (one scale per output channel)
    bits=4: values uint8 [..., I'/2, O]  scales f32 [..., I'/G, O]   (two values per byte)

I' is I rounded up to a multiple of G: where G does not divide I (d_ff 704 at G 128, a d_model
of 32 at G 64), `pad` = I' - I zero rows are appended to the weight, and the matmul appends as
many zeros to x, so the group is always the G asked for and a saved checkpoint records the group
every weight has. (Choosing another divisor of I instead gave groups that `load_checkpoint`
rejects, 44 for d_ff 176 at G 64.) Zero rows change no group's scale (a zero moves max(w) or
min(w) at most to 0, where its term of the scale below is 0) and store q = 0.

Leading axes (the stacked layer axis L) pass through, so quantized params still run under
`lax.scan`, and `model.unstack_layers` slices them like arrays. The embedding table [V, D] is
stored as its transpose [D, V] (`transposed=True`): that is the tied output head's [I, O], and
an embedding lookup gathers the ids' columns and dequantizes only those.

Symmetric quantization (no zero point): int8 scale = max|w| / 127 over the output channel, q in
[-127, 127]; int4 scale = max(max(w) / 7, min(w) / -8) over the group, the smallest scale that
fits both extremes into [-8, 7] (8/7 finer than max|w| / 7 when the negative extreme dominates;
val perplexity of the bundled model at g=64: +5.4% -> see RESULTS.md). q = round(w / scale), so
|w - q * scale| <= scale / 2 everywhere.

int4 packing: within each group of G input rows, packed row j holds row j in its low nibble
and row j + G/2 in its high nibble (two's complement). Unpacking is two shifts and no
interleave; the matmul splits x into the same two halves instead of shuffling weights.

Which formulation a weight's matmul runs is a static field of the weight (`impl`), chosen
once by `devices.prepare` for the backend; a weight as `quantize` makes it (`impl="xla"`) runs
the same plain XLA function everywhere, which is what training and a user's own jit/vmap/grad
code get. Why there are three (measured on XLA:CPU, 2-core AVX-512 EPYC, see
benchmarks/RESULTS.md): XLA:CPU does not fuse a convert into a dot (XNNPACK/oneDNN/YNNPACK
fusion flags included), so `x @ q.astype(f32)` first writes the whole float weight to a fresh
buffer, and the page faults of a multi-MB buffer cost more than the matmul (int8 768x32000,
one row of x: 26 ms, against 2.3 ms for float32).

- "native": jaxllm's own CPU kernel (native.py, kernels/qmatmul_cpu.cc), which widens the
  bytes in registers and reads nothing else: about 4x faster decoding than float32 (small
  config, batch 1), at every M measured (1-64). Usually in the kernel's tiled layout (`tile`).
- "xla_blocked": for a CPU without the kernel (another CPU, no compiler, JAXLLM_NATIVE=0):
  small-M products as a `lax.scan` over blocks of input rows (int8: 64 rows; int4: one group):
  each block is dequantized into a small cache-resident buffer and accumulated, so the weights
  are read from memory once, as int8 or packed int4; the int8 per-channel scale multiplies the
  output once. Larger M (batch > 8 in decoding, prefill, training) is compute-bound: there the
  blocks cost more than one dequantize of the whole weight, which is what it does (SMALL_M).
- "xla": one dequantize of the whole weight, then the matmul; fusion is left to XLA. So do
  GPUs and TPUs, where a loop of small matmuls would launch many kernels. Measured on an H100
  (benchmarks/gpu_check.sh, RESULTS.md): XLA:GPU wrote each dequantized weight (int8 widened
  and scaled) out in bf16 before its GEMM, so int8 decoded at 0.65x bf16. int8 therefore feeds
  the dot a bare convert and scales the output, the operand pattern XLA:GPU's Triton GEMM
  fusion takes in (to be measured on the next GPU run); int4's nibble unpacking has no such
  form yet.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import native
from jaxllm.errors import ConfigError
from jaxllm.qformat import dequantize_values, pack_int4, unpack_int4, untile_values

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)
QMAX = {8: 127, 4: 7}
INT8_BLOCK = 64  # input rows per step of the small-M int8 matmul (16..256 were within noise end to end)
# Rows of x up to which the blocked matmul is used. Small config, int8, greedy decoding (tok/s,
# blocked vs dequantize whole): batch 8 261 vs 216, batch 16 339 vs 343, batch 32 389 vs 471.
SMALL_M = 8
IMPLS = ("xla", "xla_blocked", "native")
KERNEL_TILE = 128  # columns per tile in the CPU kernel's layout (kTile in kernels/qmatmul_cpu.cc)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scales"],
    meta_fields=["bits", "group_size", "transposed", "tile", "impl", "pad"],
)
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    values: jax.Array  # int8 [..., I, O] (bits 8) or uint8 [..., I'/2, O] (bits 4, packed); tiled: [ceil(O/T), rows, T]
    scales: jax.Array  # f32 [..., I'/G, O]; G = I for bits 8
    bits: int  # 8 or 4
    group_size: int  # G along the input axis (= I for per-channel int8)
    transposed: bool  # True: the logical weight is [..., O, I] (the embedding table), stored as [I, O]
    tile: int = 0  # T > 0: the CPU kernel's layout, column tiles of T stored one after another (see tile_weight)
    impl: str = "xla"  # which matmul runs (IMPLS; see the module docstring): set by devices.prepare
    pad: int = 0  # zero input rows stored after the I real ones (I' = I + pad, a multiple of G; int4 only)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the float weight this stands for."""
        *lead, n, o = self.values.shape
        if self.tile:
            lead, n, o = [], n, self.scales.shape[-1]
        i = (n * 2 if self.bits == 4 else n) - self.pad
        return (*lead, o, i) if self.transposed else (*lead, i, o)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.scales.size * self.scales.dtype.itemsize)


def check_options(bits: int, group_size: int) -> None:
    """Raises ConfigError naming the argument unless (bits, group_size) is supported."""
    if bits not in BITS:
        raise ConfigError(f"quantize bits must be one of {BITS}, got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")


# ---------------------------------------------------------------------------- quantize / dequantize


def quantize(w: jax.Array, bits: int = 8, group_size: int = 64, *, transposed: bool = False) -> QuantizedWeight:
    """A float weight -> QuantizedWeight.

    w: [..., I, O] (a linear weight, x @ w), or with `transposed` [..., O, I] (the embedding
    table [V, D], which the tied head reads as h @ w.T). int8 ignores `group_size` (one scale per
    output channel); int4 always uses groups of `group_size`, and where that does not divide I,
    stores I' = I rounded up to a multiple of it, the rows past I zero (`pad`; d_ff 704 at G 128:
    768 rows, 64 of them zero).
    """
    check_options(bits, group_size)
    w = jnp.asarray(w, jnp.float32)
    if transposed:
        w = jnp.swapaxes(w, -1, -2)
    *lead, i, o = w.shape
    g = i if bits == 8 else group_size
    pad = -i % g
    if pad:  # zero rows quantize to 0 under any scale and do not change the group's scale
        w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
        i += pad
    wg = w.reshape(*lead, i // g, g, o)
    qmax = QMAX[bits]
    qmin = -qmax - (bits == 4)  # int4 also uses -8: the smallest scale that fits both extremes
    step = jnp.maximum(jnp.max(wg, axis=-2) / qmax, jnp.min(wg, axis=-2) / qmin)  # [..., I/G, O]
    scales = jnp.where(step > 0, step, 1.0)  # an all-zero group gets scale 1 (q = 0)
    q = jnp.clip(jnp.round(wg / scales[..., None, :]), qmin, qmax).astype(jnp.int8).reshape(*lead, i, o)
    values = q if bits == 8 else pack_int4(q, g)
    return QuantizedWeight(values, scales.astype(jnp.float32), bits, g, transposed, pad=pad)


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """QuantizedWeight -> the float weight in its logical shape (`qw.shape`)."""
    qw = untile_weight(qw)
    w = dequantize_values(qw.bits, qw.group_size, qw.values, qw.scales, dtype)
    w = w[..., : w.shape[-2] - qw.pad, :]  # the zero rows that only pad I to a multiple of G
    return jnp.swapaxes(w, -1, -2) if qw.transposed else w


def take_rows(qw: QuantizedWeight, ids: jax.Array, dtype) -> jax.Array:
    """Embedding lookup in a quantized [V, D] table: ids [...] int -> [..., D]; dequantizes only those rows."""
    flat = ids.reshape(-1)
    cols = dequantize_values(qw.bits, qw.group_size, qw.values[:, flat], qw.scales[:, flat], dtype)  # [D', n]
    cols = cols[: cols.shape[0] - qw.pad]  # [D, n]: without the rows that pad D to a multiple of G
    return cols.T.reshape(*ids.shape, cols.shape[0])


# ---------------------------------------------------------------------------- the CPU kernel's layout


def tile_weight(qw: QuantizedWeight, tile: int = KERNEL_TILE) -> QuantizedWeight:
    """[rows, O] -> [ceil(O/T), rows, T]: each tile of T columns becomes one contiguous block.

    The CPU kernel streams a block front to back, where the [rows, O] layout makes it read T
    bytes out of every O (measured single-threaded: 25 GB/s against 10 for int8 decoding). The
    last tile is zero-padded; the scales keep their [I/G, O] shape.
    """
    if not _tileable(qw):
        return qw
    rows, o = qw.values.shape
    n = -(-o // tile)
    v = jnp.pad(qw.values, ((0, 0), (0, n * tile - o)))
    return dataclasses.replace(qw, values=v.reshape(rows, n, tile).transpose(1, 0, 2), tile=tile)


def _tileable(qw: QuantizedWeight) -> bool:
    """Tiled are single (per-layer) weights in [rows, O]; the transposed embedding keeps its layout."""
    return not qw.tile and qw.values.ndim == 2 and not qw.transposed


def untile_weight(qw: QuantizedWeight) -> QuantizedWeight:
    """The inverse of `tile_weight`: back to [rows, O]."""
    if not qw.tile:
        return qw
    return dataclasses.replace(qw, values=untile_values(qw.values, qw.scales.shape[-1]), tile=0)


# ---------------------------------------------------------------------------- the matmul


def _divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def matmul(x: jax.Array, qw: QuantizedWeight, dtype=jnp.float32, out_dtype=None) -> jax.Array:
    """x [..., I] @ W [I, O] -> [..., O] (for the embedding table, W is its transpose: h @ embed.T).

    Products accumulate in float32; the result is `out_dtype` (default `dtype`). `qw.impl` says
    which formulation runs. Composes with jit/vmap/grad (gradients flow to x and the scales;
    the integer values are constants). A padded weight (`qw.pad`) gets as many zeros appended
    to x, so every formulation multiplies the stored [I', O] as it is.
    """
    assert qw.values.ndim == (3 if qw.tile else 2), "a stacked QuantizedWeight must be sliced per layer first"
    out_dtype = out_dtype or dtype
    n, o = qw.values.shape[-2], qw.scales.shape[-1]  # stored rows are dim -2 in both layouts
    i = n * 2 if qw.bits == 4 else n  # I' = I + pad
    lead = x.shape[:-1]
    xm = x.reshape(-1, i - qw.pad).astype(dtype)
    if qw.pad:
        xm = jnp.pad(xm, ((0, 0), (0, qw.pad)))
    m = xm.shape[0]
    if qw.impl == "native":
        y = native.qmatmul(xm.astype(jnp.float32), qw.values, qw.scales, qw.bits, qw.group_size, qw.tile)
        return y.astype(out_dtype).reshape(*lead, o)
    qw = untile_weight(qw)
    if qw.impl != "xla_blocked" or m > SMALL_M:  # one matmul over the whole weight (see above)
        if qw.bits == 8:  # the per-channel scale factors out, so only a convert feeds the dot
            y = jnp.dot(xm, qw.values.astype(dtype), preferred_element_type=jnp.float32) * qw.scales[0]
            return y.astype(out_dtype).reshape(*lead, o)
        w = dequantize_values(qw.bits, qw.group_size, qw.values, qw.scales, dtype)
        return jnp.dot(xm, w, preferred_element_type=jnp.float32).astype(out_dtype).reshape(*lead, o)

    if qw.bits == 8:
        c = _divisor_at_most(i, INT8_BLOCK)
        xs = jnp.moveaxis(xm.reshape(m, i // c, c), 1, 0)  # [I/c, M, c]
        vs = qw.values.reshape(i // c, c, o)

        def block(acc, xv):
            xb, vb = xv
            return acc + jnp.dot(xb, vb.astype(dtype), preferred_element_type=jnp.float32), None

        acc, _ = jax.lax.scan(block, jnp.zeros((m, o), jnp.float32), (xs, vs))
        y = acc * qw.scales[0]  # the per-channel scale, once on the output
    else:
        g = qw.group_size
        xg = jnp.moveaxis(xm.reshape(m, i // g, 2, g // 2), 1, 0)  # [I/G, M, 2, G/2]
        ps = qw.values.reshape(i // g, g // 2, o)

        def block(acc, xps):  # one group: both nibble halves against the matching halves of x
            xb, pb, sb = xps
            lo, hi = unpack_int4(pb, g)
            lo = (lo[0].astype(jnp.float32) * sb).astype(dtype)
            hi = (hi[0].astype(jnp.float32) * sb).astype(dtype)
            acc = acc + jnp.dot(xb[:, 0], lo, preferred_element_type=jnp.float32)
            return acc + jnp.dot(xb[:, 1], hi, preferred_element_type=jnp.float32), None

        y, _ = jax.lax.scan(block, jnp.zeros((m, o), jnp.float32), (xg, ps, qw.scales))
    return y.astype(out_dtype).reshape(*lead, o)


# ---------------------------------------------------------------------------- params


LINEAR_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def quantize_params(params: dict, bits: int = 8, group_size: int = 64) -> dict:
    """Every matmul weight of a model's params -> QuantizedWeight; norms stay as they are.

    Quantized: the layers' projections (stacked [L, I, O] or a list of per-layer dicts), the
    output head `lm_head`, and the embedding table `embed` (read as the tied head, and gathered
    row by row otherwise). Accepts already-quantized params unchanged.
    """
    check_options(bits, group_size)

    def q(w, transposed=False):
        if isinstance(w, native.Float32Weight):  # prepared float32 params: the array it wraps
            w = w.w
        return w if isinstance(w, QuantizedWeight) else quantize(w, bits, group_size, transposed=transposed)

    def layer(lp):
        return {k: q(v) if k in LINEAR_WEIGHTS else v for k, v in lp.items()}

    layers = params["layers"]
    out = {**params, "layers": [layer(lp) for lp in layers] if isinstance(layers, (list, tuple)) else layer(layers)}
    out["embed"] = q(params["embed"], transposed=True)
    if "lm_head" in params:
        out["lm_head"] = q(params["lm_head"])
    return out


def is_quantized(params: dict) -> bool:
    return any(isinstance(x, QuantizedWeight) for x in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight)))


def quantization_of(params: dict) -> dict | None:
    """{"bits": b, "group_size": g} of quantized params (None when not quantized)."""
    for x in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedWeight)):
        if isinstance(x, QuantizedWeight) and not x.transposed:
            return {"bits": x.bits, "group_size": x.group_size if x.bits == 4 else 0}
    return None


def param_bytes(params) -> int:
    """Bytes the params occupy (quantized values and scales counted as stored)."""
    return int(sum(np.dtype(x.dtype).itemsize * x.size for x in jax.tree_util.tree_leaves(params)))


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    """The float params that quantized params stand for (QuantizedWeight -> its logical array)."""
    return jax.tree_util.tree_map(
        lambda x: dequantize(x, dtype) if isinstance(x, QuantizedWeight) else x,
        params, is_leaf=lambda x: isinstance(x, QuantizedWeight),
    )
