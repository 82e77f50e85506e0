"""Training speed: jaxllm's train step vs transformers' LlamaForCausalLM + torch.optim.AdamW.

Run from the repository root:

    python benchmarks/train.py                         # nanoGPT's two CPU configs, both libraries
    python benchmarks/train.py --configs small --steps 3
    python benchmarks/train.py --no_reference          # jaxllm only
    python benchmarks/train.py --dtype bfloat16        # bf16 compute (for GPUs/TPUs)
    python benchmarks/train.py --markdown              # also print rows for benchmarks/RESULTS.md

The configs are nanoGPT's shakespeare_char shapes (vocab 65): "small" is its CPU config
(4 layers, 128 wide, 4 heads, batch 12 x 64 tokens), "medium" its GPU config (6 layers, 384
wide, 6 heads, batch 64 x 256); "gpt2" is GPT-2 small's (12 layers, 768 wide, 50304-token
vocabulary, batch 16 x 1024), for MFU on an accelerator. Both libraries train the same Llama-style shapes (SwiGLU
d_ff = 4 * d_model, untied embeddings, no GQA) with AdamW (weight decay 0.1, betas
0.9/0.95), global-norm clipping at 1.0, float32 weights, on the same random token batches.
jaxllm's step is the library's own `train_step` (jit, donated state); torch uses its default
attention (SDPA). Each side runs --warmup steps (jaxllm compiles there), then --steps timed
steps; tokens/s = steps * batch * seq_len / time. On an accelerator, model FLOPs utilization
is printed too (6 N + 12 L T d FLOPs per token, against the device's dense peak).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxllm
from jaxllm import training

CONFIGS = {
    "small": dict(d_model=128, n_layers=4, n_heads=4, batch=12, seq=64),
    "medium": dict(d_model=384, n_layers=6, n_heads=6, batch=64, seq=256),
    # GPT-2 small's shapes (124M with its tied 50257-token table; here Llama-style, untied, the
    # vocabulary padded to 50304 as nanoGPT does), sequence 1024: the accelerator MFU check
    "gpt2": dict(d_model=768, n_layers=12, n_heads=12, batch=16, seq=1024, vocab=50304),
}
VOCAB = 65  # nanoGPT's shakespeare_char, unless a config says otherwise
PEAK_TFLOPS = {"H100": (989, 495), "H200": (989, 495), "A100": (312, 156), "TPU v5 lite": (197, 197)}  # bf16, fp32/tf32


def model_config(c: dict, dtype: str) -> jaxllm.ModelConfig:
    d = c["d_model"]
    return jaxllm.ModelConfig(
        vocab_size=c.get("vocab", VOCAB), d_model=d, n_layers=c["n_layers"], n_heads=c["n_heads"], n_kv_heads=c["n_heads"],
        d_ff=4 * d, max_seq_len=c["seq"], compute_dtype=dtype,
    )  # fmt: skip


def batches(c: dict, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, c.get("vocab", VOCAB), (c["batch"], c["seq"] + 1)).astype(np.int32) for _ in range(n)]


def bench_jaxllm(c: dict, data: list[np.ndarray], warmup: int, dtype: str) -> float:
    cfg = model_config(c, dtype)
    tcfg = jaxllm.TrainConfig(batch_size=c["batch"], max_steps=10_000, lr=1e-3, warmup_steps=10, weight_decay=0.1)
    mesh = training.make_mesh(1, jax.devices()[:1])
    state, shardings = training.init_sharded_state(cfg, tcfg, jax.random.key(0), mesh)
    step = training.compile_step(cfg, tcfg, mesh, shardings)
    sharding = training.batch_sharding(mesh)
    for b in data[:warmup]:
        state, m = step(state, training.global_batch(b[None], sharding))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        state, m = step(state, training.global_batch(b[None], sharding))
    jax.block_until_ready((state, m))
    return time.perf_counter() - t0


def bench_torch(c: dict, data: list[np.ndarray], warmup: int) -> float | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    d = c["d_model"]
    hf = LlamaConfig(
        vocab_size=c.get("vocab", VOCAB), hidden_size=d, intermediate_size=4 * d, num_hidden_layers=c["n_layers"],
        num_attention_heads=c["n_heads"], num_key_value_heads=c["n_heads"], max_position_embeddings=c["seq"],
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def step(b):
        x = torch.from_numpy(b[:, :-1]).long()
        y = torch.from_numpy(b[:, 1:]).long()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for b in data[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        step(b).item()
    return time.perf_counter() - t0


def flops_per_token(c: dict) -> float:
    """6 N (the params multiplied, forward + backward: the layers' projections and the output head;
    the embedding table is gathered, not multiplied) + 12 L T d (attention scores and values)."""
    d, L, T = c["d_model"], c["n_layers"], c["seq"]
    n = L * (4 * d * d + 3 * d * 4 * d) + c.get("vocab", VOCAB) * d
    return 6 * n + 12 * L * T * d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"], choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30 small, 3 medium)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="jaxllm compute dtype")
    p.add_argument("--no_reference", action="store_true", help="skip transformers/torch")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()

    device = jax.devices()[0]
    kind = device.device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    versions = f"jax {jax.__version__}"
    try:
        import torch
        import transformers

        versions += f", torch {torch.__version__}, transformers {transformers.__version__}"
    except ImportError:
        pass
    print(f"{platform.node()} · {kind} · {os.cpu_count()} CPUs · {versions} · {datetime.date.today()}")
    print(f"load average: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")
    rows = []
    for name in args.configs:
        c = CONFIGS[name]
        steps = args.steps or {"small": 30, "medium": 3, "gpt2": 10}[name]
        data = batches(c, args.warmup + steps)
        tokens = steps * c["batch"] * c["seq"]
        j = tokens / bench_jaxllm(c, data, args.warmup, args.dtype)
        t = None if args.no_reference else bench_torch(c, data, args.warmup)
        t = None if t is None else tokens / t
        mfu = ""
        if peak and device.platform != "cpu":
            tflops = j * flops_per_token(c) / 1e12
            mfu = f"{tflops:.1f} TFLOP/s = {100 * tflops / peak[0 if args.dtype == 'bfloat16' else 1]:.1f}% MFU"
        shape = f"{c['n_layers']}L/{c['d_model']}d/{c['n_heads']}h, batch {c['batch']}x{c['seq']}"
        rows.append((name, shape, j, t, mfu))

    print(f"\n{'config':8} {'shape':32} {'jaxllm tok/s':>13} {'torch tok/s':>12} {'ratio':>6}  {'MFU'}")
    for name, shape, j, t, mfu in rows:
        ts, ratio = (f"{t:12,.0f}", f"{j / t:6.2f}") if t else (f"{'-':>12}", f"{'-':>6}")
        print(f"{name:8} {shape:32} {j:13,.0f} {ts} {ratio}  {mfu}")
    if args.markdown:
        print("\n| config | shape | jaxllm tokens/s | transformers tokens/s | ratio |\n|---|---|---:|---:|---:|")
        for name, shape, j, t, mfu in rows:
            print(f"| {name} | {shape} | {j:,.0f} | {f'{t:,.0f}' if t else '-'} | {f'{j / t:.2f}x' if t else '-'} |")


if __name__ == "__main__":
    main()
