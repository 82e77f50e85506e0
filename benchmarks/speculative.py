"""Speculative decoding speed: prompt lookup (no draft model) and a draft model, against plain decoding.

    python benchmarks/speculative.py lookup                         # the bundled model, grounded prompts
    python benchmarks/speculative.py lookup --checkpoint DIR        # any checkpoint sample.py reads
    python benchmarks/speculative.py lookup --profile               # also: what one block's parts cost
    python benchmarks/speculative.py lookup --train_small 10        # configs/small.json in float32, trained 10 min first
    python benchmarks/speculative.py draft --train --minutes 6      # trains an 8-layer target and a 2-layer draft
    python benchmarks/speculative.py draft --train --target_layers 12 --target_d_model 512 --target_d_ff 1408
    python benchmarks/speculative.py draft --target DIR --draft DIR

`lookup`: greedy decoding of grounded prompts, where the output copies much of the input:
- "type hints": a standard-library function's source and "add type hints to this function";
- "json edit": a JSON object and "repeat it with one field changed".
Each prompt runs alone (batch 1) and all of them in one batch of 8, with each row keeping the
drafts it accepted (jaxllm's decoder) and with every row keeping only the fewest any row
accepted (`batch_minimum=True`, what one cache cursor shared by the batch allows). Prints
tokens/s of plain decoding and of prompt lookup side by side, the speedup, the acceptance
rate, the tokens kept per target forward and whether the greedy outputs are identical (in
float32 they are; in bfloat16 a near tie can round the other way).

`--profile`: times one target forward of 1 and of G + 1 tokens, and one whole block (lookup,
forward, acceptance, emission), so the table says where a block's time goes.

`draft`: a small draft with a deeper target, both trained by train.py on the built-in corpus
with the same tokenizer (--train), decoding 128 tokens at batch 1 for several G.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jaxllm  # noqa: E402
from jaxllm.speculative import speculative_generate  # noqa: E402

BUNDLED = ROOT / "jaxllm" / "assets" / "default"


# ---------------------------------------------------------------------------- grounded prompts


def type_hint_prompts() -> list[str]:
    """'Add type hints' prompts built from short standard-library functions' own source."""
    import colorsys
    import html
    import shlex
    import string
    import textwrap

    functions = [shlex.quote, colorsys.rgb_to_hsv, colorsys.hls_to_rgb, string.capwords, textwrap.indent, html.escape]
    prompts = []
    for fn in functions:
        source = textwrap.dedent(inspect.getsource(fn))
        prompts.append(f"# Add type hints to this function.\n{source}\n# The same function with type hints:\n")
    return prompts


def json_prompts() -> list[str]:
    """'Repeat this JSON with one field changed' prompts."""
    records = [
        {"name": "server", "host": "127.0.0.1", "port": 8000, "workers": 4, "debug": False, "log_level": "info"},
        {"id": 1042, "title": "Read the configuration file", "done": False, "tags": ["io", "config"], "owner": "ana"},
    ]
    changes = ["port to 8080", "done to true"]
    return [f"# Repeat this JSON with {change}.\n{json.dumps(r, indent=2)}\n# Result:\n" for r, change in zip(records, changes)]


def timed(fn, reps: int):
    """(best result, its decode tokens/s) over `reps` runs after one warm-up run that compiles."""
    fn()
    runs = [fn() for _ in range(reps)]
    best = min(runs, key=lambda r: r.timing["decode_s"])
    return best, sum(map(len, best.token_ids)) / best.timing["decode_s"]


def same(got, plain) -> str:
    """'yes' when the greedy outputs are identical, else how many rows differ. In float32 they
    always are (tests/test_speculative.py); in bfloat16, scoring G + 1 positions in one forward
    rounds differently from one at a time, and a near tie can go the other way."""
    differ = sum(a != b for a, b in zip(got.token_ids, plain.token_ids))
    return "yes" if not differ else f"{differ} rows differ"


def machine(cfg, what: str) -> str:
    return (f"{datetime.date.today()} · {platform.platform()}, {os.cpu_count()} CPUs · jax {jax.__version__} "
            f"({jax.default_backend()}) · {what}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}, "
            f"{cfg.compute_dtype}")


# ---------------------------------------------------------------------------- prompt lookup


