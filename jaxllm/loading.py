"""Loading a model to generate with: the one path sample.py and the server share.

    load_model(path, quantize=..., attention_impl=..., compute_dtype=...)
        -> (params laid out for decoding, config, tokenizer, the checkpoint's generation defaults)
"""

from __future__ import annotations

from pathlib import Path

from jaxllm.errors import CheckpointError

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "default"
QUANTIZE = ("int8", "int4")


def load_model(path: str | Path | None = None, *, quantize: str | None = None, group_size: int = 64,
               attention_impl: str | None = None, compute_dtype: str | None = None, flag: str = "checkpoint"):
    """A jaxllm checkpoint or a Hugging Face directory (None: the bundled model), quantized after
    loading when asked (`quantize`: int8 or int4 with `group_size`), with the attention backend
    and compute dtype asked for. Raises CheckpointError naming `flag` for what cannot load."""
    from jaxllm import devices
    from jaxllm.checkpoint import load_any

    path = Path(path) if path else DEFAULT_CHECKPOINT
    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise CheckpointError(f"no --{flag} given and the bundled model is missing ({path})")
    params, cfg, tokenizer, defaults = load_any(path)
    if quantize:
        params = quantized(params, quantize, group_size, path, flag)
    if compute_dtype:
        cfg = cfg.replace(compute_dtype=compute_dtype)
    params = devices.prepare(params, cfg)  # once, not per call (and the stacked copy is freed)
    if attention_impl:
        cfg = cfg.replace(attention_impl=attention_impl)
    return params, cfg, tokenizer, defaults


def quantized(params, bits_name: str, group_size: int, path: Path, flag: str = "checkpoint"):
    """Float params -> weight-only quantized; a checkpoint saved quantized must already match."""
    import jax

    from jaxllm.quantize import quantization_of, quantize_params

    if bits_name not in QUANTIZE:
        raise CheckpointError(f"quantize must be one of {', '.join(QUANTIZE)}, got {bits_name!r}")
    bits = {"int8": 8, "int4": 4}[bits_name]
    stored = quantization_of(params)
    if stored is not None and (stored["bits"], stored["group_size"]) != (bits, group_size if bits == 4 else 0):
        raise CheckpointError(f"argument --quantize: {path} is already quantized as {stored}")
    return jax.jit(quantize_params, static_argnums=(1, 2))(params, bits, group_size)  # one program, not one per op
