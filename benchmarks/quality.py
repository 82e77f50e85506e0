"""What quantization costs in quality: validation perplexity and bits per byte of a trained model
in fp32, bf16, int8 and int4 (group 32/64/128).

Run from the repository root:

    python benchmarks/quality.py                      # the bundled model on its own val split
    python benchmarks/quality.py --max_tokens 16384   # a quicker, smaller sample
    python benchmarks/quality.py --markdown           # also print rows for benchmarks/RESULTS.md

The val split is rebuilt exactly as training made it (jaxllm.data: the corpus' documents, the
seeded whole-document split at the run's val_fraction, <s> ... </s> framing, the model's
tokenizer), so "bpb" is the number training logged as val bpb, here over non-overlapping
windows of the model's context that cover the split (training used a few fixed windows).
Quantized weights are made from the checkpoint's weights and run with float32 compute, so
the int rows differ from the fp32 row only by quantization.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jaxllm import data, training  # noqa: E402
from jaxllm.checkpoint import load_checkpoint  # noqa: E402
from jaxllm.quantize import param_bytes, quantize_params  # noqa: E402

BUNDLED = Path(__file__).resolve().parent.parent / "jaxllm" / "assets" / "default"
VARIANTS = {  # name -> (quantization (bits, group) or None, param dtype, compute dtype)
    "fp32": (None, "float32", "float32"),
    "bf16": (None, "bfloat16", "bfloat16"),
    "int8": ((8, 64), "float32", "float32"),
    "int4 g32": ((4, 32), "float32", "float32"),
    "int4 g64": ((4, 64), "float32", "float32"),
    "int4 g128": ((4, 128), "float32", "float32"),
}
TARGETS = {"int8": 1.01, "int4 g64": 1.05}  # perplexity relative to fp32


def val_split(tokenizer, corpus: str, val_fraction: float) -> data.Split:
    """The val documents of `corpus` as training split them -> token stream + byte count."""
    docs = data.read_documents(data.corpus_files(corpus))
    _, val_docs = data.split_documents(docs, val_fraction)
    tokens = data.encode_documents(tokenizer, val_docs)
    return data.Split(tokens, sum(len(d.text.encode("utf-8")) for d in val_docs), len(val_docs))


def windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping [n, seq_len + 1] windows from the start of the split (each predicts seq_len tokens)."""
    n = min(len(tokens) - 1, max_tokens or len(tokens)) // seq_len
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)


def mean_loss(params, cfg, batches: np.ndarray, batch_size: int) -> float:
    """Mean next-token loss (nats) over all windows."""
    step = jax.jit(lambda p, b: jnp.sum(training.token_losses(p, cfg, b)))
    total = 0.0
    for i in range(0, len(batches), batch_size):
        total += float(step(params, jnp.asarray(batches[i : i + batch_size])))
    return total / (len(batches) * (batches.shape[1] - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(BUNDLED))
    ap.add_argument("--corpus", default="stdlib", help="the corpus the model was trained on")
    ap.add_argument("--val_fraction", type=float, default=0.02, help="the run's val_fraction (configs/default.json: 0.02)")
    ap.add_argument("--max_tokens", type=int, default=0, help="evaluate at most this many val tokens (0: all)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()

    stored, cfg, tokenizer = load_checkpoint(args.checkpoint)
    split = val_split(tokenizer, args.corpus, args.val_fraction)
    batches = windows(np.asarray(split.tokens), cfg.max_seq_len, args.max_tokens)
    scored = batches.shape[0] * cfg.max_seq_len
    print(f"{args.checkpoint}: {cfg.n_layers} layers, d {cfg.d_model}, stored {cfg.param_dtype}; val split {len(split.tokens):,} "
          f"tokens / {split.n_docs} docs ({split.bytes_per_token:.2f} bytes/token), scoring {scored:,} tokens in "
          f"{len(batches)} windows of {cfg.max_seq_len}")

    rows, base = [], None
    for name in args.variants.split(","):
        quant, pdt, cdt = VARIANTS[name]
        vcfg = cfg.replace(param_dtype=pdt, compute_dtype=cdt)
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, pdt), stored)
        if quant:
            params = jax.jit(quantize_params, static_argnums=(1, 2))(params, *quant)
        t = time.perf_counter()
        loss = mean_loss(params, vcfg, batches, args.batch_size)
        ppl, bpb = math.exp(loss), data.bits_per_byte(loss, split)
        base = base or ppl
        target = TARGETS.get(name)
        verdict = "-" if target is None else ("met" if ppl / base <= target else "MISSED")
        rows.append([name, f"{param_bytes(params) / 1e6:.2f}", f"{loss:.4f}", f"{ppl:.3f}", f"{bpb:.4f}",
                     f"{100 * (ppl / base - 1):+.2f}%", f"+{100 * (target - 1):.0f}% {verdict}" if target else "-"])
        print(f"  {name:10s} loss {loss:.4f}  ppl {ppl:.3f}  bpb {bpb:.4f}  ({time.perf_counter() - t:.0f}s)", flush=True)

    header = ["weights", "MB", "val loss", "val ppl", "val bpb", "ppl vs fp32", "target"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    for r in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if args.markdown:
        print(f"\n### {datetime.date.today().isoformat()}: {platform.platform()}; jax {jax.__version__}\n")
        print(f"`{Path(args.checkpoint).name}`, {scored:,} val tokens ({len(batches)} windows of {cfg.max_seq_len}).\n")
        print("| " + " | ".join(header) + " |")
        print("|---|" + "|".join("---:" for _ in header[1:]) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
