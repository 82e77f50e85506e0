"""Flash attention for TPUs as Pallas kernels, masked by token positions.

Legend: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, E head dim;
bq / bk the query / key rows of one block.

The kernels compute `attention.attend` exactly (up to float rounding): a query at position p sees
the keys at positions in [lo, p], lo = max(min_pos, 0), and with a sliding window W only those
above p - W; ALiBi adds -slope_h * (p - key position). The mask is built inside each block from
the two blocks' positions, so whatever `attend` can say with positions the kernel says too:
left padding and empty cache slots (position -1), causality, a chunk of a prompt against the
cache (any cursor), sliding windows and ring caches, with no [T, S] mask or bias in memory.
Grouped-query attention reads each kv head once per query head that shares it, through the
index map (query head h reads kv head h // G); K and V are never repeated.

Blocks that no query may see (the future of a causal block, empty slots, keys that left the
window, a block of padding queries) are skipped: per block the wrapper computes the range of
query positions and of key positions (scalar-prefetched into SMEM) and the kernel runs a block
only if some query could see some key. A query that sees no key at all (padding) gets zeros,
with zero gradients; `attention.attend_reference` averages the values there instead, so callers
must not compare padding rows (their outputs are never used).

Forward: the online softmax of FlashAttention-2 (Dao, 2023), a grid (B, H, T/bq, S/bk) whose last
axis accumulates into VMEM scratch; it keeps each row's log-sum-exp for the backward pass.
Backward: two kernels, dq over (B, H, T/bq, S/bk) and dk/dv over (B, K, S/bk, G, T/bq), which
recompute the probabilities from the log-sum-exp, so memory stays linear in T.

TPU layout rules shape the inputs: a block's last two dims must be multiples of (8, 128) or
whole, so per-row values (query positions, running max and sum, log-sum-exp) are kept
replicated across 128 lanes, and key positions across 8 sublanes. T is padded to whole query
blocks and S to whole key blocks (padding has position -1 and is never seen).

On a machine without a TPU the same kernels run in Pallas' TPU interpret mode (`interpret=True`),
which is how the tests check them on a CPU; that is slow and meant for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES, SUBLANES = 128, 8
MASKED = -1e30  # as attention.MASKED: finite, so a fully masked row never computes inf - inf
BIG = 2**30  # a position beyond any real one
BLOCK_SIZES = (512, 256, 128)  # preferred block rows, largest first (a block of T or S must divide it)


def block_size(n: int, requested: int | None = None) -> tuple[int, int]:
    """-> (block rows, padded length) for a sequence of n rows: blocks of up to 512 rows that
    divide the length padded to 128 (or, under 128 rows, one block padded to a multiple of 8)."""
    if requested:
        return requested, -(-n // requested) * requested
    if n < LANES:
        b = -(-n // SUBLANES) * SUBLANES
        return b, b
    padded = -(-n // LANES) * LANES
    return next(b for b in BLOCK_SIZES if padded % b == 0), padded


def _block_ranges(pos: jax.Array, blk: int, lo: int) -> tuple[jax.Array, jax.Array]:
    """pos [B, N] -> (min, max) over each block of `blk` positions of those >= lo, flattened to
    [B * N/blk] (min BIG and max -1 for a block with none)."""
    B, N = pos.shape
    p = pos.reshape(B, N // blk, blk)
    ok = p >= lo
    return jnp.min(jnp.where(ok, p, BIG), -1).reshape(-1), jnp.max(jnp.where(ok, p, -1), -1).reshape(-1)


def _visible_block(qmin, qmax, kmin, kmax, window: int):
    """Whether any query of a block with positions in [qmin, qmax] may see any key in [kmin, kmax]
    (kmin over keys >= lo only): a sufficient test for skipping, never wrong about a block that counts."""
    run = (qmax >= 0) & (kmin <= qmax)
    if window:
        run &= kmax > qmin - window
    return run


def _mask(qpos, kpos, lo: int, window: int):
    """qpos [bq, bk] (lane-tiled), kpos [1, bk] -> bool [bq, bk]: attention.causal_mask's rule."""
    ok = (kpos >= lo) & (kpos <= qpos)
    if window:
        ok &= kpos > qpos - window
    return ok


