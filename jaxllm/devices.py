"""Device-specific choices for decoding, made once per params: the one place that asks which
backend JAX runs on and whether jaxllm's CPU kernel (native.py) is in use.

    prepare(params, cfg=None)   params laid out for decoding on this backend (idempotent, cached)
    as_stored(params)           the inverse: stacked layers, plain arrays, untiled weights
    describe(params, cfg=None)  one line: the layout, and which matmul runs for which weights and why

The choice is encoded in the prepared params themselves: the layers' container (a list or
stacked arrays), the weights' node types (`native.Float32Weight`) and static fields
(`QuantizedWeight.impl` and `.tile`). `model.linear`, `unembed` and `quantize.matmul` follow
the weight they are given (and the rows of x), never the backend, so raw params — training, a
user's own jit/vmap/grad code — run plain XLA, the same function on every backend.

    backend            layers               float32 weights                  int8/int4 weights
    cpu, kernel in use unstacked            kernel for 2-16 rows of x        "native", in 128-column tiles
    cpu, no kernel     unstacked            XLA's dot                        "xla_blocked"
    gpu                unstacked            XLA's dot                        "xla" (dequantize whole)
    tpu, others        stacked (lax.scan)   XLA's dot                        "xla" (dequantize whole)

Attention's backend choice is not here: it depends on shapes and dtypes known at trace time
(attention.py).
"""

from __future__ import annotations

import collections
import dataclasses
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import native
from jaxllm.model import unstack_layers
from jaxllm.native import Float32Weight
from jaxllm.quantize import LINEAR_WEIGHTS, SMALL_M, QuantizedWeight, tile_weight, untile_weight

# Backends whose decoding runs the layers as a Python loop over per-layer arrays. Inside a
# `lax.scan`, XLA copies each layer's weights out of the stacked arrays before every matmul, so
# a memory-bound decode step read the weights about three times; separate arrays are read once
# (measured: small config on CPU 17 -> 57 tok/s at batch 1, 73% of the bandwidth roofline; 1.47x
# on a 1B config in bf16 on an H100). TPUs keep the scan (not measured). Training and prefill
# of raw params keep the scan everywhere.
UNSTACKED_ON = ("cpu", "gpu")

# Rows of x (batch x new tokens) for which a float32 matmul runs in the CPU kernel
# (native.matmul_f32): XLA:CPU's dot reads the weight at 10-20 GB/s there, the kernel at 20-40
# (benchmarks/RESULTS.md). One row is a GEMV XLA already streams at full speed; from about 32
# rows on, XLA's GEMM is as fast.
F32_KERNEL_ROWS = (2, 16)


def _is_weight(x) -> bool:
    return isinstance(x, (QuantizedWeight, Float32Weight))


def _map_weights(params: dict, fn: Callable) -> dict:
    """fn(weight, name) on every matmul weight: the layers' projections, `lm_head` and `embed`."""

    def layer(lp):
        return {k: fn(v, k) if k in LINEAR_WEIGHTS else v for k, v in lp.items()}

    layers = params["layers"]
    out = {**params, "layers": [layer(lp) for lp in layers] if isinstance(layers, (list, tuple)) else layer(layers)}
    for name in ("lm_head", "embed"):
        if name in params:
            out[name] = fn(params[name], name)
    return out


def _weights(params: dict) -> list[tuple[str, object]]:
    found = []
    _map_weights(params, lambda w, name: found.append((name, w)) or w)
    return found


def _kernel_could_take(w, name: str, compute) -> bool:
    """Whether the kernel would multiply this raw weight: a quantized weight, or a float32 one
    computed in float32 (the float32 embedding is read as the tied head's [V, D]: XLA's einsum)."""
    if isinstance(w, QuantizedWeight):
        return w.impl == "xla" and not w.tile
    return (not _is_weight(w) and name != "embed" and getattr(w, "dtype", None) == jnp.float32
            and (compute is None or compute == jnp.float32))


