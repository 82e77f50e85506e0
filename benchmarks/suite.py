"""The benchmark suite: one command, one table, appended to benchmarks/RESULTS.md.

Run from the repository root:

    python benchmarks/suite.py --quick          # a few minutes: greedy, batch 1 and 8, 64 new tokens
    python benchmarks/suite.py                  # everything (long on a CPU: tens of minutes)
    python benchmarks/suite.py --no_append      # print only
    python benchmarks/suite.py --configs 1b --dtype bfloat16 --batches 1,32   # what gpu_check.sh runs

Parts, each reusing the existing benchmark scripts' code:
  1. decode (benchmarks/decode.py's bench_jaxllm / bench_transformers): greedy, the full
     sampling chain, beam 4; batch 1/8/32; fp32 (or --dtype), int8, int4 (g64) weights; against
     transformers + torch with the same shapes in the same run (transformers runs unquantized
     weights in --dtype: it is the baseline every row is compared with). Per row: decode tok/s,
     prefill tok/s, the MB a step must read (benchmarks/roofline.py: the weights it multiplies
     as stored, not an untied embedding table, which is only gathered from; the filled KV slots,
     averaged over the decode), the memory-bandwidth roofline (B * measured read bandwidth / those
     bytes) and the fraction of it reached, speed-up over the same config's own fp32 row, and
     over transformers.
  2. time to first token, compile included, in a fresh process with an empty persistent
     compilation cache (cold) and again with the cache it left (warm).
  3. training tokens/s vs PyTorch (benchmarks/train.py's bench_jaxllm / bench_torch).

Targets checked (CPU, 2 cores): small fp32 batch-1 greedy >= 85% of the roofline; int8 >= 2.5x
and int4 >= 3.5x their own fp32; every row >= 1.5x transformers. The table marks each.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import decode  # noqa: E402  (benchmarks/decode.py)
import jaxllm  # noqa: E402
import roofline  # noqa: E402  (benchmarks/roofline.py)
import train as train_bench  # noqa: E402  (benchmarks/train.py)

CONFIGS = {**decode.CONFIGS, "1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632)}
WEIGHTS = {"fp": None, "int8": (8, 64), "int4": (4, 64)}
TARGETS = {"roofline": 0.85, "int8": 2.5, "int4": 3.5, "hf": 1.5}


def dtype_name(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}[dtype]


def model_config(name: str, dtype: str) -> jaxllm.ModelConfig:
    return jaxllm.ModelConfig(**CONFIGS[name], max_seq_len=decode.MAX_SEQ_LEN, param_dtype=dtype, compute_dtype=dtype)


def decode_rows(args, bandwidth: float, reference: bool) -> list[dict]:
    rows, hf_cache = [], {}
    for name, mode, B in itertools.product(args.configs.split(","), args.modes.split(","), map(int, args.batches.split(","))):
        cfg = model_config(name, args.dtype)
        prompts = np.random.default_rng(B).integers(1, cfg.vocab_size, (B, args.prompt_len))
        n = B * args.new_tokens
        own_fp = None
        for weights in args.weights.split(","):
            print(f"[{name} {mode} B={B} {weights}] jaxllm ...", flush=True)
            j = decode.bench_jaxllm(cfg, prompts, args.new_tokens, args.reps, mode, quantize=WEIGHTS[weights])
            ceiling = roofline.roofline(B, bandwidth, j["step_bytes"])
            dec = n / j["decode_s"]
            own_fp = dec if weights == "fp" else own_fp
            key = (name, mode, B)
            if reference and key not in hf_cache:
                print(f"[{name} {mode} B={B}] transformers ...", flush=True)
                h = decode.bench_transformers(CONFIGS[name], prompts, args.new_tokens, args.reps, mode, dtype=args.dtype)
                hf_cache[key] = n / (h["e2e_s"] - h["prefill_s"])
            hf = hf_cache.get(key)
            rows.append(dict(
                config=name, weights=weights if weights != "fp" else dtype_name(args.dtype), mode=mode, batch=B, dec=dec,
                prefill=(B * args.prompt_len / j["prefill_s"]) if j["prefill_s"] else None, hf=hf,
                step_mb=j["step_bytes"] / 1e6, roofline=ceiling, frac=dec / ceiling,
                vs_fp=(dec / own_fp) if own_fp and weights != "fp" else None, vs_hf=(dec / hf) if hf else None,
            ))
    return rows


def verdicts(r: dict) -> str:
    out = []
    if r["config"] == "small" and r["weights"] == "fp32" and r["mode"] == "greedy" and r["batch"] == 1:
        out.append(f"roofline {'ok' if r['frac'] >= TARGETS['roofline'] else 'MISS'}")
    if r["vs_fp"] is not None and r["weights"] in TARGETS:
        out.append(f"x{TARGETS[r['weights']]} {'ok' if r['vs_fp'] >= TARGETS[r['weights']] else 'MISS'}")
    if r["vs_hf"] is not None:
        out.append(f"HF {'ok' if r['vs_hf'] >= TARGETS['hf'] else 'MISS'}")
    return ", ".join(out)


def ttft_child(name: str, weights: str, dtype: str, cache_dir: str) -> None:
    """In a fresh process: time from the first call to the first token, compile included."""
    from jaxllm.compilation import CompileCounter, enable_persistent_cache
    from jaxllm.quantize import quantize_params

    enable_persistent_cache(cache_dir)
    cfg = model_config(name, dtype)
    params = jaxllm.init_params(cfg, jax.random.key(0))
    if WEIGHTS[weights]:
        params = quantize_params(params, *WEIGHTS[weights])
    params = jaxllm.prepare_params(params, cfg)
    jax.block_until_ready(params)
    with CompileCounter() as c:
        t = time.perf_counter()
        result = jaxllm.generate(params, cfg, [[1] * 32], max_new_tokens=1, temperature=0.0, eos_token_id=[])
        ttft = time.perf_counter() - t
    print(json.dumps(dict(ttft_s=ttft, compile_s=result.timing["compile_s"], programs=c.count, cache_hits=c.cache_hits)))


def ttft_rows(args) -> list[dict]:
    rows = []
    for name, weights in itertools.product(args.ttft_configs.split(","), args.weights.split(",")):
        cache = tempfile.mkdtemp(prefix="jaxllm_ttft_")
        try:
            for state in ("cold", "warm"):
                cmd = [sys.executable, __file__, "--_ttft", name, weights, args.dtype, cache]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if out.returncode != 0:
                    print(f"ttft {name} {weights} {state} failed: {out.stderr.strip().splitlines()[-1:]}")
                    break
                rows.append(dict(config=name, weights=weights if weights != "fp" else dtype_name(args.dtype), cache=state, **json.loads(out.stdout.strip().splitlines()[-1])))
                print(f"[ttft {name} {weights} {state}] {rows[-1]['ttft_s']:.2f}s", flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return rows


def train_rows(args, reference: bool) -> list[dict]:
    rows = []
    for name in args.train_configs.split(","):
        c = train_bench.CONFIGS[name]
        steps = args.train_steps or (30 if name == "small" else 3)
        data = train_bench.batches(c, 2 + steps)
        tokens = steps * c["batch"] * c["seq"]
        print(f"[train {name}] ...", flush=True)
        j = tokens / train_bench.bench_jaxllm(c, data, 2, args.dtype)
        t = train_bench.bench_torch(c, data, 2) if reference else None
        rows.append(dict(config=name, jax=j, torch=tokens / t if t else None))
    return rows


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def report(meta: str, dec: list[dict], ttft: list[dict], trn: list[dict], markdown: bool) -> str:
    parts = [meta]
    if dec:
        header = ["config", "weights", "mode", "B", "MB/step", "dec tok/s", "prefill tok/s", "HF dec tok/s", "x HF",
                  "x own fp", "roofline tok/s", "% roofline", "targets"]
        parts.append(table(header, [[r["config"], r["weights"], r["mode"], str(r["batch"]), fmt(r["step_mb"]), fmt(r["dec"]),
                                      fmt(r["prefill"], ".0f"), fmt(r["hf"]), fmt(r["vs_hf"], ".2f"), fmt(r["vs_fp"], ".2f"),
                                      fmt(r["roofline"]), fmt(100 * r["frac"], ".0f"), verdicts(r)] for r in dec], markdown))
    if ttft:
        parts.append("Time to first token (prompt 32, batch 1, greedy), compile included, in a fresh process:")
        parts.append(table(["config", "weights", "persistent cache", "TTFT s", "compile s", "programs", "cache hits"],
                           [[r["config"], r["weights"], r["cache"], fmt(r["ttft_s"], ".2f"), fmt(r["compile_s"], ".2f"),
                             str(r["programs"]), str(r["cache_hits"])] for r in ttft], markdown))
    if trn:
        parts.append("Training (benchmarks/train.py shapes, one full AdamW step):")
        parts.append(table(["config", "jaxllm tok/s", "torch tok/s", "ratio"],
                           [[r["config"], fmt(r["jax"], ",.0f"), fmt(r["torch"], ",.0f"),
                             fmt(r["torch"] and r["jax"] / r["torch"], ".2f")] for r in trn], markdown))
    return "\n\n".join(parts)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_ttft":
        return ttft_child(*sys.argv[2:6])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="greedy only, batch 1 and 8, 64 new tokens, 2 reps, small training only")
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--modes", default="greedy,chain,beam4")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--weights", default="fp,int8,int4")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ttft_configs", default="small", help="'' to skip")
    ap.add_argument("--train_configs", default="small,medium", help="'' to skip")
    ap.add_argument("--train_steps", type=int, default=None)
    ap.add_argument("--no_reference", action="store_true", help="skip transformers/torch")
    ap.add_argument("--no_append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--note", default="", help="a line about the run conditions, kept with the results")
    args = ap.parse_args()
    if args.quick:
        args.modes, args.batches, args.new_tokens, args.reps, args.train_configs = "greedy", "1,8", 64, 2, "small"

    reference = not args.no_reference
    versions = f"jax {jax.__version__} ({jax.default_backend()})"
    try:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError as e:
        print(f"note: the transformers reference is skipped ({e})")
        reference = False
    device = jax.devices()[0].device_kind
    machine = f"{platform.platform()}, {device}, {os.cpu_count()} CPUs"
    load = os.getloadavg()[0]
    start = time.time()
    bandwidth = decode.measure_bandwidth()

    dec = decode_rows(args, bandwidth, reference) if args.configs else []
    ttft = ttft_rows(args) if args.ttft_configs else []
    trn = train_rows(args, reference) if args.train_configs else []

    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = (f"{when} · {machine} · {versions} · {'--quick' if args.quick else 'full'}: {args.configs} × {args.modes} × "
            f"batch {args.batches} × {args.weights} ({args.dtype}), prompt {args.prompt_len}, {args.new_tokens} new tokens, "
            f"best of {args.reps} · measured read bandwidth {bandwidth:.1f} GB/s · load average {load:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after · {time.time() - start:.0f}s" + (f" · {args.note}" if args.note else ""))
    print("\n" + report(meta, dec, ttft, trn, markdown=False))
    if not args.no_append:
        with open(args.results, "a") as f:
            f.write(f"\n### Suite, {when}\n\n" + report(meta, dec, ttft, trn, markdown=True) + "\n")
        print(f"\nappended to {args.results}")


if __name__ == "__main__":
    main()
