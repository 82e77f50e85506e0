"""Decode speed: jaxllm vs transformers (LlamaForCausalLM), against a memory-bandwidth roofline.

Run from the repository root:

    python benchmarks/decode.py                      # tiny and small, batch 1 and 8, 3 reps
    python benchmarks/decode.py --reps 2 --configs tiny --batches 1
    python benchmarks/decode.py --no_reference       # jaxllm only (no torch/transformers needed)
    python benchmarks/decode.py --markdown           # also print rows for benchmarks/RESULTS.md
    python benchmarks/decode.py --modes greedy        # skip the sampling-chain rows

Modes: "greedy"; "chain" = top_k 50 + top_p 0.95 + repetition_penalty 1.1 sampling at
temperature 1 (the same settings for transformers' generate(do_sample=True)); "beam4" =
beam search with 4 beams (tokens/s counts the returned tokens, B * new_tokens; jaxllm's
time includes its prefill). The summary prints what the chain costs over greedy decoding.

Both libraries get random-init float32 weights of the same shapes and the same random
prompt ids; EOS is disabled so every row decodes exactly --new_tokens tokens. Times are
the best of --reps runs after one warm-up run (which also compiles jaxllm's programs).

Columns: "dec" is decode-only tokens/s (B * new_tokens / decode time; for transformers the
decode time is generate() minus one separately timed prefill forward), "e2e" is end-to-end
tokens/s including prefill. The roofline is B * bandwidth / the bytes a decode step must read
(benchmarks/roofline.py: the weights it multiplies, not an untied embedding table, which is
only gathered from; the filled KV slots, averaged over the decode; the gathered rows). jaxllm's
step attends over all its preallocated slots (bucket(prompt) + bucket(new_tokens)), so what it
reads beyond the filled ones shows in its % of roofline.

On a small shared machine, check the printed load average: other processes skew the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm
import roofline
from jaxllm.beam import beam_generate
from jaxllm.quantize import quantize_params

CONFIGS = {
    "tiny": dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=688),
    "small": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048),
}
MAX_SEQ_LEN = 1024
CHUNK = 16  # jaxllm.generate's default decode chunk; sets the output buffer bucket
CHAIN = dict(top_k=50, top_p=0.95, repetition_penalty=1.1)
MODES = {  # mode -> (jaxllm kwargs, transformers generate kwargs); "num_beams" selects beam_generate
    "greedy": (dict(temperature=0.0), dict(do_sample=False)),
    "chain": (dict(temperature=1.0, **CHAIN), dict(do_sample=True, temperature=1.0, **CHAIN)),
    "beam4": (dict(num_beams=4), dict(do_sample=False, num_beams=4, early_stopping=False)),
}


def measure_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Best read bandwidth (GB/s) of summing a ~1 GiB float32 array, numpy vs a jitted JAX sum."""
    n = int(gib * 2**30) // 4
    x = np.random.default_rng(0).random(n, dtype=np.float32)
    best = {}
    for name, fn, arg in [("numpy sum", np.sum, x), ("jax jit sum", jax.jit(jnp.sum), jax.device_put(x))]:
        jax.block_until_ready(fn(arg))  # warm up / compile
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(arg))
            times.append(time.perf_counter() - t0)
        best[name] = x.nbytes / min(times) / 1e9
        del arg
    print("memory bandwidth (read, best of %d): %s" % (reps, ", ".join(f"{k} {v:.1f} GB/s" for k, v in best.items())))
    return max(best.values())


def bench_jaxllm(cfg: jaxllm.ModelConfig, prompts: np.ndarray, new_tokens: int, reps: int, mode: str, quantize=None) -> dict:
    """quantize: None, or (bits, group_size) for weight-only quantized params (jaxllm.quantize)."""
    params = jaxllm.init_params(cfg, jax.random.key(0))
    if quantize:
        params = jax.jit(quantize_params, static_argnums=(1, 2))(params, *quantize)
    params = jaxllm.prepare_params(params, cfg)  # laid out once, as sample.py does
    ids = prompts.tolist()
    if "num_beams" in MODES[mode][0]:
        kwargs = dict(max_new_tokens=new_tokens, eos_token_id=[], **MODES[mode][0])
        run = lambda: beam_generate(params, cfg, ids, **kwargs)
    else:
        kwargs = dict(max_new_tokens=new_tokens, seed=0, eos_token_id=[], chunk=CHUNK, **MODES[mode][0])
        run = lambda: jaxllm.generate(params, cfg, ids, **kwargs)
    result = run()  # warm-up: compiles the programs
    assert all(len(t) == new_tokens for t in result.token_ids), "expected exactly new_tokens per row"
    prefill, decode, e2e = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = run()
        e2e.append(time.perf_counter() - t0)
        prefill.append(result.timing.get("prefill_s", 0.0))  # beam search times prefill and search together
        decode.append(result.timing.get("decode_s", result.timing.get("search_s")))
    B, P = prompts.shape
    rows = B * MODES[mode][0].get("num_beams", 1)  # beam search keeps a cache row per beam
    return dict(prefill_s=min(prefill), decode_s=min(decode), e2e_s=min(e2e), param_bytes=roofline.tree_bytes(params),
                step_bytes=roofline.step_bytes(params, cfg, rows, roofline.mean_context(P, new_tokens)),
                tokens=np.asarray(result.token_ids))