def _on_cpu(w, name: str, kernel: bool, compute, tiled: dict):
    """The weight as decoding on a CPU reads it (the same object when it already is)."""
    if not _kernel_could_take(w, name, compute):
        return w
    if isinstance(w, QuantizedWeight):
        return dataclasses.replace(tiled.get(id(w), w), impl="native") if kernel else dataclasses.replace(w, impl="xla_blocked")
    return Float32Weight(w, F32_KERNEL_ROWS) if kernel and w.ndim == 2 else w


@jax.jit
def _tile_all(weights: list[QuantizedWeight]) -> list[QuantizedWeight]:
    """The weights in the kernel's tiles: one compiled program for them all, not a few per weight."""
    return [tile_weight(w) for w in weights]


def _unstack_on_host(params: dict) -> dict:
    """`model.unstack_layers` for arrays in host memory: each layer's slice is copied by numpy,
    where slicing on the device compiled two small programs per weight shape (~0.3 s of a cold
    start). Arrays that are not on one CPU device (sharded, or tracers) are sliced by XLA."""
    leaves = jax.tree_util.tree_leaves(params["layers"])
    if not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and len(x.sharding.device_set) == 1
               for x in leaves):
        return unstack_layers(params)
    host = jax.tree_util.tree_map(np.asarray, params["layers"])  # views of the device buffers: no copy yet
    device = next(iter(leaves[0].sharding.device_set))
    return {**params, "layers": [jax.tree_util.tree_map(lambda w: jax.device_put(np.array(w[i]), device), host)
                                 for i in range(leaves[0].shape[0])]}


def _layout(params: dict, compute) -> dict:
    """prepare's work, uncached: returns `params` itself when nothing changes."""
    backend = jax.default_backend()
    stacked = not isinstance(params["layers"], (list, tuple))
    if backend in UNSTACKED_ON and stacked:
        params = _unstack_on_host(params) if backend == "cpu" else unstack_layers(params)
    if backend != "cpu":
        return params
    # Only here may the kernel be built: when a weight would go to it (a bfloat16 model never does).
    todo = [(name, w) for name, w in _weights(params) if _kernel_could_take(w, name, compute)]
    kernel = bool(todo) and native.available()
    tiled = {}
    if kernel:  # [rows, O] projections and the untied head; the transposed embedding keeps its layout
        tile = [w for _, w in todo if isinstance(w, QuantizedWeight) and w.values.ndim == 2 and not w.transposed]
        tiled = dict(zip(map(id, tile), _tile_all(tile))) if tile else {}
    out = _map_weights(params, lambda w, name: _on_cpu(w, name, kernel, compute, tiled))
    changed = not all(a is b for (_, a), (_, b) in zip(_weights(params), _weights(out)))
    return out if changed or stacked else params


# prepare's cache: the prepared params of the last few params objects, keyed by the identity of
# their leaves (and the backend and compute dtype). So a caller who passes the same stacked
# params to `generate` again and again pays for one copy, not one per call. Size 2: speculative
# decoding prepares a target and a draft on every call. The originals are held by weak
# references only, and an entry is dropped as soon as any of its originals is collected, so a
# prepared copy never outlives the params it was made from; while they live, it costs one more
# copy of the weights (prepare once yourself and drop the originals to hold just one, as
# sample.py does).
_CACHE_SIZE = 2
_cache: collections.OrderedDict = collections.OrderedDict()


def prepare(params: dict, cfg=None) -> dict:
    """Params laid out for decoding on this backend (see the module docstring for what changes).

    Prepared params come back as they are (the same object, no copy); so do params with
    nothing to change (on a TPU, every params). The same params object again returns the
    prepared params made the first time. `cfg`, when given, says the compute dtype: float32
    weights computed in bfloat16 are left to XLA (and never build the kernel).
    Composes with jit (no caching then).
    """
    compute = jnp.dtype(cfg.compute_dtype) if cfg is not None else None
    leaves, treedef = jax.tree_util.tree_flatten(params)
    try:
        refs = [weakref.ref(x) for x in leaves]
    except TypeError:  # a leaf that cannot be weakly referenced (a Python number): no caching
        refs = None
    if refs is None or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return _layout(params, compute)
    key = (jax.default_backend(), compute, treedef, tuple(map(id, leaves)))
    if key in _cache:  # the ids are those of live objects: the weak references hold no dead ones
        _cache.move_to_end(key)
        return _cache[key][1]
    out = _layout(params, compute)
    if out is params:
        return params

    def forget(_ref, key=key, cache=_cache):  # bound now: at interpreter exit the module's globals may already be None
        cache.pop(key, None)

    _cache[key] = ([weakref.ref(x, forget) for x in leaves], out)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return out


