"""Where a decode step's time goes: a jax.profiler trace of jaxllm.generate, summed by op.

Run from the repository root:

    python benchmarks/profile_decode.py --config small --batch 8 --weights int8
    python benchmarks/profile_decode.py --config 1b --dtype bfloat16 --weights fp,int8   # on a GPU

For each weights mode it decodes once to compile, then traces a second run and prints the ops
(GPU kernels, or XLA:CPU's ops) that took the most time, per decode step. "busy" sums the ops;
"step" is the measured decode time per token, so step - busy on a GPU is time the device sat
idle between kernels (launch and host overhead); "reads" is what the step must read
(benchmarks/roofline.py) over the measured step time. Needs no extra packages.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jaxllm  # noqa: E402
import roofline  # noqa: E402  (benchmarks/roofline.py)
from jaxllm.quantize import quantize_params  # noqa: E402
from suite import CONFIGS, WEIGHTS  # noqa: E402


def op_times(trace_dir: Path) -> tuple[collections.Counter, collections.Counter]:
    """Total microseconds and counts per kind of op (names without their numeric suffix) in the
    decode-chunk program, over the device's (or XLA:CPU's) events."""
    (path,) = trace_dir.rglob("*.trace.json.gz")
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = [pid for pid, name in procs.items() if "/device:GPU" in name]
    keep = set(gpu) if gpu else set(procs)  # on the CPU: every thread's XLA ops
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["pid"] not in keep or "dur" not in e:
            continue
        args = e.get("args", {})
        if not gpu and (not args.get("hlo_op") or e["name"].startswith("while")):
            continue  # on the CPU, only XLA's own ops (not Python, runtime events or loops around ops)
        if args.get("hlo_module", "jit_decode_chunk") != "jit_decode_chunk":
            continue  # prefill and the small programs around it
        kind = re.sub(r"[._]\d+$", "", e["name"])
        total[kind] += e["dur"]
        count[kind] += 1
    return total, count


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--weights", default="fp,int8", help="comma list of " + ",".join(WEIGHTS))
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    cfg = jaxllm.ModelConfig(**CONFIGS[args.config], max_seq_len=1024, param_dtype=args.dtype, compute_dtype=args.dtype)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (args.batch, 32)).tolist()
    base = jaxllm.init_params(cfg, jax.random.key(0))
    print(f"{args.config} {args.dtype} batch {args.batch}, {args.new_tokens} new tokens, backend {jax.default_backend()}")
    for weights in args.weights.split(","):
        quant = WEIGHTS[weights]
        params = jax.jit(quantize_params, static_argnums=(1, 2))(base, *quant) if quant else base
        params = jaxllm.prepare_params(params, cfg)
        kw = dict(max_new_tokens=args.new_tokens, temperature=0.0, eos_token_id=[])
        jaxllm.generate(params, cfg, prompts, **kw)  # compile
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                result = jaxllm.generate(params, cfg, prompts, **kw)
            total, count = op_times(Path(d))
        steps = args.new_tokens
        step_us = result.timing["decode_s"] / steps * 1e6
        busy = sum(total.values()) / steps
        nbytes = roofline.step_bytes(params, cfg, args.batch, roofline.mean_context(len(prompts[0]), steps))
        print(f"\n[{weights}] step {step_us:.0f} us, ops busy {busy:.0f} us per step (decode program only); "
              f"reads {nbytes / 1e6:.1f} MB a step: {nbytes / step_us / 1e3:.1f} GB/s")
        print(f"  {'us/step':>8} {'calls/step':>10}  kind of op")
        for name, us in total.most_common(args.top):
            print(f"  {us / steps:8.1f} {count[name] / steps:10.1f}  {name[:100]}")


if __name__ == "__main__":
    main()
