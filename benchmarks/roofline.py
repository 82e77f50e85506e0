"""What a decode step reads from memory, and the speed that caps: the benchmarks' roofline.

Legend: B rows decoded together (batch × beams), V vocab, D d_model, L layers, K kv heads,
E head dim, C keys a row attends (its filled cache slots).

A decode step that is bound only by memory bandwidth emits one token per sequence for every
`step_bytes` it reads, so

    roofline tok/s = sequences × measured read bandwidth / step_bytes
    % of roofline  = measured decode tok/s / roofline tok/s

Only what a step must read counts. An untied embedding table is not read: a lookup gathers
B of its V rows (the small benchmark config's table is 98 MB of its 499 MB of float32
params). Counting the whole table, as the benchmarks did until 2026-12-03, overstated every
"% of roofline" by about a quarter on that config (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math

import jax
import numpy as np

KV_SCALE_BYTES = 4  # an int8 KV cache keeps one float32 scale per token and kv head (jaxllm/kvcache.py)


def tree_bytes(tree) -> int:
    """Bytes of every array in `tree` as stored: a QuantizedWeight counts its int8 (or packed
    int4) values and its float32 scales, in whatever layout they are in. Leaves may be
    `jax.ShapeDtypeStruct`s (from `jax.eval_shape`), so a large model is counted without memory."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def weight_bytes(params: dict, cfg) -> int:
    """The weights a decode step multiplies: every layer's projections and norms, the final
    norm and the output head, which is the embedding table when `cfg.tie_embeddings`. An untied
    table is only gathered from (see `gathered_bytes`), so it is left out."""
    return tree_bytes({k: v for k, v in params.items() if k != "embed" or cfg.tie_embeddings})


def gathered_bytes(params: dict, cfg, rows: int) -> int:
    """The embedding rows a step looks up, one per row: each is 1/V of the table as stored
    (D values, plus a quantized table's scales for that token)."""
    return tree_bytes(params["embed"]) * rows // cfg.vocab_size


def kv_bytes(cfg, rows: int, slots: float, kv_dtype: str = "") -> int:
    """Keys and values of `slots` cache slots per row in every layer, in the cache's storage
    dtype ("" = cfg.compute_dtype; "int8": int8 values plus their float32 scales), i.e.
    2 · L · rows · slots · K · (E · itemsize [+ scale]). `slots` may be a mean (fractional)."""
    if kv_dtype == "int8":
        per_head = cfg.dim_per_head + KV_SCALE_BYTES
    else:
        per_head = cfg.dim_per_head * np.dtype(kv_dtype or cfg.compute_dtype).itemsize
    return round(2 * cfg.n_layers * rows * slots * cfg.n_kv_heads * per_head)


def mean_context(prompt_len: int, new_tokens: int) -> float:
    """Keys a row attends, averaged over the steps that decode `new_tokens` tokens after a
    prompt of `prompt_len` (padding excluded): the step that feeds new token t (0-based)
    attends the prompt and t + 1 tokens, so the mean is prompt_len + (new_tokens + 1) / 2."""
    return prompt_len + (new_tokens + 1) / 2


def step_bytes(params: dict, cfg, rows: int, context: float, kv_dtype: str = "") -> int:
    """Bytes one decode step of `rows` rows must read from memory.

    The rule: a step reads the weights it multiplies (every layer's projections, the norms,
    and the output head, which is the embedding table when the embeddings are tied, so then
    the table counts once, as the head), the KV cache it attends (the `context` filled slots
    of each row, not the preallocated ones, in the cache's storage dtype: int8 KV with its
    scales), and the embedding rows it gathers (rows × D × itemsize: negligible). An untied
    embedding table is not read. Quantized weights count as stored (int8 values + scales;
    packed int4 + group scales). `rows` is batch × beams for beam search; `context` may be a
    mean over the decode (`mean_context`).

    params: a jaxllm params tree (stacked or unstacked layers, float or quantized, arrays or
    ShapeDtypeStructs); cfg: its ModelConfig.
    """
    return weight_bytes(params, cfg) + kv_bytes(cfg, rows, context, kv_dtype) + gathered_bytes(params, cfg, rows)


def roofline(sequences: int, bandwidth_gbs: float, nbytes: int) -> float:
    """Tokens/s of a step bound only by reading `nbytes` at `bandwidth_gbs` GB/s, emitting one
    token for each of `sequences` sequences (the batch; beams share their sequence's token)."""
    return sequences * bandwidth_gbs * 1e9 / nbytes
