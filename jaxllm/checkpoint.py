"""Model directories: params + config + tokenizer, in formats that never execute code.

    DIR/config.json          {"format": "jaxllm", "version": 1, "model": {...ModelConfig...}}
                             (+ "quantization": {"bits": 8 | 4, "group_size": G} for quantized params)
    DIR/params.safetensors   the params pytree, keys joined with "." ("layers.wq"); a quantized
                             weight is two tensors, "layers.wq.values" (int8 / packed uint8) and
                             "layers.wq.scales" (float32), laid out as in quantize.py
    DIR/tokenizer.model      the SentencePiece model; or, for a Hugging Face byte-level tokenizer,
    DIR/tokenizer.json       its two files (jaxllm.tokenizer_json); saving one kind removes the other
    DIR/tokenizer_config.json

Loading checks every array against the shapes the config implies, so a directory whose
parts disagree (or a config that is not the one expected) fails with one clear line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors)
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from jaxllm import devices
from jaxllm.config import ModelConfig
from jaxllm.errors import CheckpointError, ConfigError, TokenizerError
from jaxllm.model import param_shapes
from jaxllm.quantize import QuantizedWeight, check_options, quantization_of, quantize_params
from jaxllm.tokenizer import TokenizerBase, load_tokenizer

FORMAT, VERSION = "jaxllm", 1
CONFIG_FILE, PARAMS_FILE = "config.json", "params.safetensors"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dicts -> {"a.b": leaf}; a QuantizedWeight at "a.b" -> "a.b.values" and "a.b.scales"."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, QuantizedWeight):
            flat[name + ".values"], flat[name + ".scales"] = value.values, value.scales
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's arrays (numpy); CheckpointError naming the file if it is missing or corrupt."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None


def _write_atomic(path: Path, write) -> None:
    """Writes to a temporary name and renames, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(directory: str | os.PathLike, params: dict, cfg: ModelConfig, tokenizer: TokenizerBase | None = None) -> Path:
    """Saves params (pulled to host), the config and the tokenizer's files into `directory`.

    Prepared params (devices.prepare) are stored as their originals would be (devices.as_stored)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v) for k, v in flatten(jax.device_get(devices.as_stored(params))).items()}
    _write_atomic(directory / PARAMS_FILE, lambda p: save_file(arrays, str(p), metadata={"format": FORMAT}))
    if tokenizer is not None:
        tokenizer.save_to_directory(directory)  # also drops another backend's files left there
    meta = {"format": FORMAT, "version": VERSION, "model": cfg.to_dict()}
    quantization = quantization_of(params)
    if quantization is not None:
        meta["quantization"] = quantization
    _write_atomic(directory / CONFIG_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return directory


def load_config(directory: str | os.PathLike) -> ModelConfig:
    return _load_meta(directory)[0]


def _load_meta(directory: str | os.PathLike) -> tuple[ModelConfig, dict | None]:
    """-> (config, quantization or None) from config.json."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a jaxllm checkpoint directory") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path} is not a jaxllm checkpoint config")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    quantization = meta.get("quantization")
    if quantization is not None:
        try:
            check_options(quantization["bits"], quantization["group_size"] or 64)
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: bad quantization record {quantization!r} ({e})") from None
    return cfg, quantization


def expected_shapes(cfg: ModelConfig, quantization: dict | None = None) -> dict:
    """{"layers.wq": ShapeDtypeStruct, ...} that a checkpoint for `cfg` (quantized as recorded) holds."""
    shapes = param_shapes(cfg)
    if quantization is not None:
        bits, group = quantization["bits"], quantization["group_size"] or 64
        shapes = jax.eval_shape(lambda p: quantize_params(p, bits, group), shapes)
    return flatten(shapes)


# int4 files written before quantize padded input rows to a multiple of the group size held
# some weights in another group size; their shapes differ from what the config implies now.
_OLD_INT4 = " (an int4 checkpoint from before groups were padded to the group size? quantize the float model again)"


