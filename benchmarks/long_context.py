"""Long context: prefill and decode speed and KV-cache memory vs context length, full vs windowed.

Run from the repository root:

    python benchmarks/long_context.py                              # tiny, 256 .. 8k, window 256
    python benchmarks/long_context.py --configs tiny,small --contexts 512,2048 --window 512
    python benchmarks/long_context.py --impls reference,xla        # the attention backends on this device
    python benchmarks/long_context.py --markdown                   # also print rows for RESULTS.md
    python benchmarks/long_context.py --attention_only             # reference einsum vs XLA attention alone

For each context length n the prompt is n random ids and generation adds --new_tokens tokens
(greedy, EOS off). "full" keeps every token (a linear cache of bucket(n) + bucket(new)
slots); "window" keeps the last W in a ring of W slots (`generate(window=W)`). Prefill is fed
--prefill_chunk tokens at a time. Prefill tok/s = n / prefill time; decode tok/s = new tokens /
decode time; both exclude compilation and are the best of --reps runs after a warm-up.
Cache memory is the KV cache's bytes (keys + values, all layers, batch 1).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import numpy as np

import jaxllm
import roofline
from jaxllm.generate import bucket

CONFIGS = {
    "tiny": dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=688),
    "small": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048),
}


def measure(params, cfg, n: int, args, window: int, sinks: int = 0) -> dict:
    prompt = np.random.default_rng(n).integers(3, cfg.vocab_size, size=n).tolist()
    kw = dict(max_new_tokens=args.new_tokens, temperature=0.0, eos_token_id=[], window=window, sinks=sinks, prefill_chunk=args.prefill_chunk)
    jaxllm.generate(params, cfg, [prompt], **kw)  # compiles
    runs = [jaxllm.generate(params, cfg, [prompt], **kw).timing for _ in range(args.reps)]
    prefill_s = min(t["prefill_s"] for t in runs)
    decode_s = min(t["decode_s"] for t in runs)
    slots = window if window else jaxllm.model.prefill_length(bucket(n), args.prefill_chunk) + bucket(args.new_tokens, 16)
    return dict(prefill=n / prefill_s, decode=args.new_tokens / decode_s, mem=roofline.kv_bytes(cfg, 1, slots))  # every slot allocated, filled or not


def attention_only() -> None:
    """Times the attention function alone, reference einsum vs XLA (what "auto" picks from on CPU)."""
    import time

    import jax.numpy as jnp

    from jaxllm.attention import attend

    print(f"{'queries':>7} {'keys':>5} {'H/K/E':>9} {'reference ms':>12} {'xla ms':>8} {'xla speedup':>11}")
    for T, S, H, K, E in ((1, 512, 8, 8, 32), (1, 2048, 8, 8, 32), (1, 8192, 8, 8, 32), (1, 2048, 12, 4, 64),
                          (512, 512, 8, 8, 32), (512, 2048, 8, 8, 32), (2048, 2048, 8, 8, 32), (512, 2048, 12, 4, 64)):
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.normal(size=(1, T, H, E)), jnp.float32)
        k = jnp.asarray(rng.normal(size=(1, K, S, E)), jnp.float32)  # heads-major, as the cache stores it
        qp, kp = jnp.arange(S - T, S)[None], jnp.arange(S)[None]
        fns = {i: jax.jit(lambda q, k, qp, kp, i=i: attend(q, k, k, qp, kp, impl=i)) for i in ("reference", "xla")}
        best = {}
        for _ in range(5):  # interleaved, best of 5: the machine may be shared
            for name, f in fns.items():
                f(q, k, qp, kp).block_until_ready()
                reps = 20 if T == 1 else 3
                t = time.perf_counter()
                for _ in range(reps):
                    out = f(q, k, qp, kp)
                out.block_until_ready()
                best[name] = min(best.get(name, 1e9), (time.perf_counter() - t) / reps)
        r, x = best["reference"] * 1e3, best["xla"] * 1e3
        print(f"{T:>7} {S:>5} {f'{H}/{K}/{E}':>9} {r:>12.3f} {x:>8.3f} {r / x:>10.2f}x", flush=True)
    # In a whole decode step (cache donated and updated in place) the ranking can differ from
    # attention alone, and that step is what "auto" serves.
    print(f"\n{'config':>6} {'cache':>6} {'decode step: reference ms':>26} {'xla ms':>8} {'xla speedup':>11}")
    for name, S in (("tiny", 1024), ("tiny", 8192), ("small", 1024)):
        base = jaxllm.ModelConfig(**CONFIGS[name], max_seq_len=2 * S)
        params = jaxllm.prepare_params(jaxllm.init_params(base, jax.random.key(0)), base)
        runs, best = {}, {}
        for impl in ("reference", "xla"):
            cfg = base.replace(attention_impl=impl)
            step = jax.jit(lambda p, c, cfg=cfg: jaxllm.forward(p, cfg, jnp.ones((1, 1), jnp.int32), jnp.full((1, 1), S - 10), c),
                           donate_argnums=1)
            runs[impl] = [step, jaxllm.init_cache(cfg, 1, S)]
        for _ in range(5):
            for impl, run in runs.items():
                out, run[1] = run[0](params, run[1])
                out.block_until_ready()
                t = time.perf_counter()
                for _ in range(10):
                    out, run[1] = run[0](params, run[1])
                out.block_until_ready()
                best[impl] = min(best.get(impl, 1e9), (time.perf_counter() - t) / 10)
        r, x = best["reference"] * 1e3, best["xla"] * 1e3
        print(f"{name:>6} {S:>6} {r:>26.2f} {x:>8.2f} {r / x:>10.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny")
    p.add_argument("--contexts", default="256,512,1024,2048,4096,8192")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=0, help="attention sinks in the windowed runs")
    p.add_argument("--no_full", action="store_true", help="only the windowed runs")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--prefill_chunk", type=int, default=512)
    p.add_argument("--impls", default="auto", help="comma-separated attention_impl values to compare")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--attention_only", action="store_true", help="time the attention backends alone and stop")
    args = p.parse_args()
    if args.attention_only:
        return attention_only()
    contexts = [int(c) for c in args.contexts.split(",")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {platform.processor() or platform.machine()} "
          f"| {os.cpu_count()} cpus | jax {jax.__version__} on {jax.devices()[0].device_kind} | load {load:.1f}")
    header = f"{'config':>6} {'impl':>9} {'context':>7} {'mode':>20} {'prefill tok/s':>13} {'decode tok/s':>12} {'cache MB':>9}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.configs.split(","):
        base = jaxllm.ModelConfig(**CONFIGS[name], max_seq_len=2 * max(contexts) + 2 * args.new_tokens)
        params = jaxllm.prepare_params(jaxllm.init_params(base, jax.random.key(0)), base)
        for impl in args.impls.split(","):
            cfg = base.replace(attention_impl=impl)
            for n in contexts:
                windowed = f"window {args.window}" + (f" + {args.sinks} sinks" if args.sinks else "")
                for mode, window in (("full", 0), (windowed, args.window)):
                    if (window and window >= n + args.new_tokens and not args.sinks) or (args.no_full and not window):
                        continue  # the ring would hold everything: the same as full
                    r = measure(params, cfg, n, args, window, args.sinks if window else 0)
                    row = (name, impl, n, mode, r["prefill"], r["decode"], r["mem"] / 2**20)
                    rows.append(row)
                    print(f"{row[0]:>6} {row[1]:>9} {row[2]:>7} {row[3]:>20} {row[4]:>13.0f} {row[5]:>12.1f} {row[6]:>9.2f}", flush=True)
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    if args.markdown:
        print("\n| config | impl | context | mode | prefill tok/s | decode tok/s | cache MB |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.0f} | {r[5]:.1f} | {r[6]:.2f} |")


if __name__ == "__main__":
    main()