def lookup(args) -> None:
    from jaxllm.checkpoint import load_any

    if args.train_small:  # the small preset, trained briefly: random weights make acceptance meaningless
        args.checkpoint = str(train(ROOT / "out" / "spec_bench" / "small", args.train_small, config="small", batch_size=8))
        args.compute_dtype, args.context = "float32", 1024  # trained on 256-token sequences; the preset's context
    params, cfg, tok, _ = load_any(Path(args.checkpoint))
    if args.context:
        cfg = cfg.replace(max_seq_len=args.context)
    if args.compute_dtype:
        cfg = cfg.replace(compute_dtype=args.compute_dtype, param_dtype=args.compute_dtype)
        params = jax.tree_util.tree_map(lambda x: x.astype(args.compute_dtype), params)
    params = jaxllm.prepare_params(params, cfg)
    tasks = {"type hints": type_hint_prompts(), "json edit": json_prompts()}
    print(machine(cfg, f"{args.checkpoint}"))
    common = dict(tokenizer=tok, max_new_tokens=args.new_tokens, temperature=0.0, eos_token_id=[])
    spec = dict(prompt_lookup_max=args.ngram, num_speculative_tokens=args.gamma)
    print(f"greedy, {args.new_tokens} new tokens, G = {args.gamma}, n-gram <= {args.ngram}; best of {args.reps}")
    print(f"{'task':12s} {'batch':>5s} {'plain tok/s':>11s} {'lookup tok/s':>12s} {'speedup':>8s} {'accept':>7s} {'tok/fwd':>8s} "
          f"{'same':>5s}")
    rows = []
    for task, prompts in tasks.items():
        for prompt in prompts:
            plain, plain_speed = timed(lambda: jaxllm.generate(params, cfg, [prompt], **common), args.reps)
            got, speed = timed(lambda: jaxllm.generate(params, cfg, [prompt], **common, **spec), args.reps)
            rows.append((task, speed / plain_speed))
            print(f"{task:12s} {1:5d} {plain_speed:11.1f} {speed:12.1f} {speed / plain_speed:8.2f} "
                  f"{got.timing['acceptance_rate']:7.2f} {got.timing['tokens_per_block']:8.2f} {same(got, plain):>5s}", flush=True)
    for task, speedup in ((t, [s for tt, s in rows if tt == t]) for t in tasks):
        print(f"{task:12s} batch 1 mean speedup {sum(speedup) / len(speedup):.2f}")

    batch = (tasks["type hints"] + tasks["json edit"])[:8]
    plain, plain_speed = timed(lambda: jaxllm.generate(params, cfg, batch, **common), args.reps)
    print(f"\nbatch of {len(batch)} (all prompts): each row keeps its own accepted drafts vs the batch minimum")
    print(f"{'acceptance':12s} {'tok/s':>8s} {'speedup':>8s} {'accept':>7s} {'tok/fwd':>8s} {'forwards':>8s} {'same':>5s}")
    print(f"{'(plain)':12s} {plain_speed:8.1f} {1.0:8.2f} {'-':>7s} {1.0:8.2f} {args.new_tokens - 1:8d}")
    for name, minimum in (("per row", False), ("batch min", True)):
        got, speed = timed(lambda: speculative_generate(params, cfg, None, None, batch, batch_minimum=minimum, **common, **spec),
                           args.reps)
        print(f"{name:12s} {speed:8.1f} {speed / plain_speed:8.2f} {got.timing['acceptance_rate']:7.2f} "
              f"{got.timing['tokens_per_block']:8.2f} {got.timing['target_forwards']:8d} {same(got, plain):>5s}", flush=True)
    if args.profile:
        profile(params, cfg, tok, batch[:1], args)


def profile(params, cfg, tok, prompts, args) -> None:
    """Milliseconds of one target forward over 1 and G + 1 tokens at the same cache, and of one
    whole block (lookup, forward, acceptance, emission) and one plain decode step."""
    from jaxllm.generate import bucket, left_pad
    from jaxllm.kvcache import per_row
    from jaxllm.model import forward
    from jaxllm.speculative import _blocks, _start_program
    from jaxllm.request import SPECULATIVE, prepare, make

    G = args.gamma
    ids = [tok.encode(p, add_bos=True) for p in prompts]
    tokens, positions = left_pad(ids, bucket(len(ids[0])), tok.pad_id)
    req = prepare(make(prompts, dict(max_new_tokens=args.new_tokens, temperature=0.0, eos_token_id=[], prompt_lookup_max=args.ngram,
                                     num_speculative_tokens=G)), cfg, tok, SPECULATIVE)
    models = dict(tcfg=cfg, dcfg=None, gamma=G, pad_id=req.pad_id, lookup_ngram=args.ngram)
    state, _ = _start_program(dict(models, buffer_len=req.buffer_len, num_alternatives=0, spec=req.spec), tparams=params,
                              dparams=None, prompt=jnp.asarray(tokens), prompt_pos=jnp.asarray(positions), sp=req.sampling,
                              stops=req.stops)
    cache = state.out.cache

    def best_ms(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(20):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)

    step = jax.jit(lambda p, t, pos, c: forward(p, cfg, t, pos, c)[0])
    pos0 = state.out.next_pos[:, None]
    one = best_ms(step, params, state.last[:, None], pos0, cache)
    many = best_ms(step, params, jnp.tile(state.last[:, None], (1, G + 1)), pos0 + jnp.arange(G + 1), cache)
    scalar = best_ms(step, params, state.last[:, None], pos0, dataclasses.replace(cache, cursor=cache.cursor[0]))
    block = jax.jit(lambda s: _blocks(params, None, s, req.sampling, req.stops, None, chunk=1, **models))
    whole = best_ms(block, state)
    print(f"\nprofile, batch {len(prompts)}, G = {G}: target forward 1 token {one:.2f} ms (shared cursor {scalar:.2f} ms), "
          f"G + 1 = {G + 1} tokens {many:.2f} ms ({many / one:.2f}x); one whole block {whole:.2f} ms "
          f"(forward {100 * many / whole:.0f}%, the rest: lookup, acceptance, emission)")


