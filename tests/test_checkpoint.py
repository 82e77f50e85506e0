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