_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _scores(q, k, qpos, kpos, slope, *, scale, lo, window):
    """One block's masked float32 scores [bq, bk] and the mask."""
    s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * scale
    if slope is not None:
        s = s - slope * (qpos - kpos).astype(jnp.float32)
    ok = _mask(qpos, kpos, lo, window)
    return jnp.where(ok, s, MASKED), ok


def _lanes(x, n: int):
    """A lane-replicated column [r, 128] -> [r, n] (n a multiple of 128, or < 128)."""
    return jnp.tile(x, (1, n // LANES)) if n >= LANES else x[:, :n]


# ---------------------------------------------------------------------------- forward


def _fwd_kernel(qmin_ref, qmax_ref, kmin_ref, kmax_ref,  # scalar prefetch (SMEM)
                q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slope_ref,  # inputs
                o_ref, lse_ref,  # outputs
                m_scr, l_scr, acc_scr,  # scratch
                *, scale, lo, window, nq, nk):
    b, h, qi, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bk = k_ref.shape[0]

    @pl.when(ki == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, MASKED, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    qb, kb = b * nq + qi, b * nk + ki

    @pl.when(_visible_block(qmin_ref[qb], qmax_ref[qb], kmin_ref[kb], kmax_ref[kb], window))
    def _run():
        slope = None if slope_ref is None else slope_ref[0, h]
        qpos = _lanes(qpos_ref[...], bk)
        s, ok = _scores(q_ref[...], k_ref[...], qpos, kpos_ref[:1, :], slope, scale=scale, lo=lo, window=window)
        m_prev, l_prev = m_scr[...], l_scr[...]  # [bq, 128]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(ok, jnp.exp(s - _lanes(m_next, bk)), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_scr[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        E = acc_scr.shape[1]
        pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_scr[...] = acc_scr[...] * _lanes(alpha, E) + pv

    @pl.when(ki == nk - 1)
    def _store():
        l = l_scr[...]
        E = acc_scr.shape[1]
        o_ref[...] = (acc_scr[...] * _lanes(jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0), E)).astype(o_ref.dtype)
        # a row that saw nothing: +BIG makes every recomputed probability exp(s - lse) zero
        lse_ref[...] = jnp.where(l > 0, m_scr[...] + jnp.log(jnp.where(l > 0, l, 1.0)), -MASKED)


# ---------------------------------------------------------------------------- backward


def _dq_kernel(qmin_ref, qmax_ref, kmin_ref, kmax_ref,
               q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slope_ref, do_ref, lse_ref, d_ref,
               dq_ref, dq_scr, *, scale, lo, window, nq, nk):
    b, h, qi, ki = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bk = k_ref.shape[0]

    @pl.when(ki == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    qb, kb = b * nq + qi, b * nk + ki

    @pl.when(_visible_block(qmin_ref[qb], qmax_ref[qb], kmin_ref[kb], kmax_ref[kb], window))
    def _run():
        slope = None if slope_ref is None else slope_ref[0, h]
        k = k_ref[...]
        s, ok = _scores(q_ref[...], k, _lanes(qpos_ref[...], bk), kpos_ref[:1, :], slope, scale=scale, lo=lo, window=window)
        p = jnp.where(ok, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(d_ref[...], bk))
        dq_scr[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(ki == nk - 1)
    def _store():
        dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(qmin_ref, qmax_ref, kmin_ref, kmax_ref,
                q_ref, k_ref, v_ref, qpos_ref, kpos_ref, slope_ref, do_ref, lse_ref, d_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, scale, lo, window, nq, nk, groups):
    b, kh, ki, g, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    bk = k_ref.shape[0]

    @pl.when((g == 0) & (qi == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    qb, kb = b * nq + qi, b * nk + ki

    @pl.when(_visible_block(qmin_ref[qb], qmax_ref[qb], kmin_ref[kb], kmax_ref[kb], window))
    def _run():
        slope = None if slope_ref is None else slope_ref[0, kh * groups + g]
        q, do = q_ref[...], do_ref[...]
        s, ok = _scores(q, k_ref[...], _lanes(qpos_ref[...], bk), kpos_ref[:1, :], slope, scale=scale, lo=lo, window=window)
        p = jnp.where(ok, jnp.exp(s - _lanes(lse_ref[...], bk)), 0.0)  # [bq, bk]
        dv_scr[...] += jax.lax.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _lanes(d_ref[...], bk))
        dk_scr[...] += jax.lax.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when((g == groups - 1) & (qi == nq - 1))
    def _store():
        dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ---------------------------------------------------------------------------- the calls


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _interpret(interpret: bool):
    return True if interpret else False


def _specs(bq, bk, E, H, K, slopes):
    """BlockSpecs for the forward grid (b, h, qi, ki)."""
    G = H // K
    q = pl.BlockSpec((None, None, bq, E), lambda b, h, qi, ki, *_: (b, h, qi, 0))
    kv = pl.BlockSpec((None, None, bk, E), lambda b, h, qi, ki, *_: (b, h // G, ki, 0))
    qpos = pl.BlockSpec((None, bq, LANES), lambda b, h, qi, ki, *_: (b, qi, 0))
    kpos = pl.BlockSpec((None, SUBLANES, bk), lambda b, h, qi, ki, *_: (b, 0, ki))
    slope = None if slopes is None else pl.BlockSpec((SUBLANES, H), lambda *_: (0, 0))
    row = pl.BlockSpec((None, None, bq, LANES), lambda b, h, qi, ki, *_: (b, h, qi, 0))
    return q, kv, qpos, kpos, slope, row


def _forward(q, k, v, qpos, kpos, slopes, ranges, *, scale, lo, window, bq, bk, interpret):
    """Padded, kernel-layout operands -> (o [B, H, T, E], lse [B, H, T, 128])."""
    B, H, T, E = q.shape
    K, S = k.shape[1], k.shape[2]
    nq, nk = T // bq, S // bk
    q_spec, kv_spec, qpos_spec, kpos_spec, slope_spec, row_spec = _specs(bq, bk, E, H, K, slopes)
    kernel = functools.partial(_fwd_kernel, scale=scale, lo=lo, window=window, nq=nq, nk=nk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, H, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, qpos_spec, kpos_spec, slope_spec],
            out_specs=[q_spec, row_spec],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, E), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, T, LANES), jnp.float32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
    )(*ranges, q, k, v, qpos, kpos, slopes)


def _backward(q, k, v, qpos, kpos, slopes, ranges, do, lse, d, *, scale, lo, window, bq, bk, interpret):
    """-> (dq, dk, dv) in the kernel layout; lse and d = rowsum(do * o) lane-replicated [B, H, T, 128]."""
    B, H, T, E = q.shape
    K, S = k.shape[1], k.shape[2]
    G, nq, nk = H // K, T // bq, S // bk
    q_spec, kv_spec, qpos_spec, kpos_spec, slope_spec, row_spec = _specs(bq, bk, E, H, K, slopes)
    opts = dict(scale=scale, lo=lo, window=window, nq=nq, nk=nk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **opts),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, H, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, qpos_spec, kpos_spec, slope_spec, q_spec, row_spec, row_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((bq, E), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(interpret),
    )(*ranges, q, k, v, qpos, kpos, slopes, do, lse, d)

    # dk/dv: one kv block accumulates over the G query heads that share its kv head and every query block
    qh = lambda b, kh, ki, g, qi, *_: (b, kh * G + g, qi, 0)  # noqa: E731
    q_spec = pl.BlockSpec((None, None, bq, E), qh)
    row_spec = pl.BlockSpec((None, None, bq, LANES), qh)
    kv_spec = pl.BlockSpec((None, None, bk, E), lambda b, kh, ki, g, qi, *_: (b, kh, ki, 0))
    qpos_spec = pl.BlockSpec((None, bq, LANES), lambda b, kh, ki, g, qi, *_: (b, qi, 0))
    kpos_spec = pl.BlockSpec((None, SUBLANES, bk), lambda b, kh, ki, g, qi, *_: (b, 0, ki))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **opts, groups=G),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, K, nk, G, nq),
            in_specs=[q_spec, kv_spec, kv_spec, qpos_spec, kpos_spec, slope_spec, q_spec, row_spec, row_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, E), jnp.float32), pltpu.VMEM((bk, E), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=_interpret(interpret),
    )(*ranges, q, k, v, qpos, kpos, slopes, do, lse, d)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11, 12))
