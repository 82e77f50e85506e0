"""Structured output: what a constraint costs per decode step, and what compiling one costs.

Run from the repository root:

    python benchmarks/constraints.py                   # tiny and small, batch 1 and 8
    python benchmarks/constraints.py --configs tiny --batches 1 --reps 2

Tokenizers: SentencePiece BPE models with the configs' vocabulary sizes (8k, 32k), trained
once on this Python installation's standard-library sources (code: braces, quotes, commas)
and kept in ~/.cache/jaxllm/bench. Models: random float32 weights of benchmarks/decode.py's
shapes, sampled at temperature 1 with EOS allowed, so rows end when their document does.

A constrained row can finish early (a random model often closes its JSON soon), and rows
of a batch step together, so the fair unit is the decode *step*: "ms/step" is decode time /
the most tokens any row generated. "overhead" compares it with unconstrained decoding of the
same batch. Compile: the host-side table build for each constraint on the 32k vocabulary
(cold = on-disk cache off; warm = loaded from the cache).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's jaxllm, and decode.py beside this file
import jaxllm  # noqa: E402
from jaxllm.structured import constraints as C  # noqa: E402
from decode import CONFIGS, MAX_SEQ_LEN  # noqa: E402

SCHEMA = {  # a typical API response: nested object, enum, array, bounded strings
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "maxLength": 32},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]},
        "score": {"type": "number"},
    },
    "required": ["id", "name", "role"],
}
CONSTRAINTS = {
    "none": None,
    "json": C.Json(),
    "schema": C.JsonSchema(SCHEMA),
    "regex": C.Regex(r"[A-Z][a-z]+ [A-Z][a-z]+ <[a-z.]+@[a-z]+\.(com|org|net)>, age [1-9][0-9]?"),
    "choice": C.Choice(["positive", "negative", "neutral", "mixed", "unknown"]),
}


def tokenizer_for(vocab_size: int) -> jaxllm.Tokenizer:
    folder = Path.home() / ".cache" / "jaxllm" / "bench"
    path = folder / f"stdlib_bpe_{vocab_size}.model"
    if not path.is_file():
        files = sorted(Path(os.__file__).parent.glob("*.py"))
        print(f"training a {vocab_size}-token tokenizer on {len(files)} stdlib files (once) ...", flush=True)
        jaxllm.Tokenizer.train(files, folder / f"stdlib_bpe_{vocab_size}", vocab_size=vocab_size, max_sentences=400_000)
    return jaxllm.Tokenizer.load(path)


def per_step(params, cfg, tok, prompts, spec, new_tokens, reps) -> tuple[float, float]:
    """-> (best ms per decode step, mean tokens per row)."""
    def run(seed):
        return jaxllm.generate(params, cfg, prompts, tokenizer=tok, max_new_tokens=new_tokens, temperature=1.0,
                               seed=seed, constraint=spec)

    run(0)  # compiles
    best, lengths = float("inf"), []
    for r in range(reps):
        out = run(r + 1)
        steps = max(len(t) for t in out.token_ids)
        best = min(best, out.timing["decode_s"] / max(steps - 1, 1) * 1e3)  # the first token comes from prefill
        lengths += [len(t) for t in out.token_ids]
        assert spec is None or all(out.valid), out.errors
    return best, float(np.mean(lengths))


def compile_times(tok) -> list[tuple[str, float, float, int]]:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name, spec in CONSTRAINTS.items():
            if spec is None:
                continue
            os.environ["JAXLLM_CONSTRAINT_CACHE"] = "off"
            t0 = time.perf_counter()
            table = C.compile_table(spec, tok)
            cold = time.perf_counter() - t0
            os.environ["JAXLLM_CONSTRAINT_CACHE"] = cache
            C.compile_table(spec, tok)
            t0 = time.perf_counter()
            C.compile_table(spec, tok)
            warm = time.perf_counter() - t0
            rows.append((name, cold, warm, table.next.size * 4))
    os.environ.pop("JAXLLM_CONSTRAINT_CACHE")
    return rows


def table(header, rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--constraints", default=",".join(CONSTRAINTS))
    ap.add_argument("--new_tokens", type=int, default=96)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})"
    print(f"{datetime.date.today()}  {machine}  load {os.getloadavg()[0]:.1f}")

    compile_rows = [[n, f"{cold:.2f}", f"{warm * 1e3:.0f}", f"{size / 1e6:.1f}"]
                    for n, cold, warm, size in compile_times(tokenizer_for(32000))]
    print("\nconstraint compile, 32k vocabulary\n" + table(["constraint", "cold s", "cached ms", "table MB"], compile_rows))

    rows = []
    for name in args.configs.split(","):
        cfg = jaxllm.ModelConfig(**CONFIGS[name], max_seq_len=MAX_SEQ_LEN)
        tok = tokenizer_for(cfg.vocab_size)
        params = jaxllm.prepare_params(jaxllm.init_params(cfg, jax.random.key(0)), cfg)
        for B in map(int, args.batches.split(",")):
            prompts = ["Here is the record: "] * B
            base = None
            for cname in args.constraints.split(","):
                ms, mean_len = per_step(params, cfg, tok, prompts, CONSTRAINTS[cname], args.new_tokens, args.reps)
                base = ms if cname == "none" else base
                over = "" if base is None or cname == "none" else f"{100 * (ms / base - 1):+.0f}%"
                rows.append([name, str(B), cname, f"{ms:.2f}", f"{B * 1e3 / ms:.0f}", over, f"{mean_len:.0f}"])
                print(" ".join(rows[-1]), flush=True)
    print("\ndecode, random weights, temperature 1\n" +
          table(["config", "batch", "constraint", "ms/step", "tok/s", "overhead", "mean tokens/row"], rows))


if __name__ == "__main__":
    main()
