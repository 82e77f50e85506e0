"""Plain numpy references: the oracle the JAX code is checked against.

Written independently of jaxllm's code: loops over layers and heads, float64.
"""

from __future__ import annotations

import math

import numpy as np


def np_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_inv_freq(cfg):
    """RoPE frequencies [E/2] with cfg's scaling, written from the papers' formulas (one at a time)."""
    E, theta, f = cfg.dim_per_head, cfg.rope_theta, cfg.rope_factor
    out = []
    for i in range(E // 2):
        if cfg.rope_scaling == "ntk":  # NTK-aware: base * factor^(E / (E - 2))
            freq = (theta * f ** (E / (E - 2))) ** (-2.0 * i / E)
        else:
            freq = theta ** (-2.0 * i / E)
        if cfg.rope_scaling == "linear":
            freq /= f
        elif cfg.rope_scaling == "llama3":
            context = cfg.rope_original_max_len or cfg.max_seq_len
            wavelen = 2 * np.pi / freq
            if wavelen > context / cfg.rope_low_freq_factor:  # long wavelengths: interpolated
                freq /= f
            elif wavelen >= context / cfg.rope_high_freq_factor:  # the band between: blended
                smooth = (context / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
                freq = (1 - smooth) * freq / f + smooth * freq
        out.append(freq)
    return np.array(out)


def np_alibi_slopes(n):
    """ALiBi slopes as in the paper's code: geometric from 2^(-8/n); interleaved for n not a power of two."""
    def pow2(m):
        start = 2 ** (-(2 ** -(np.log2(m) - 3)))
        return [start * start**i for i in range(m)]
    if np.log2(n).is_integer():
        return np.array(pow2(n))
    closest = 2 ** int(np.floor(np.log2(n)))
    return np.array(pow2(closest) + pow2(2 * closest)[0::2][: n - closest])


def np_rope(x, pos, theta, inv_freq=None):
    """x: [T, E] for one head, pos: [T]. Pairs (i, i + E/2) rotate by pos * theta^(-2i/E)
    (or by pos * inv_freq[i] when frequencies are given)."""
    E = x.shape[-1]
    out = np.empty_like(x)
    for i in range(E // 2):
        angle = pos * (theta ** (-2.0 * i / E) if inv_freq is None else inv_freq[i])
        a, b = x[:, i], x[:, i + E // 2]
        out[:, i] = a * np.cos(angle) - b * np.sin(angle)
        out[:, i + E // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def np_int8_round(x):
    """x: [T, E] -> x rounded to int8 steps, one scale per row: max |x| / 127 (the int8 KV cache's format)."""
    scale = np.abs(x).max(axis=-1, keepdims=True) / 127.0
    return np.round(x / np.where(scale > 0, scale, 1.0)) * scale


def np_activation(name, g):
    """The MLP gate's nonlinearity: SiLU g·σ(g), GELU g·Φ(g) (erf), or GELU's tanh approximation."""
    if name == "silu":
        return g / (1 + np.exp(-g))
    if name == "gelu":
        return 0.5 * g * (1 + np.vectorize(math.erf)(g / np.sqrt(2)))
    assert name == "gelu_tanh", name
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))


def np_forward(params, cfg, tokens, positions=None, int8_kv=False, adapters=None, scale=0.0):
    """Logits [T, V] of one unpadded sequence `tokens: [T]` at `positions` (default 0..T-1).

    Follows cfg's position_encoding (RoPE with its scaling, or ALiBi) and sliding_window
    (query i sees keys j with i - W < j <= i), and the family options: q/k/v biases, the MLP's
    activation, norm gains stored minus an offset, embeddings scaled by sqrt(d_model). `int8_kv`: every key (as attention reads it,
    after RoPE) and value is rounded to int8 steps per token and kv head first.
    `adapters` ({"layers": {name: {"lora_a": [L, I, R], "lora_b": [L, R, O]}}}): each such matrix's
    product is h @ W + scale * (h @ A) @ B, the low-rank path applied beside W, never merged into it.
    """
    kv_round = np_int8_round if int8_kv else (lambda x: x)
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
    T, E = len(tokens), cfg.dim_per_head
    H, K = cfg.n_heads, cfg.n_kv_heads
    pos = np.arange(T, dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    x = p["embed"][np.asarray(tokens)]
    if cfg.embed_scale:  # Gemma: embeddings times sqrt(d_model)
        x = x * np.sqrt(cfg.d_model)
    norm = lambda x, w: np_rms_norm(x, w + cfg.norm_offset, cfg.norm_eps)  # Gemma stores gain - 1
    bias = lambda name: lp[name] if cfg.qkv_bias else 0.0  # Qwen2's q/k/v biases
    causal = np.tril(np.ones((T, T), bool))
    if cfg.sliding_window:
        causal &= ~np.tril(np.ones((T, T), bool), -cfg.sliding_window)
    alibi = cfg.position_encoding == "alibi"
    slopes = np_alibi_slopes(H) if alibi else None
    inv_freq = np_inv_freq(cfg)
    low_rank = {} if adapters is None else adapters["layers"]
    for l in range(cfg.n_layers):
        lp = {k: v[l] for k, v in p["layers"].items()}

        def mm(h, name):
            out = h @ lp[name]
            if name in low_rank:
                a, b = (np.asarray(low_rank[name][k][l], np.float64) for k in ("lora_a", "lora_b"))
                out = out + scale * ((h @ a) @ b)
            return out

        h = norm(x, lp["attn_norm"])
        q = (mm(h, "wq") + bias("bq")).reshape(T, H, E)
        k = (mm(h, "wk") + bias("bk")).reshape(T, K, E)
        v = (mm(h, "wv") + bias("bv")).reshape(T, K, E)
        heads = []
        for head in range(H):
            kv = head // (H // K)  # query heads share kv heads in consecutive groups
            qh = q[:, head] if alibi else np_rope(q[:, head], pos, cfg.rope_theta, inv_freq)
            kh = kv_round(k[:, kv] if alibi else np_rope(k[:, kv], pos, cfg.rope_theta, inv_freq))
            s = qh @ kh.T / np.sqrt(E)
            if alibi:
                s = s - slopes[head] * (pos[:, None] - pos[None, :])
            s = np.where(causal, s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ kv_round(v[:, kv]))
        x = x + mm(np.concatenate(heads, axis=-1), "wo")
        h = norm(x, lp["mlp_norm"])
        x = x + mm(np_activation(cfg.activation, mm(h, "w_gate")) * mm(h, "w_up"), "w_down")
    x = norm(x, p["final_norm"])
    return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])


def np_greedy(params, cfg, prompt, steps, eos=()):
    """Greedy continuation by re-running the full forward each step (no cache)."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(np_forward(params, cfg, ids)[-1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt in eos:
            break
    return out