def _attention(q, k, v, qpos, kpos, slopes, ranges, scale, lo, window, bq, bk, interpret):
    return _forward(q, k, v, qpos, kpos, slopes, ranges, scale=scale, lo=lo, window=window, bq=bq, bk=bk,
                    interpret=interpret)[0]


def _attention_fwd(q, k, v, qpos, kpos, slopes, ranges, scale, lo, window, bq, bk, interpret):
    o, lse = _forward(q, k, v, qpos, kpos, slopes, ranges, scale=scale, lo=lo, window=window, bq=bq, bk=bk,
                      interpret=interpret)
    return o, (q, k, v, qpos, kpos, slopes, ranges, o, lse[..., 0])


def _attention_bwd(scale, lo, window, bq, bk, interpret, saved, do):
    q, k, v, qpos, kpos, slopes, ranges, o, lse = saved
    d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, H, T]
    lanes = lambda x: jnp.broadcast_to(x[..., None], (*x.shape, LANES))  # noqa: E731
    dq, dk, dv = _backward(q, k, v, qpos, kpos, slopes, ranges, do, lanes(lse), lanes(d), scale=scale, lo=lo,
                           window=window, bq=bq, bk=bk, interpret=interpret)
    return dq, dk, dv, None, None, None, None  # positions, slopes and block ranges are constants


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
    window: int = 0, min_pos: int = 0, slopes: np.ndarray | None = None,
    block_q: int | None = None, block_k: int | None = None, interpret: bool = False,
) -> jax.Array:
    """`attention.attend` by the Pallas kernels (differentiable in q, k and v).

    q: [B, T, H, E], k/v: [B, K, S, E], q_pos: [B, T], k_pos: [B, S] -> [B, T, H, E].
    window, min_pos, slopes [H] (ALiBi): as in `attention.attend`. block_q/block_k: rows per block
    (default: `block_size`; a block_k must be a multiple of 128). interpret: run in Pallas' TPU
    interpret mode (any machine; slow).
    """
    B, T, H, E = q.shape
    K, S = k.shape[1], k.shape[2]
    bq, Tp = block_size(T, block_q)
    bk, Sp = block_size(S, block_k)
    if bk % LANES:  # the key positions' block is [8, bk]: its lanes must be whole
        bk, Sp = block_size(max(S, LANES), block_k or LANES)
    lo = max(min_pos, 0)
    q_pos = jnp.pad(q_pos.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
    k_pos = jnp.pad(k_pos.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-1)
    qh = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, Tp - T), (0, 0)))
    pad_kv = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, Sp - S), (0, 0)))  # noqa: E731
    qmin, qmax = _block_ranges(q_pos, bq, 0)
    kmin, kmax = _block_ranges(k_pos, bk, lo)
    ranges = (qmin, qmax, kmin, kmax)  # per block, for skipping: the kernels' scalar-prefetch operands
    qpos = jnp.broadcast_to(q_pos[:, :, None], (B, Tp, LANES))
    kpos = jnp.broadcast_to(k_pos[:, None, :], (B, SUBLANES, Sp))
    slope_arr = None if slopes is None else jnp.broadcast_to(jnp.asarray(slopes, jnp.float32)[None], (SUBLANES, H))
    out = _attention(qh, pad_kv(k), pad_kv(v), qpos, kpos, slope_arr, ranges, E**-0.5, lo, window, bq, bk, interpret)
    return out[:, :, :T].transpose(0, 2, 1, 3)
