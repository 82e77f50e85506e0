"""The benchmarks' roofline byte count (benchmarks/roofline.py) against counts made by hand.

The expected bytes are plain arithmetic from the config's shapes; the implementation counts
the arrays of a params tree, so the two only agree if the rule is applied to the right arrays.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ModelConfig, forward, init_params
from jaxllm.kvcache import init_cache
from jaxllm.model import unstack_layers
from jaxllm.quantize import quantize_params

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import roofline  # noqa: E402

G = 32  # int4 group size
WEIGHTS = ["float32", "bfloat16", "int8", "int4"]


def config(weights: str, tied: bool) -> ModelConfig:
    dtype = "bfloat16" if weights == "bfloat16" else "float32"
    return ModelConfig(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                       tie_embeddings=tied, param_dtype=dtype, compute_dtype=dtype)


def make_params(cfg: ModelConfig, weights: str):
    params = init_params(cfg, jax.random.key(0))
    return quantize_params(params, {"int8": 8, "int4": 4}[weights], G) if weights in ("int8", "int4") else params


def matrix_bytes(i: int, o: int, weights: str) -> int:
    """One [I, O] weight as stored: int8 values + a float32 scale per output column; int4 two
    values a byte + a float32 scale per group of G inputs per column; floats at their width."""
    if weights == "int8":
        return i * o + 4 * o
    if weights == "int4":
        return i * o // 2 + 4 * (i // G) * o
    return i * o * (2 if weights == "bfloat16" else 4)


def hand_count(cfg: ModelConfig, weights: str, rows: int, context: int) -> int:
    D, F, L, V, E, K = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.vocab_size, cfg.dim_per_head, cfg.n_kv_heads
    HE, KE = cfg.n_heads * E, K * E
    width = 2 if weights == "bfloat16" else 4  # norms and the KV cache stay in the params' float dtype
    layer = (matrix_bytes(D, HE, weights) + 2 * matrix_bytes(D, KE, weights) + matrix_bytes(HE, D, weights)
             + 2 * matrix_bytes(D, F, weights) + matrix_bytes(F, D, weights) + 2 * D * width)
    head = matrix_bytes(D, V, weights)  # the untied lm_head, or the tied table read as the head: same bytes
    one_row = {"int8": D + 4, "int4": D // 2 + 4 * (D // G)}.get(weights, D * width)  # a gathered embedding row
    kv = 2 * L * rows * context * KE * width
    return L * layer + D * width + head + rows * one_row + kv


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("weights", WEIGHTS)
def test_step_bytes_match_a_count_by_hand_from_the_config(weights, tied):
    cfg = config(weights, tied)
    params = make_params(cfg, weights)
    for rows, context in [(1, 1), (3, 40)]:
        assert roofline.step_bytes(params, cfg, rows, context) == hand_count(cfg, weights, rows, context)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_an_untied_table_adds_its_bytes_to_the_params_but_nothing_to_a_step(weights):
    untied, tied = config(weights, False), config(weights, True)
    p_untied, p_tied = make_params(untied, weights), make_params(tied, weights)
    table = matrix_bytes(untied.d_model, untied.vocab_size, weights)  # [V, D], stored [D, V] when quantized
    assert roofline.tree_bytes(p_untied) - roofline.tree_bytes(p_tied) == table
    assert roofline.step_bytes(p_untied, untied, 4, 10) == roofline.step_bytes(p_tied, tied, 4, 10)
    # so against counting every param, the untied step is short by the table less the gathered rows
    gathered = 4 * roofline.tree_bytes(p_untied["embed"]) // untied.vocab_size
    everything = roofline.tree_bytes(p_untied) + roofline.kv_bytes(untied, 4, 10)
    assert everything - roofline.step_bytes(p_untied, untied, 4, 10) == table - gathered


@pytest.mark.parametrize("weights", ["float32", "int4"])
def test_the_count_does_not_depend_on_the_layout_or_on_holding_the_arrays(weights):
    cfg = config(weights, False)
    params = make_params(cfg, weights)
    shapes = jax.eval_shape(lambda: make_params(cfg, weights))  # what the RESULTS.md recount uses for the 1b config
    expected = roofline.step_bytes(params, cfg, 2, 7)
    assert roofline.step_bytes(unstack_layers(params), cfg, 2, 7) == expected
    assert roofline.step_bytes(shapes, cfg, 2, 7) == expected


@pytest.mark.parametrize("kv_dtype", ["", "int8"])
def test_kv_bytes_equal_the_bytes_of_a_real_cache_of_that_many_slots(kv_dtype):
    cfg = config("float32", False)
    cache = init_cache(cfg, 3, 24, kv_dtype or None)
    arrays = [cache.k, cache.v] + ([cache.k_scale, cache.v_scale] if kv_dtype else [])
    assert roofline.kv_bytes(cfg, 3, 24, kv_dtype) == sum(a.nbytes for a in arrays)


def test_mean_context_is_the_mean_number_of_filled_slots_a_decode_step_sees():
    """Prefill a left-padded block, then decode one token at a time; after each step's write,
    the row's filled slots (position >= 0) are the keys that step attended."""
    cfg = config("float32", False)
    params = init_params(cfg, jax.random.key(0))
    prompt_len, pad, new_tokens = 5, 3, 6
    tokens = jnp.ones((1, prompt_len + pad), jnp.int32)
    positions = jnp.asarray([[-1] * pad + list(range(prompt_len))])  # left padding has position -1
    cache = init_cache(cfg, 1, prompt_len + pad + new_tokens)
    _, cache = forward(params, cfg, tokens, positions, cache)
    seen = []
    for t in range(new_tokens):
        _, cache = forward(params, cfg, jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), prompt_len + t), cache)
        seen.append(int(np.sum(np.asarray(cache.pos[0]) >= 0)))
    assert roofline.mean_context(prompt_len, new_tokens) == pytest.approx(np.mean(seen))


def test_roofline_is_sequences_times_bandwidth_over_bytes():
    # 2 sequences, 10 GB/s, 400 MB a step: 2 * 10e9 / 400e6 = 50 tok/s
    assert roofline.roofline(2, 10.0, 400_000_000) == pytest.approx(50.0)


def _serve_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_bench", Path(__file__).resolve().parent.parent / "benchmarks" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_serve_benchmark_latencies_match_a_count_by_hand():
    """benchmarks/serve.py's summary of two streams whose event times are known."""
    bench = _serve_bench()
    a = bench.Record(sent=0.0, events=[0.5, 0.7, 0.9], usage_tokens=5, done=1.0)  # 5 tokens in 3 events
    b = bench.Record(sent=1.0, events=[1.2, 2.2], usage_tokens=2, done=2.5)
    failed = bench.Record(sent=0.0, error="HTTP 503")
    s = bench.summarize([a, b, failed], wall=4.0, clients=2, max_tokens=5)
    assert (s["requests"], s["ok"], s["tokens"], s["tok_s"]) == (3, 2, 7, 7 / 4.0)
    assert s["ttft50"] == pytest.approx(1e3 * (0.5 + 0.2) / 2)  # first events 0.5 s and 0.2 s after sending
    assert s["tpot50"] == pytest.approx(1e3 * (0.4 / 4 + 1.0 / 1) / 2)  # (last - first) / (tokens - 1)
    assert s["itl50"] == pytest.approx(200.0) and s["tok_per_event"] == pytest.approx(7 / 5)
    assert s["short"] == 1 and s["errors"] == ["HTTP 503"]
