"""Hugging Face checkpoints: load a local model directory, export one back.

    DIR/config.json                          Llama, Mistral, Qwen2 or Gemma (…ForCausalLM)
    DIR/model.safetensors                    or model-0000N-of-0000M.safetensors + model.safetensors.index.json
    DIR/tokenizer.model                      SentencePiece, or (when there is no tokenizer.model) byte-level
    DIR/tokenizer.json (+ tokenizer_config.json)  BPE as Llama 3 / Qwen2 ship it (optional)
    DIR/generation_config.json               default sampling values (optional)

Read with numpy through safetensors: no torch, no network, nothing unpickled. HF stores
linear weights as [out, in]; jaxllm stores [in, out] and stacks layers on axis 0. HF's q/k
weights are already in the "rotate half" layout that jaxllm's RoPE uses, so no permutation
is needed. Qwen2 and Gemma become options of jaxllm's one decoder (config.py): Qwen2's q/k/v
biases are the layers' bq/bk/bv; Gemma's norm weights are kept as stored (gain - 1) and read
with norm_offset 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors.numpy import save_file

from jaxllm.checkpoint import load_directory_tokenizer, read_safetensors
from jaxllm.config import ModelConfig
from jaxllm.devices import as_stored
from jaxllm.errors import CheckpointError, ConfigError
from jaxllm.tokenizer import TokenizerBase

# model_type -> the architecture; Qwen2 and Gemma map onto options of jaxllm's one decoder
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "gemma": "GemmaForCausalLM"}
SUPPORTED = tuple(FAMILIES.values())
# HF's hidden_act names -> ModelConfig.activation. Gemma reads a plain "gelu" as the tanh form, as
# transformers does for Gemma's legacy configs.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
# jaxllm layer weight -> HF module, for weights HF stores as [out, in]
LAYER_WEIGHTS = {
    "wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}
LAYER_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
QKV_BIASES = {"bq": "wq", "bk": "wk", "bv": "wv"}  # cfg.qkv_bias: jaxllm bias -> the weight whose module holds it
# generation_config.json keys that become generate() defaults (same names in jaxllm)
GENERATION_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens")
INTEGER_KEYS = ("top_k", "no_repeat_ngram_size", "max_new_tokens", "eos_token_id")


def is_hf_directory(directory: str | os.PathLike) -> bool:
    """A directory whose config.json names a model_type/architectures (not a jaxllm checkpoint)."""
    try:
        meta = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") != "jaxllm" and ("architectures" in meta or "model_type" in meta)


# config.json fields read below -> their JSON type ("number" admits integers; neither admits booleans)
FIELD_TYPES = {
    "architectures": list, "model_type": str, "hidden_act": str, "vocab_size": int, "hidden_size": int,
    "num_hidden_layers": int, "num_attention_heads": int, "num_key_value_heads": int, "intermediate_size": int,
    "max_position_embeddings": int, "sliding_window": int, "use_sliding_window": bool, "head_dim": int,
    "rope_theta": "number", "rms_norm_eps": "number", "tie_word_embeddings": bool, "rope_parameters": dict,
    "rope_scaling": dict, "hidden_activation": str, "attention_bias": bool, "mlp_bias": bool, "layer_types": list,
    "max_window_layers": int, "use_bidirectional_attention": bool,
}
ROPE_FIELD_TYPES = {"rope_type": str, "type": str, "rope_theta": "number", "factor": "number", "low_freq_factor": "number",
                    "high_freq_factor": "number", "original_max_position_embeddings": int}


def _typed(values: dict, types: dict, where: str) -> dict:
    """`values` without nulls (HF writes null for "the default"), each field checked against `types`."""
    values = {k: v for k, v in values.items() if v is not None}
    for key, kind in types.items():
        if key not in values:
            continue
        v = values[key]
        if kind in (int, "number"):
            ok = not isinstance(v, bool) and isinstance(v, int if kind is int else (int, float))
        else:
            ok = isinstance(v, kind)
        if not ok:
            name = {int: "an integer", "number": "a number", str: "a string", bool: "true or false", list: "a list", dict: "an object"}[kind]
            raise CheckpointError(f"{where}: {key} must be {name}, got {v!r}")
    return values


def config_from_hf(meta: dict, where: str = "config.json") -> ModelConfig:
    """HF config.json (transformers 4 or 5 layout) -> ModelConfig; unsupported features are refused by name."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    meta = _typed(meta, FIELD_TYPES, where)
    family = _family(meta, where)
    act_key = "hidden_activation" if family == "gemma" and "hidden_activation" in meta else "hidden_act"
    act = meta.get(act_key, "gelu_pytorch_tanh" if family == "gemma" else "silu")
    activation = "gelu_tanh" if family == "gemma" and act == "gelu" else ACTIVATIONS.get(act)
    if activation is None:
        raise CheckpointError(f"{where}: {act_key} {act!r} is not supported ({', '.join(ACTIVATIONS)})")
    if meta.get("attention_bias") or meta.get("mlp_bias"):  # Qwen2's q/k/v biases are its layout, not this flag
        raise CheckpointError(f"{where}: attention_bias / mlp_bias are not supported")
    if meta.get("use_bidirectional_attention"):
        raise CheckpointError(f"{where}: use_bidirectional_attention is not supported (jaxllm's attention is causal)")
    rope = _typed(meta.get("rope_parameters") or meta.get("rope_scaling") or {}, ROPE_FIELD_TYPES, where)
    theta = rope.get("rope_theta", meta.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = {"default": "none", "linear": "linear", "llama3": "llama3"}.get(kind)
    if scaling is None:
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3)")
    max_len = meta.get("max_position_embeddings", 2048)
    window = _sliding_window(meta, family, where)
    if window >= max_len:  # a window as long as the context is none
        window = 0
    heads, head_dim = meta.get("num_attention_heads"), meta.get("head_dim")
    if heads and head_dim == meta.get("hidden_size", 0) // heads:
        head_dim = None  # the default, d_model // n_heads
    try:
        return ModelConfig(
            vocab_size=meta["vocab_size"],
            d_model=meta["hidden_size"],
            n_layers=meta["num_hidden_layers"],
            n_heads=meta["num_attention_heads"],
            n_kv_heads=meta.get("num_key_value_heads") or meta["num_attention_heads"],
            d_ff=meta["intermediate_size"],
            max_seq_len=max_len,
            sliding_window=int(window),
            head_dim=head_dim,
            rope_theta=float(theta),
            rope_scaling=scaling,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_len=int(rope.get("original_max_position_embeddings", 0) or 0),
            norm_eps=float(meta.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(meta.get("tie_word_embeddings", family == "gemma")),
            activation=activation,
            qkv_bias=family == "qwen2",
            embed_scale=family == "gemma",
            norm_offset=1.0 if family == "gemma" else 0.0,
        )
    except KeyError as e:
        raise CheckpointError(f"{where} lacks {e.args[0]!r}") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None


def _family(meta: dict, where: str) -> str:
    """The model family (a FAMILIES key) config.json names, by model_type or by architecture."""
    if meta.get("model_type") in FAMILIES:
        return meta["model_type"]
    arch = meta.get("architectures") or [meta.get("model_type", "?")]
    for family, name in FAMILIES.items():
        if name in arch:
            return family
    raise CheckpointError(f"{where}: unsupported architecture {arch}; jaxllm loads {', '.join(SUPPORTED)}")


def _sliding_window(meta: dict, family: str, where: str) -> int:
    """The window every layer uses (0: none). A model whose layers differ (some sliding, some
    full) is refused: jaxllm's layers share one attention pattern."""
    window = meta.get("sliding_window") or 0
    n = meta.get("num_hidden_layers", 0)
    if "layer_types" in meta:  # transformers 5 writes the per-layer pattern out
        kinds = set(meta["layer_types"])
    elif family == "qwen2":  # Qwen2 slides only when asked, and only from layer max_window_layers on
        on = meta.get("use_sliding_window", False) and window
        first = meta.get("max_window_layers", 28)
        kinds = {"full_attention"} if not on or first >= n else {"sliding_attention"} | ({"full_attention"} if first > 0 else set())
    else:
        kinds = {"full_attention"} if meta.get("use_sliding_window") is False or not window else {"sliding_attention"}
    if kinds - {"full_attention", "sliding_attention"}:
        raise CheckpointError(f"{where}: layer_types {sorted(kinds)} are not supported (full_attention, sliding_attention)")
    if len(kinds) > 1:
        raise CheckpointError(f"{where}: some layers use a sliding window and some do not; jaxllm's layers share one")
    return window if kinds == {"sliding_attention"} else 0


def _read_tensors(directory: Path) -> dict[str, np.ndarray]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is unreadable ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files")
        for name in weight_map.values():  # an absolute path or "../x" would read a file outside the directory
            if not _plain_file_name(name):
                raise CheckpointError(f"{index}: shard {name!r} is not a plain file name inside {directory}")
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory} has no model.safetensors (nor an index of shards); .bin files are not read")
    tensors: dict[str, np.ndarray] = {}
    found_in: dict[str, str] = {}
    for name in files:
        shard = read_safetensors(directory / name)
        for key in shard:
            if key in found_in:
                raise CheckpointError(f"{directory}: tensor {key!r} is in two shards, {found_in[key]} and {name}")
            found_in[key] = name
        tensors.update(shard)
    return tensors