def as_stored(params: dict) -> dict:
    """The inverse of `prepare`: layers stacked (on the host, as numpy: for writing files), plain
    float arrays, quantized weights as [rows, O] with `impl="xla"`. Other params pass through."""

    def plain(w, name):
        if isinstance(w, Float32Weight):
            return w.w
        if isinstance(w, QuantizedWeight) and (w.tile or w.impl != "xla"):
            return dataclasses.replace(untile_weight(w), impl="xla")
        return w

    params = _map_weights(params, plain)
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        params = {**params, "layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)}
    return params


def describe(params: dict, cfg=None) -> str:
    """One line: how `params` are laid out on this backend, and which matmul runs for which
    weights, and why. Meant for prepared params; for raw ones it says what raw params run."""
    backend = jax.default_backend()
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        layout = f"{len(layers)} layers unstacked (inside a lax.scan XLA would copy each layer's weights before its matmuls)"
    else:
        n = jax.tree_util.tree_leaves(layers)[0].shape[0]
        why = "not prepared" if backend in UNSTACKED_ON else f"{backend} keeps the scan"
        layout = f"{n} layers stacked, run by lax.scan ({why})"
    head = [] if "lm_head" in params else [("head", params["embed"])]  # tied: the embedding is the head
    groups = collections.Counter()
    for name, w in [(n, w) for n, w in _weights(params) if n != "embed"] + head:
        groups[_matmul_of(w, name, backend, cfg)] += 1
    parts = [f"{n} {kind}{'s' * (n > 1)}: {matmul}" for (kind, matmul), n in groups.items()]
    return f"decoding on {backend}: {layout}; " + "; ".join(parts)


def _matmul_of(w, name: str, backend: str, cfg) -> tuple[str, str]:
    """(what the weight is, which matmul it runs and why), in words."""
    if isinstance(w, Float32Weight):
        lo, hi = w.rows
        return ("float32 weight", f"jaxllm's CPU kernel for {lo}-{hi} rows of x (XLA:CPU's dot reads the weight at "
                                  f"under half the bandwidth there), XLA's dot otherwise")
    dtype = f"int{w.bits}" if isinstance(w, QuantizedWeight) else jnp.dtype(w.dtype).name
    kind = f"{dtype} tied head" if name == "head" else f"{dtype} weight"
    if isinstance(w, QuantizedWeight):
        if w.impl == "native":
            tiles = f"in {w.tile}-column tiles" if w.tile else "untiled"
            return kind, f"jaxllm's CPU kernel, {tiles} (XLA:CPU would widen each whole weight into a new buffer first)"
        if w.impl == "xla_blocked":
            return kind, (f"XLA on cpu in blocks of input rows up to {SMALL_M} rows of x, dequantized whole above "
                          f"(kernel not used: {native.status()})")
        why = "not prepared" if backend == "cpu" else "saves memory, not time"
        return kind, f"XLA on {backend}, dequantized whole before each matmul ({why})"
    op = "einsum over the [V, D] table" if name == "head" else "dot"
    if backend != "cpu":
        return kind, f"XLA's {op} on {backend}"
    if name == "head" or dtype != "float32":
        return kind, f"XLA's {op} (the CPU kernel takes [I, O] float32 and int8/int4 weights)"
    if cfg is not None and jnp.dtype(cfg.compute_dtype) != jnp.float32:
        return kind, f"XLA's dot (computed in {cfg.compute_dtype})"
    return kind, "XLA's dot (not prepared)" if native.available() else f"XLA's dot (kernel not used: {native.status()})"
