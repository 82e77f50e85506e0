"""The model equals transformers' LlamaForCausalLM on the same weights (skipped without torch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import forward, init_params
from conftest import reference_stack, tiny_config

torch, transformers = reference_stack(allow_module_level=True)


def to_hf(params, cfg):
    """jaxllm params -> a LlamaForCausalLM with the same weights (HF stores [out, in])."""
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    sd = {"model.embed_tokens.weight": t(params["embed"]), "model.norm.weight": t(params["final_norm"])}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i in range(cfg.n_layers):
        lp = {k: np.asarray(v[i]) for k, v in params["layers"].items()}
        for ours, theirs in names.items():
            sd[f"model.layers.{i}.{theirs}.weight"] = t(lp[ours].T)
        sd[f"model.layers.{i}.input_layernorm.weight"] = t(lp["attn_norm"])
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = t(lp["mlp_norm"])
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = t(np.asarray(params["lm_head"]).T)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    return model


@pytest.mark.parametrize("n_kv_heads,tied", [(4, False), (2, True)])
def test_logits_equal_transformers_llama(n_kv_heads, tied):
    cfg = tiny_config(120, n_kv_heads=n_kv_heads, tie_embeddings=tied)
    params = init_params(cfg, jax.random.key(5))
    params = jax.tree_util.tree_map(lambda x: x * 5 if x.ndim > 1 else x, params)
    model = to_hf(params, cfg)
    ids = np.random.default_rng(0).integers(0, 120, size=(2, 13))
    ours = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(13), (2, 13)))[0])
    with torch.inference_mode():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