def load_checkpoint(
    directory: str | os.PathLike, expect_config: ModelConfig | None = None
) -> tuple[dict, ModelConfig, TokenizerBase | None]:
    """-> (params, cfg, tokenizer or None). Every array is checked against the config's shapes.

    With `expect_config`, a checkpoint saved with any other config is refused, naming the fields.
    """
    directory = Path(directory)
    cfg, quantization = _load_meta(directory)
    if expect_config is not None and expect_config != cfg:
        diffs = [
            f"{k}={v!r} (expected {expect_config.to_dict()[k]!r})"
            for k, v in cfg.to_dict().items()
            if expect_config.to_dict()[k] != v
        ]
        raise CheckpointError(f"checkpoint {directory} was made for a different config: {', '.join(diffs)}")

    flat = read_safetensors(directory / PARAMS_FILE)

    expected = expected_shapes(cfg, quantization)
    missing, unexpected = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    stored_q = any(k.endswith(".values") for k in flat)
    if (missing or unexpected) and stored_q != (quantization is not None):
        raise CheckpointError(
            f"{directory / PARAMS_FILE} holds {'quantized' if stored_q else 'float'} weights but "
            f"{directory / CONFIG_FILE} records {f'quantization {quantization}' if quantization else 'no quantization'}"
        )
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / PARAMS_FILE} does not match its config: missing {missing or 'nothing'}, "
            f"unexpected {unexpected or 'nothing'}"
        )
    for name, spec in expected.items():
        if tuple(flat[name].shape) != tuple(spec.shape):
            old_int4 = quantization and quantization["bits"] == 4 and flat[name].dtype == spec.dtype and name.endswith((".values", ".scales"))
            raise CheckpointError(
                f"{directory / PARAMS_FILE}: {name} has shape {tuple(flat[name].shape)}, "
                f"the config implies {tuple(spec.shape)}{_OLD_INT4 if old_int4 else ''}"
            )
        if quantization is not None and name.endswith((".values", ".scales")) and flat[name].dtype != spec.dtype:
            raise CheckpointError(
                f"{directory / PARAMS_FILE}: {name} is {flat[name].dtype}, the config's quantization "
                f"{quantization} implies {np.dtype(spec.dtype)}"
            )
    if quantization is None:
        params = unflatten({k: jax.numpy.asarray(v, dtype=cfg.param_dtype) for k, v in flat.items()})
    else:
        params = _quantized_tree(flat, cfg, quantization)

    tokenizer = load_directory_tokenizer(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is only {cfg.vocab_size}"
        )
    return params, cfg, tokenizer


def load_directory_tokenizer(directory: str | os.PathLike) -> TokenizerBase | None:
    """A model directory's tokenizer: its tokenizer.model, else its tokenizer.json, else None.
    A file that is there but cannot be read is a CheckpointError naming it."""
    directory = Path(directory)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (directory / name).exists():
            try:
                return load_tokenizer(directory / name)
            except TokenizerError as e:
                raise CheckpointError(f"{directory / name}: {e}") from None
    return None


def _quantized_tree(flat: dict, cfg: ModelConfig, quantization: dict) -> dict:
    """Checked arrays -> params with a QuantizedWeight wherever "name.values"/"name.scales" are."""
    bits, group = quantization["bits"], quantization["group_size"] or 64
    specs = jax.eval_shape(lambda p: quantize_params(p, bits, group), param_shapes(cfg))

    def build(spec, node):
        if isinstance(spec, dict):
            return {k: build(v, node[k]) for k, v in spec.items()}
        if isinstance(spec, QuantizedWeight):
            return dataclasses.replace(spec, values=jax.numpy.asarray(node["values"]), scales=jax.numpy.asarray(node["scales"]))
        return jax.numpy.asarray(node, dtype=cfg.param_dtype)

    return build(specs, unflatten(flat))


def load_any(directory: str | os.PathLike) -> tuple[dict, ModelConfig, TokenizerBase | None, dict]:
    """A jaxllm checkpoint or a Hugging Face directory (Llama, Mistral, Qwen2, Gemma) -> (params, cfg, tokenizer, defaults).

    `defaults` holds generation_config.json's sampling values for HF directories, else {}.
    """
    from jaxllm import hf

    if hf.is_hf_directory(directory):
        return hf.load_hf(directory)
    return (*load_checkpoint(directory), {})
