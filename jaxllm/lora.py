"""Low-rank adapters (LoRA) on a frozen model, as pure functions over two pytrees.

Legend: L layers, I a weight's input width, O its output width, R the rank.

    base     = the params tree (model.py), never changed by training
    adapters = {"layers": {"wq": {"lora_a": [L, I, R], "lora_b": [L, R, O]}, ...}}   one pair per target

    merge(base, adapters, scale):  W' = W + scale * A @ B    for every target W [L, I, O]

A starts uniform in ±1/sqrt(I) and B at zero, so training starts from the base model exactly.
Only the adapters get gradients and optimizer state; everything else in `base` (norms,
embeddings, biases, matrices that are not targets) passes through `merge` untouched. `scale`
is alpha / R (TrainConfig.lora_scale).

On disk (what train.py writes besides the merged model directory):

    DIR/adapters.safetensors   the adapters, keys joined with "." ("layers.wq.lora_a")
    DIR/adapters.json          {"format": "jaxllm-lora", "version": 1, "rank", "alpha", "scale",
                                "targets", "init_from", "base_fingerprint", "model": {...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from jaxllm.checkpoint import _write_atomic, flatten, read_safetensors, unflatten
from jaxllm.config import LORA_TARGETS
from jaxllm.errors import CheckpointError, ConfigError

ADAPTERS_FILE, ADAPTERS_CONFIG, FORMAT, VERSION = "adapters.safetensors", "adapters.json", "jaxllm-lora", 1


def init_adapters(params: dict, targets: tuple[str, ...] | list[str], rank: int, key: jax.Array) -> dict:
    """Adapters for `targets` of `params` (arrays or ShapeDtypeStructs): float32 A [L, I, R]
    uniform in ±1/sqrt(I), B [L, R, O] zeros, so that `merge` first gives `params` back."""
    if rank < 1:
        raise ConfigError(f"lora rank must be >= 1, got {rank}")
    layers = params["layers"]
    unknown = [t for t in targets if t not in LORA_TARGETS or t not in layers]
    if unknown:
        raise ConfigError(f"lora targets {', '.join(unknown)} are not layer matrices of this model ({', '.join(LORA_TARGETS)})")
    out = {}
    for name, k in zip(targets, jax.random.split(key, len(targets))):
        L, I, O = layers[name].shape
        bound = 1.0 / np.sqrt(I)
        out[name] = {
            "lora_a": jax.random.uniform(k, (L, I, rank), jnp.float32, -bound, bound),
            "lora_b": jnp.zeros((L, rank, O), jnp.float32),
        }
    return {"layers": out}


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B per layer: [L, I, R], [L, R, O] -> float32 [L, I, O] (full float32 precision)."""
    prod = jnp.einsum("lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return scale * prod


def merge(base: dict, adapters: dict, scale: float) -> dict:
    """base with every adapted layer matrix replaced by W + scale * A @ B (float32); every other
    leaf of `base` is passed through as it is. Pure: jit, grad (with respect to either tree)."""
    layers = dict(base["layers"])
    for name, ab in adapters["layers"].items():
        layers[name] = layers[name].astype(jnp.float32) + delta(ab["lora_a"], ab["lora_b"], scale)
    return {**base, "layers": layers}


def fingerprint(params: dict) -> str:
    """A hash of every leaf's name, dtype, shape and bytes: the same base gives the same string."""
    digest = hashlib.sha256()
    for name, value in sorted(flatten(params).items()):
        arr = np.ascontiguousarray(jax.device_get(value))
        digest.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


def save_adapters(directory: str | os.PathLike, adapters: dict, info: dict) -> Path:
    """Writes DIR/adapters.safetensors (the adapters, pulled to host) and DIR/adapters.json
    (`info`: rank, alpha, scale, targets, init_from, base fingerprint, model config)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flatten(jax.device_get(adapters)).items()}
    _write_atomic(directory / ADAPTERS_FILE, lambda p: save_file(arrays, str(p), metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "version": VERSION, **info}
    _write_atomic(directory / ADAPTERS_CONFIG, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def load_adapters(directory: str | os.PathLike) -> tuple[dict, dict]:
    """-> (adapters as numpy arrays, the adapters.json record) from a directory `save_adapters` wrote."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / ADAPTERS_CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory / ADAPTERS_CONFIG} is missing: {directory} holds no LoRA adapters") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / ADAPTERS_CONFIG} is unreadable or corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory / ADAPTERS_CONFIG} is not a jaxllm LoRA record")
    adapters = unflatten(read_safetensors(directory / ADAPTERS_FILE))
    return adapters, meta
