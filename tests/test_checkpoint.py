"""Checkpoints: exact round trip, and one clear error for every way a directory can be wrong."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxllm import CheckpointError, load_checkpoint, save_checkpoint
from jaxllm.checkpoint import flatten


def test_round_trip_is_exact(cfg, params, tokenizer, tmp_path):
    save_checkpoint(tmp_path / "ckpt", params, cfg, tokenizer)
    loaded, loaded_cfg, loaded_tok = load_checkpoint(tmp_path / "ckpt", expect_config=cfg)
    assert loaded_cfg == cfg
    assert loaded_tok.fingerprint == tokenizer.fingerprint
    want, got = flatten(params), flatten(loaded)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
    assert not list((tmp_path / "ckpt").glob(".*.tmp"))  # no temporary files left behind


def test_bfloat16_params_round_trip(cfg, params, tmp_path):
    cfg16 = cfg.replace(param_dtype="bfloat16")
    p16 = jax.tree_util.tree_map(lambda x: x.astype("bfloat16"), params)
    save_checkpoint(tmp_path, p16, cfg16)
    loaded, _, tok = load_checkpoint(tmp_path)
    assert tok is None
    assert loaded["layers"]["wq"].dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(np.asarray(loaded["embed"]), np.asarray(p16["embed"]))


def test_refuses_a_checkpoint_made_for_another_config(cfg, params, tmp_path):
    save_checkpoint(tmp_path, params, cfg)
    with pytest.raises(CheckpointError, match=r"different config: d_model=32 \(expected 64\)"):
        load_checkpoint(tmp_path, expect_config=cfg.replace(d_model=64))


def test_config_that_disagrees_with_the_arrays(cfg, params, tmp_path):
    save_checkpoint(tmp_path, params, cfg)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["d_ff"] = 96
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"w_down has shape \(2, 64, 32\), the config implies \(2, 96, 32\)"):
        load_checkpoint(tmp_path)


def set_model_field(directory, name, value):
    meta = json.loads((directory / "config.json").read_text())
    meta["model"][name] = value
    (directory / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: None, "directory not found"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "corrupt"),
        (lambda d: (d / "config.json").write_text('{"format": "jaxllm", "model": {"d_model": 8}}'), "missing field"),
        (lambda d: (d / "params.safetensors").write_bytes(b"\x00" * 50), "params.safetensors is corrupt"),
        (lambda d: (d / "params.safetensors").unlink(), "params.safetensors is missing"),
        (lambda d: (d / "tokenizer.model").write_bytes(b"garbage"), "tokenizer.model"),
        # found by fuzzing: fields of the wrong type loaded, then failed inside jit or a shape computation
        (lambda d: set_model_field(d, "rope_high_freq_factor", []), "rope_high_freq_factor must be a finite number"),
        (lambda d: set_model_field(d, "norm_eps", float("nan")), "norm_eps must be a finite number"),
        (lambda d: set_model_field(d, "head_dim", -2), "head_dim must be an integer >= 1"),
        (lambda d: set_model_field(d, "tie_embeddings", "no"), "tie_embeddings must be true or false"),
        (lambda d: set_model_field(d, "new\nfield", 1), r"unknown model config field\(s\): 'new\\nfield'"),
        (lambda d: (d / "config.json").write_text('{"format": "jaxllm", "version": 1, "model": [null]}'),
         "model config must be a JSON object, got list"),  # found by a long fuzz run (AttributeError)
    ],
)
def test_broken_directories_fail_with_one_clear_line(cfg, params, tokenizer, tmp_path, damage, message):
    d = tmp_path / "ckpt"
    if "not found" not in message:
        save_checkpoint(d, params, cfg, tokenizer)
        damage(d)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(d)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
def test_quantized_round_trip_equals_the_params_in_memory(cfg, params, tokenizer, tmp_path, bits, group_size):
    from jaxllm.quantize import QuantizedWeight, quantize_params

    q = quantize_params(params, bits, group_size)
    save_checkpoint(tmp_path, q, cfg, tokenizer)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["quantization"] == {"bits": bits, "group_size": group_size if bits == 4 else 0}
    loaded, loaded_cfg, _ = load_checkpoint(tmp_path, expect_config=cfg)
    assert loaded_cfg == cfg
    is_q = lambda x: isinstance(x, QuantizedWeight)
    want, got = jax.tree_util.tree_leaves(q, is_leaf=is_q), jax.tree_util.tree_leaves(loaded, is_leaf=is_q)
    assert jax.tree_util.tree_structure(q) == jax.tree_util.tree_structure(loaded)  # bits, group, layout included
    for a, b in zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(loaded)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(loaded["layers"]["wq"], QuantizedWeight) and isinstance(loaded["embed"], QuantizedWeight)
    assert len(want) == len(got)


def _edit_config(d, **quantization):
    meta = json.loads((d / "config.json").read_text())
    meta["quantization"] = quantization
    (d / "config.json").write_text(json.dumps(meta))


def set_model_field(directory, name, value):
    meta = json.loads((directory / "config.json").read_text())
    meta["model"][name] = value
    (directory / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: _edit_config(d, bits=4, group_size=32), r"embed.values has shape \(32, 512\), the config implies \(16, 512\)"),
        (lambda d: _edit_config(d, bits=9, group_size=0), "bad quantization record"),
        (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"quantization"', '"q"')),
         "holds quantized weights but .*config.json records no quantization"),
        (lambda d: (d / "params.safetensors").write_bytes((d / "params.safetensors").read_bytes()[:-100]), "corrupt"),
    ],
)
def test_mismatched_or_corrupt_quantized_checkpoint_fails_with_one_clear_line(cfg, params, tmp_path, damage, message):
    from jaxllm.quantize import quantize_params

    save_checkpoint(tmp_path, quantize_params(params, 8), cfg)
    damage(tmp_path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_quantized_values_of_the_wrong_dtype_are_refused(cfg, params, tmp_path):
    from safetensors.numpy import load_file, save_file
    from jaxllm.quantize import quantize_params

    save_checkpoint(tmp_path, quantize_params(params, 8), cfg)
    arrays = load_file(str(tmp_path / "params.safetensors"))
    arrays["layers.wo.values"] = arrays["layers.wo.values"].astype(np.float32)
    save_file(arrays, str(tmp_path / "params.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.wo.values is float32, the config's quantization .* implies int8"):
        load_checkpoint(tmp_path)