def _plain_file_name(name) -> bool:
    """A file name with no directory part (on any OS): what an index of shards may name."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        and "\0" not in name and not os.path.isabs(name) and ":" not in name
    )


def load_hf(directory: str | os.PathLike, dtype: str | None = None) -> tuple[dict, ModelConfig, TokenizerBase | None, dict]:
    """-> (params, cfg, tokenizer or None, generation defaults) from a local HF model directory.

    `dtype` sets cfg.param_dtype (default: the checkpoint's, float32 for float16 ones).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    try:
        meta = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory / 'config.json'} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'} is unreadable ({e})") from None
    cfg = config_from_hf(meta, str(directory / "config.json"))
    tensors = _read_tensors(directory)
    if not tensors:
        raise CheckpointError(f"{directory}: its safetensors files hold no tensors")
    stored = next(iter(tensors.values())).dtype
    dtype = dtype or ("bfloat16" if stored == np.dtype("bfloat16") else "float32")
    cfg = cfg.replace(param_dtype=dtype)

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{directory}: weight {name} is missing")
        w = tensors.pop(name)
        if w.shape != shape:
            raise CheckpointError(f"{directory}: {name} has shape {w.shape}, config.json implies {shape}")
        return w

    D, F, V, L = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    HE, KE = cfg.n_heads * cfg.dim_per_head, cfg.n_kv_heads * cfg.dim_per_head
    out_in = {"wq": (HE, D), "wk": (KE, D), "wv": (KE, D), "wo": (D, HE), "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F)}
    cast = lambda a: jnp.asarray(np.asarray(a).astype(np.float32) if dtype == "float32" else a, dtype=dtype)
    layers = {}
    for ours, theirs in LAYER_WEIGHTS.items():
        layers[ours] = cast(np.stack([take(f"model.layers.{i}.{theirs}.weight", out_in[ours]).T for i in range(L)]))
    for ours, theirs in LAYER_NORMS.items():
        layers[ours] = cast(np.stack([take(f"model.layers.{i}.{theirs}.weight", (D,)) for i in range(L)]))
    if cfg.qkv_bias:
        for bias, weight in QKV_BIASES.items():
            name, size = LAYER_WEIGHTS[weight], out_in[weight][0]
            layers[bias] = cast(np.stack([take(f"model.layers.{i}.{name}.bias", (size,)) for i in range(L)]))
    params = {"embed": cast(take("model.embed_tokens.weight", (V, D))), "layers": layers,
              "final_norm": cast(take("model.norm.weight", (D,)))}
    if not cfg.tie_embeddings:
        params["lm_head"] = cast(take("lm_head.weight", (V, D)).T)
    tensors.pop("lm_head.weight", None)  # tied models may still store a copy
    extra = sorted(k for k in tensors if "rotary_emb" not in k)
    if extra:
        raise CheckpointError(f"{directory}: unexpected weights {extra[:3]}{' ...' if len(extra) > 3 else ''}")

    tokenizer = load_directory_tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:  # its last ids would have no embedding row
        raise CheckpointError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is {cfg.vocab_size}")
    return params, cfg, tokenizer, generation_defaults(directory)


def generation_defaults(directory: str | os.PathLike) -> dict:
    """generation_config.json -> {name: value} for the sampling controls jaxllm shares with HF.

    `do_sample: false` becomes temperature 0 (greedy); `eos_token_id` is kept as a list.
    """
    path = Path(directory) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    out = {k: meta[k] for k in GENERATION_KEYS if meta.get(k) is not None}
    if meta.get("eos_token_id") is not None:
        eos = meta["eos_token_id"]
        out["eos_token_id"] = list(eos) if isinstance(eos, list) else [eos]
    for key, value in out.items():  # a value of the wrong type would fail deep inside generation
        for v in value if key == "eos_token_id" else [value]:
            if isinstance(v, bool) or not isinstance(v, int if key in INTEGER_KEYS else (int, float)):
                raise CheckpointError(f"{path}: {key} must be {'an integer' if key in INTEGER_KEYS else 'a number'}, got {value!r}")
    if meta.get("do_sample") is False:
        out["temperature"] = 0.0
    elif meta.get("do_sample") is not True:
        out.pop("temperature", None)  # HF ignores sampling values unless do_sample is set
        for k in ("top_k", "top_p", "min_p"):
            out.pop(k, None)
    return out


def _hf_config(cfg: ModelConfig) -> dict:
    """config.json for the transformers architecture that has cfg's options (CheckpointError
    naming what has none)."""
    if cfg.position_encoding != "rope":
        raise CheckpointError(f"position_encoding {cfg.position_encoding!r} has no transformers equivalent; export is refused")
    if cfg.rope_scaling == "ntk":
        raise CheckpointError("rope_scaling 'ntk' has no transformers equivalent; export is refused")
    gemma = (cfg.norm_offset, cfg.embed_scale) == (1.0, True)
    if not gemma and (cfg.norm_offset, cfg.embed_scale) != (0.0, False):
        raise CheckpointError(f"norm_offset={cfg.norm_offset} with embed_scale={cfg.embed_scale} matches no transformers "
                              "architecture (Gemma has 1.0 and true, the others 0.0 and false); export is refused")
    if gemma and (cfg.qkv_bias or cfg.sliding_window or cfg.activation != "gelu_tanh"):
        raise CheckpointError("a Gemma-style model (norm_offset 1, embed_scale) exports only with activation gelu_tanh, "
                              "no qkv_bias and no sliding_window; export is refused")
    family = "gemma" if gemma else "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    rope = {"rope_theta": cfg.rope_theta, "rope_type": {"none": "default"}.get(cfg.rope_scaling, cfg.rope_scaling)}
    if cfg.rope_scaling in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len or cfg.max_seq_len)
    act = {v: k for k, v in ACTIVATIONS.items() if k in ("silu", "gelu", "gelu_pytorch_tanh")}[cfg.activation]
    meta = {
        "architectures": [FAMILIES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.dim_per_head,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": act,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype, "rope_theta": cfg.rope_theta,
        # transformers 5 reads rope_parameters, 4.x reads rope_scaling (None when unscaled)
        "rope_parameters": rope, "rope_scaling": rope if cfg.rope_scaling != "none" else None,
    }
    if family in ("llama", "gemma"):
        meta.update(attention_bias=False)
    if family == "llama":
        meta.update(mlp_bias=False)
    if family == "mistral":
        meta.update(sliding_window=cfg.sliding_window)
    if family == "qwen2":  # every layer slides, or none does
        meta.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                    max_window_layers=0 if cfg.sliding_window else cfg.n_layers)
    return meta