def bench_transformers(spec: dict, prompts: np.ndarray, new_tokens: int, reps: int, mode: str, dtype: str = "float32") -> dict:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["d_model"], intermediate_size=spec["d_ff"],
        num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
        num_key_value_heads=spec["n_kv_heads"], max_position_embeddings=MAX_SEQ_LEN,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU machine, compare GPU with GPU
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).eval().to(device)
    input_ids = torch.as_tensor(prompts, dtype=torch.long, device=device)
    mask = torch.ones_like(input_ids)
    gen = dict(attention_mask=mask, eos_token_id=None, pad_token_id=0, **MODES[mode][1])
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=8, min_new_tokens=8, **gen)  # warm-up
        total, prefill = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **gen)
            total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model(input_ids, attention_mask=mask, use_cache=True)
            if device == "cuda":
                torch.cuda.synchronize()
            prefill.append(time.perf_counter() - t0)
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return dict(e2e_s=min(total), prefill_s=min(prefill), tokens=out[:, prompts.shape[1]:].cpu().numpy())


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--prompt_len", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="greedy,chain,beam4", help="greedy, chain (top_k 50, top_p 0.95, repetition_penalty 1.1), beam4")
    ap.add_argument("--no_reference", action="store_true", help="skip the transformers reference")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown block for RESULTS.md")
    args = ap.parse_args()

    versions = {"jax": jax.__version__}
    reference = not args.no_reference
    if reference:
        try:
            import torch
            import transformers

            torch.set_num_threads(os.cpu_count())
            versions.update(torch=torch.__version__, transformers=transformers.__version__)
        except ImportError as e:
            print(f"note: transformers reference skipped ({e}); pip install -e '.[reference]' to enable it")
            reference = False
    machine = f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"machine: {machine}; jax backend {jax.default_backend()}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"modes {args.modes}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, best of {args.reps} after a warm-up")
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: 1-min load average is {load_before:.1f} before starting: other processes share the CPUs, "
              "so timings (transformers' OpenMP threads especially) will be noisy")
    bandwidth = measure_bandwidth()

    header = ["config", "mode", "batch", "jax dec tok/s", "jax e2e tok/s", "jax prefill ms", "HF dec tok/s",
              "HF e2e tok/s", "ratio dec", "ratio e2e", "roofline tok/s", "% roofline"]
    rows = []
    speeds = {}
    for name in args.configs.split(","):
        spec = CONFIGS[name]
        cfg = jaxllm.ModelConfig(**spec, max_seq_len=MAX_SEQ_LEN)
        for B, mode in itertools.product(map(int, args.batches.split(",")), args.modes.split(",")):
            prompts = np.random.default_rng(B).integers(1, cfg.vocab_size, (B, args.prompt_len))
            n = B * args.new_tokens
            print(f"[{name} {mode} B={B}] jaxllm ...", flush=True)
            j = bench_jaxllm(cfg, prompts, args.new_tokens, args.reps, mode)
            ceiling = roofline.roofline(B, bandwidth, j["step_bytes"])
            jax_dec, jax_e2e = n / j["decode_s"], n / j["e2e_s"]
            speeds[(name, B, mode)] = jax_dec
            hf_dec = hf_e2e = None
            if reference:
                print(f"[{name} {mode} B={B}] transformers ...", flush=True)
                h = bench_transformers(spec, prompts, args.new_tokens, args.reps, mode)
                hf_dec, hf_e2e = n / (h["e2e_s"] - h["prefill_s"]), n / h["e2e_s"]
            print(f"[{name} B={B}] params {j['param_bytes'] / 1e6:.1f} MB stored, {j['step_bytes'] / 1e6:.1f} MB read "
                  "per step (weights multiplied + filled KV + gathered rows)", flush=True)
            rows.append([name, mode, str(B), fmt(jax_dec), fmt(jax_e2e), fmt(j["prefill_s"] * 1e3),
                         fmt(hf_dec), fmt(hf_e2e), fmt(hf_dec and jax_dec / hf_dec, ".2f"),
                         fmt(hf_e2e and jax_e2e / hf_e2e, ".2f"), fmt(ceiling), fmt(100 * jax_dec / ceiling)])

    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print("ratio = jaxllm / transformers (>1: jaxllm faster); % roofline uses jaxllm decode tok/s")
    costs = [f"{c} B={b}: +{100 * (speeds[(c, b, 'greedy')] / v - 1):.0f}%"
             for (c, b, m), v in speeds.items() if m == "chain" and (c, b, "greedy") in speeds]
    if costs:
        print("sampling chain cost over greedy (jaxllm decode): " + ", ".join(costs))
    load = f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(load)

    if args.markdown:
        today = datetime.date.today().isoformat()
        print(f"\n### {today}: {machine}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print(f"\nfp32, prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.reps}; "
              f"measured read bandwidth {bandwidth:.1f} GB/s; {load}.\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
        if costs:
            print("\nSampling chain cost over greedy (jaxllm decode): " + ", ".join(costs) + ".")


if __name__ == "__main__":
    main()
