"""Speculative decoding speed: a small draft with a deeper target, both trained by train.py.

    python benchmarks/speculative.py --train --minutes 6          # trains both models first (CPU: ~2 x 6 min)
    python benchmarks/speculative.py --target DIR --draft DIR      # models you already have

With --train, the target (8 layers) and the draft (2 layers) are trained on the same data
(the built-in standard-library corpus) with the same tokenizer, under out/spec_bench/.
Prints plain-decoding tokens/s next to speculative tokens/s for several G, with the
acceptance rate, greedy and sampled, batch 1. Outputs of greedy runs are checked to be
identical to plain decoding (speculative decoding is exact).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax

import jaxllm
from jaxllm.speculative import speculative_generate

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(d_model=256, n_heads=4, n_kv_heads=2, d_ff=704, vocab_size=4096, max_seq_len=256)


def train(out: Path, layers: int, minutes: float, tokenizer: str = "") -> Path:
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "default.json"),
            "--out_dir", str(out), f"--n_layers={layers}", f"--max_minutes={minutes}", "--max_steps=100000",
            "--compute_dtype=float32", "--param_dtype=float32", "--eval_every=0", "--save_every=0", "--no_progress",
            "--max_seq_len=256", "--batch_size=16"]
    if tokenizer:
        args.append(f"--tokenizer={tokenizer}")
    print(" ".join(args[1:]), flush=True)
    subprocess.run(args, check=True)
    return out


def timed(fn, reps):
    fn()  # compile
    runs = [fn() for _ in range(reps)]
    best = min(runs, key=lambda r: r.timing["decode_s"])
    return best, sum(map(len, best.token_ids)) / best.timing["decode_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="target checkpoint directory")
    ap.add_argument("--draft", help="draft checkpoint directory")
    ap.add_argument("--train", action="store_true", help="train an 8-layer target and a 2-layer draft first")
    ap.add_argument("--minutes", type=float, default=6.0, help="training time for each model with --train")
    ap.add_argument("--gammas", default="2,4,6")
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.train:
        base = ROOT / "out" / "spec_bench"
        target = train(base / "target", 8, args.minutes)
        draft = train(base / "draft", 2, args.minutes, tokenizer=str(target / "tokenizer.model"))
    elif args.target and args.draft:
        target, draft = Path(args.target), Path(args.draft)
    else:
        ap.error("give --target and --draft, or --train")

    params, cfg, tok = jaxllm.load_checkpoint(target)
    dparams, dcfg, _ = jaxllm.load_checkpoint(draft)
    params, dparams = jaxllm.prepare_params(params, cfg), jaxllm.prepare_params(dparams, dcfg)
    prompt = ["def read_config(path):\n    \"\"\"Read the configuration file"]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; jax {jax.__version__} ({jax.default_backend()}); "
          f"{datetime.date.today()}; target {cfg.n_layers} layers, draft {dcfg.n_layers} layers")
    print(f"{'mode':8s} {'G':>3s} {'tok/s':>8s} {'speedup':>8s} {'accept':>7s} {'tok/fwd':>8s}")
    for mode, kw in [("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=0.8, top_p=0.95, seed=0))]:
        common = dict(tokenizer=tok, max_new_tokens=args.new_tokens, eos_token_id=[], **kw)
        plain, plain_speed = timed(lambda: jaxllm.generate(params, cfg, prompt, **common), args.reps)
        print(f"{mode:8s} {'-':>3s} {plain_speed:8.1f} {1.0:8.2f} {'-':>7s} {1.0:8.2f}")
        for g in map(int, args.gammas.split(",")):
            spec, speed = timed(lambda: speculative_generate(params, cfg, dparams, dcfg, prompt, num_speculative_tokens=g, **common), args.reps)
            if mode == "greedy":
                assert spec.token_ids == plain.token_ids, "speculative greedy output differs from plain greedy"
            print(f"{mode:8s} {g:3d} {speed:8.1f} {speed / plain_speed:8.2f} {spec.timing['acceptance_rate']:7.2f} "
                  f"{spec.timing['tokens_per_block']:8.2f}")


if __name__ == "__main__":
    main()