def export_hf(directory: str | os.PathLike, params: dict, cfg: ModelConfig, tokenizer: TokenizerBase | None = None) -> Path:
    """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads: Llama
    (Mistral with a sliding window), Qwen2 (q/k/v biases) or Gemma (GeGLU, scaled embeddings,
    (1 + w) norms), whichever architecture has cfg's options. A config no transformers
    architecture matches is refused before anything is written."""
    meta = _hf_config(cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = as_stored(params)  # prepared params are exported as their originals
    host = lambda a: np.ascontiguousarray(np.asarray(a))
    tensors = {"model.embed_tokens.weight": host(params["embed"]), "model.norm.weight": host(params["final_norm"])}
    layers = params["layers"]
    for i in range(cfg.n_layers):
        for ours, theirs in LAYER_WEIGHTS.items():
            tensors[f"model.layers.{i}.{theirs}.weight"] = host(np.asarray(layers[ours][i]).T)
        for ours, theirs in LAYER_NORMS.items():
            tensors[f"model.layers.{i}.{theirs}.weight"] = host(layers[ours][i])
        if cfg.qkv_bias:
            for bias, weight in QKV_BIASES.items():
                tensors[f"model.layers.{i}.{LAYER_WEIGHTS[weight]}.bias"] = host(layers[bias][i])
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = host(np.asarray(params["lm_head"]).T)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    generation = {}
    if tokenizer is not None:
        tokenizer.save_to_directory(directory)  # tokenizer.model, or tokenizer.json + tokenizer_config.json
        meta.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return directory

