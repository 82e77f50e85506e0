"""Ahead-of-time compilation of `generate`'s programs: one dummy generation per prompt bucket.

Above both generate.py and compilation.py (it runs the one and counts with the other), so
neither of them imports upward.
"""

from __future__ import annotations

from jaxllm import devices
from jaxllm.compilation import CompileCounter
from jaxllm.generate import bucket, generate


def warmup_lengths(max_seq_len: int, max_new_tokens: int) -> list[int]:
    """One prompt length per prompt bucket that fits the context with `max_new_tokens` after it."""
    longest = max_seq_len - max_new_tokens
    lengths, b = [], bucket(1)
    while longest >= 1 and (not lengths or b // 2 < longest):
        lengths.append(min(b, longest))
        b *= 2
    return lengths


def warmup(params, cfg, *, batch_size: int = 1, max_new_tokens: int = 64, **generate_kwargs) -> dict:
    """Compiles (or loads from the persistent cache) `generate`'s programs for every prompt bucket
    up to the context, so no later prompt length compiles. Pass the same options as the real calls
    (`max_new_tokens`, stop strings, logprobs, ...: they set the programs' static shapes; sampling
    values do not matter). Runs one dummy generation per bucket.
    -> {"prompt_lengths": one per bucket, "programs", "cache_hits", "compile_s"}.
    """
    lengths = warmup_lengths(cfg.max_seq_len, max_new_tokens)
    with CompileCounter() as c:
        params = devices.prepare(params, cfg)  # once for every bucket (and counted: it may compile)
        for n in lengths:
            generate(params, cfg, [[1] * n] * batch_size, max_new_tokens=max_new_tokens, **generate_kwargs)
    return {"prompt_lengths": lengths, "programs": c.count, "cache_hits": c.cache_hits, "compile_s": c.seconds}
