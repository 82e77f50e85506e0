"""Plain numpy references: the oracle the JAX code is checked against.

Written independently of jaxllm's code: loops over layers and heads, float64.
"""

from __future__ import annotations

import numpy as np


def np_rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    """x: [T, E] for one head, pos: [T]. Pairs (i, i + E/2) rotate by pos * theta^(-2i/E)."""
    E = x.shape[-1]
    out = np.empty_like(x)
    for i in range(E // 2):
        angle = pos * theta ** (-2.0 * i / E)
        a, b = x[:, i], x[:, i + E // 2]
        out[:, i] = a * np.cos(angle) - b * np.sin(angle)
        out[:, i + E // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out


def np_forward(params, cfg, tokens):
    """Logits [T, V] of one unpadded sequence `tokens: [T]` at positions 0..T-1."""
    p = {k: (np.asarray(v, np.float64) if not isinstance(v, dict) else {kk: np.asarray(vv, np.float64) for kk, vv in v.items()}) for k, v in params.items()}
    T, E = len(tokens), cfg.dim_per_head
    H, K = cfg.n_heads, cfg.n_kv_heads
    pos = np.arange(T, dtype=np.float64)
    x = p["embed"][np.asarray(tokens)]
    causal = np.tril(np.ones((T, T), bool))
    for l in range(cfg.n_layers):
        lp = {k: v[l] for k, v in p["layers"].items()}
        h = np_rms_norm(x, lp["attn_norm"], cfg.norm_eps)
        q = (h @ lp["wq"]).reshape(T, H, E)
        k = (h @ lp["wk"]).reshape(T, K, E)
        v = (h @ lp["wv"]).reshape(T, K, E)
        heads = []
        for head in range(H):
            kv = head // (H // K)  # query heads share kv heads in consecutive groups
            qh = np_rope(q[:, head], pos, cfg.rope_theta)
            kh = np_rope(k[:, kv], pos, cfg.rope_theta)
            s = np.where(causal, qh @ kh.T / np.sqrt(E), -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, axis=-1) @ lp["wo"]
        h = np_rms_norm(x, lp["mlp_norm"], cfg.norm_eps)
        g = h @ lp["w_gate"]
        x = x + (g / (1 + np.exp(-g)) * (h @ lp["w_up"])) @ lp["w_down"]
    x = np_rms_norm(x, p["final_norm"], cfg.norm_eps)
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