# ---------------------------------------------------------------------------- draft model


def train(out: Path, minutes: float, *overrides: str, config: str = "default", batch_size: int = 16) -> Path:
    """train.py on the built-in corpus for `minutes`, float32, sequences of 256; `overrides`:
    more --field=value flags."""
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{config}.json"),
            "--out_dir", str(out), f"--max_minutes={minutes}", "--max_steps=100000",
            "--compute_dtype=float32", "--param_dtype=float32", "--eval_every=0", "--save_every=0", "--no_progress",
            "--max_seq_len=256", f"--batch_size={batch_size}", "--grad_accum=1", *overrides]
    print(" ".join(args[1:]), flush=True)
    subprocess.run(args, check=True)
    return out


def draft(args) -> None:
    if args.train:
        base = ROOT / "out" / "spec_bench"
        target = train(base / "target", args.minutes, f"--n_layers={args.target_layers}", f"--d_model={args.target_d_model}",
                       f"--d_ff={args.target_d_ff}")
        draft_dir = train(base / "draft", args.minutes, "--n_layers=2", f"--tokenizer={target / 'tokenizer.model'}")
    elif args.target and args.draft:
        target, draft_dir = Path(args.target), Path(args.draft)
    else:
        sys.exit("benchmarks/speculative.py draft: give --target and --draft, or --train")
    params, cfg, tok = jaxllm.load_checkpoint(target)
    dparams, dcfg, _ = jaxllm.load_checkpoint(draft_dir)
    params, dparams = jaxllm.prepare_params(params, cfg), jaxllm.prepare_params(dparams, dcfg)
    prompt = ["def read_config(path):\n    \"\"\"Read the configuration file"]
    print(machine(cfg, f"target; draft {dcfg.n_layers} layers"))
    print(f"{'mode':8s} {'G':>3s} {'tok/s':>8s} {'speedup':>8s} {'accept':>7s} {'tok/fwd':>8s}")
    for mode, kw in [("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=0.8, top_p=0.95, seed=0))]:
        common = dict(tokenizer=tok, max_new_tokens=args.new_tokens, eos_token_id=[], **kw)
        plain, plain_speed = timed(lambda: jaxllm.generate(params, cfg, prompt, **common), args.reps)
        print(f"{mode:8s} {'-':>3s} {plain_speed:8.1f} {1.0:8.2f} {'-':>7s} {1.0:8.2f}")
        for g in map(int, args.gammas.split(",")):
            spec, speed = timed(lambda: speculative_generate(params, cfg, dparams, dcfg, prompt, num_speculative_tokens=g, **common),
                                args.reps)
            if mode == "greedy":
                assert spec.token_ids == plain.token_ids, "speculative greedy output differs from plain greedy"
            print(f"{mode:8s} {g:3d} {speed:8.1f} {speed / plain_speed:8.2f} {spec.timing['acceptance_rate']:7.2f} "
                  f"{spec.timing['tokens_per_block']:8.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    lk = sub.add_parser("lookup", help="prompt lookup on grounded prompts")
    lk.add_argument("--checkpoint", default=str(BUNDLED), help="a checkpoint (default: the bundled model)")
    lk.add_argument("--compute_dtype", default="", help="cast params and compute to this dtype (e.g. float32)")
    lk.add_argument("--context", type=int, default=0, help="run the model with this context (a RoPE model trained on shorter sequences)")
    lk.add_argument("--gamma", type=int, default=8, help="tokens drafted per target forward")
    lk.add_argument("--ngram", type=int, default=3, help="prompt_lookup_max")
    lk.add_argument("--new_tokens", type=int, default=128)
    lk.add_argument("--reps", type=int, default=3)
    lk.add_argument("--profile", action="store_true", help="also time a block's parts")
    lk.add_argument("--train_small", type=float, default=0.0, metavar="MINUTES",
                    help="first train configs/small.json (float32) for this long and use it as the target")
    dr = sub.add_parser("draft", help="a trained draft model")
    dr.add_argument("--target", help="target checkpoint directory")
    dr.add_argument("--draft", help="draft checkpoint directory")
    dr.add_argument("--train", action="store_true", help="train a target and a 2-layer draft (the default preset) first")
    dr.add_argument("--target_layers", type=int, default=8)
    dr.add_argument("--target_d_model", type=int, default=256)
    dr.add_argument("--target_d_ff", type=int, default=704)
    dr.add_argument("--minutes", type=float, default=6.0, help="training time for each model with --train")
    dr.add_argument("--gammas", default="2,4,6")
    dr.add_argument("--new_tokens", type=int, default=128)
    dr.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    lookup(args) if args.what == "lookup" else draft(args)


if __name__ == "__main__":
    main()
