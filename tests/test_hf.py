"""Hugging Face Llama-family directories: exact round trips without torch, parity with transformers when installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxllm import CheckpointError, forward, generate, init_params
from jaxllm.checkpoint import flatten, load_any
from jaxllm.hf import export_hf, load_hf
from conftest import REPO, reference_stack, tiny_config
from fuzzing import check_cli_outcome, run_cli


def write_hf_dir(path, params, cfg, shards=1, generation=None):
    """The test's own writer of the HF layout (the reference): [out, in] weights, one tensor per layer."""
    path.mkdir(parents=True, exist_ok=True)
    t = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]}
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
    for i in range(cfg.n_layers):
        for ours, theirs in names.items():
            t[f"model.layers.{i}.{theirs}.weight"] = np.asarray(params["layers"][ours][i]).T
        t[f"model.layers.{i}.input_layernorm.weight"] = params["layers"]["attn_norm"][i]
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = params["layers"]["mlp_norm"][i]
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = np.asarray(params["lm_head"]).T
    t = {k: np.ascontiguousarray(np.asarray(v)) for k, v in t.items()}
    keys = sorted(t)
    weight_map = {}
    for s in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: t[k] for k in part}, str(path / name))
        weight_map.update({k: name for k in part})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
    }))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


def assert_same_params(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("tied,shards", [(False, 1), (True, 3)])
def test_synthetic_hf_directory_loads_exactly_and_round_trips(cfg, params, tokenizer, tmp_path, tied, shards):
    cfg = cfg.replace(tie_embeddings=tied, norm_eps=1e-6)
    p = dict(params)
    if tied:
        p.pop("lm_head")
    d = write_hf_dir(tmp_path / "hf", p, cfg, shards=shards)
    tokenizer.save(d / "tokenizer.model")
    loaded, loaded_cfg, tok, defaults = load_hf(d)
    assert loaded_cfg == cfg and tok.fingerprint == tokenizer.fingerprint and defaults == {}
    assert_same_params(loaded, p)
    again, again_cfg, _, _ = load_hf(export_hf(tmp_path / "export", loaded, loaded_cfg, tok))
    assert again_cfg == cfg
    assert_same_params(again, p)


def test_generation_config_supplies_defaults(cfg, params, tmp_path):
    d = write_hf_dir(tmp_path / "hf", params, cfg, generation={"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7]})
    assert load_any(d)[3] == {"temperature": 0.6, "top_p": 0.9, "eos_token_id": [2, 7]}
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "eos_token_id": 2}))
    assert load_any(d)[3] == {"eos_token_id": [2]}  # without do_sample, HF ignores sampling values


def test_clear_errors_for_unsupported_or_broken_directories(cfg, params, tmp_path):
    d = write_hf_dir(tmp_path / "hf", params, cfg)
    meta = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({**meta, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps(meta))
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(d)


@pytest.mark.parametrize(
    "file,change,message",
    [  # cases the fuzz harness (tests/test_fuzz.py) found ending in a traceback
        ("config.json", {"rope_theta": None, "rms_norm_eps": None}, None),  # null is "the default", as HF writes it
        ("config.json", {"rope_theta": "abc"}, "rope_theta must be a number, got 'abc'"),
        ("config.json", {"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
        ("config.json", {"architectures": 7}, "architectures must be a list"),
        ("config.json", {"num_attention_heads": 0}, "n_heads must be a positive integer"),
        ("config.json", {"sliding_window": "4096"}, "sliding_window must be an integer"),
        ("config.json", {"rope_parameters": {"rope_type": "linear", "factor": None}}, None),
        ("config.json", {"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "factor must be a number"),
        ("generation_config.json", None, "must hold a JSON object"),
        ("generation_config.json", {"do_sample": True, "temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ("generation_config.json", {"top_k": 2.5}, "top_k must be an integer"),
        ("generation_config.json", {"eos_token_id": [2, "x"]}, r"eos_token_id must be an integer, got \[2, 'x'\]"),
        ("model.safetensors.index.json", {"weight_map": {}}, "hold no tensors"),
    ],
)
def test_wrong_values_in_hf_files_fail_with_one_line(cfg, params, tmp_path, file, change, message):
    d = write_hf_dir(tmp_path / "hf", params, cfg, shards=2, generation={"eos_token_id": 2})
    if isinstance(change, dict):
        change = {**json.loads((d / file).read_text()), **change}
    (d / file).write_text(json.dumps(change))
    if message is None:
        assert load_hf(d)[1].rope_theta == 10000.0
        return
    with pytest.raises(CheckpointError, match=message) as e:
        load_hf(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["parent", "absolute", "subdirectory"])
def test_an_index_names_only_shard_files_inside_the_directory(cfg, params, tmp_path, where):
    d = write_hf_dir(tmp_path / "hf", params, cfg, shards=2)
    shard = "model-00001-of-00002.safetensors"
    # a real copy of the shard where the index points, so only the name can be refused
    target = {"parent": (tmp_path / shard, f"../{shard}"), "absolute": (tmp_path / shard, str(tmp_path / shard)),
              "subdirectory": (d / "sub" / shard, f"sub/{shard}")}[where]
    target[0].parent.mkdir(exist_ok=True)
    shutil.copy(d / shard, target[0])
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: target[1] if v == shard else v for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_hf(d)


def test_a_tensor_in_two_shards_is_an_error(cfg, params, tmp_path):
    d = write_hf_dir(tmp_path / "hf", params, cfg, shards=2)
    save_file({"model.norm.weight": np.zeros(cfg.d_model, np.float32)}, str(d / "extra.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["extra.bias"] = "extra.safetensors"  # the index lists the file; it repeats a tensor
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is in two shards"):
        load_hf(d)


def test_sample_py_reads_an_hf_directory_and_reports_its_defaults(cfg, params, tokenizer, tmp_path):
    d = write_hf_dir(tmp_path / "hf", params, cfg, generation={"do_sample": False, "eos_token_id": 2})
    tokenizer.save(d / "tokenizer.model")
    env = {**os.environ, "JAXLLM_CACHE_DIR": str(REPO / ".jax_cache")}
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(d), "--prompt", "def f(x):", "--max_new_tokens", "8"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "generation_config.json: temperature=0.0, eos_token_id=[2]" in proc.stderr
    want = generate(params, cfg, ["def f(x):"], tokenizer=tokenizer, max_new_tokens=8, temperature=0.0, eos_token_id=[2]).texts[0]
    assert proc.stdout == "def f(x):" + want + "\n"


# ---------------------------------------------------------------------------- parity with transformers

HF_CASES = [
    dict(num_key_value_heads=4, tie_word_embeddings=False),
    dict(num_key_value_heads=2, tie_word_embeddings=True),
    dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    dict(num_key_value_heads=1, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    torch, tf = reference_stack()
    models = []
    for i, case in enumerate(HF_CASES):
        torch.manual_seed(i)
        config = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3, **case)
        model = tf.LlamaForCausalLM(config).eval()
        path = tmp_path_factory.mktemp(f"hf{i}")
        model.save_pretrained(path)
        models.append((model, path))
    return torch, tf, models


def compare_with_transformers(torch, model, params, cfg, ids: np.ndarray, prompt_len: int, new: int, **gen_kwargs):
    """Logits over `ids` [B, T] and greedy continuations of its first `prompt_len` columns equal
    transformers'. -> our logits [B, T, V]"""
    B, T = ids.shape
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).logits.numpy()
        hf_greedy = model.generate(
            torch.from_numpy(ids[:, :prompt_len]), attention_mask=torch.ones(B, prompt_len, dtype=torch.long),
            max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
        ).numpy()[:, prompt_len:]
    got = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(T), (B, T)))[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    ours = generate(params, cfg, ids[:, :prompt_len].tolist(), max_new_tokens=new, temperature=0.0, eos_token_id=[], **gen_kwargs)
    assert ours.token_ids == hf_greedy.tolist()
    return got


@pytest.mark.parametrize("case", range(len(HF_CASES)))
def test_logits_and_greedy_equal_transformers(hf_models, case):
    torch, tf, models = hf_models
    model, path = models[case]
    params, cfg, _, _ = load_hf(path)
    ids = np.random.default_rng(case).integers(0, 96, size=(3, 40))
    compare_with_transformers(torch, model, params, cfg, ids, 8, 32)


def test_transformers_loads_a_jaxllm_export_with_equal_logits(hf_models, tmp_path):
    torch, tf, _ = hf_models
    cfg = tiny_config(96, n_kv_heads=2, rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=32)
    params = jax.tree_util.tree_map(lambda x: x * 10 if x.ndim > 1 else x, init_params(cfg, jax.random.key(8)))
    model = tf.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "out", params, cfg)).eval()
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 50))
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(50), (2, 50)))[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_export_command_writes_a_loadable_directory(cfg, params, tokenizer, tmp_path):
    from jaxllm import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", params, cfg, tokenizer)
    proc = subprocess.run([sys.executable, "-m", "jaxllm.convert", "export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("(LlamaForCausalLM)"), proc.stderr
    loaded, loaded_cfg, tok, defaults = load_hf(tmp_path / "hf")
    assert loaded_cfg == cfg and tok.fingerprint == tokenizer.fingerprint
    assert defaults == {"eos_token_id": [tokenizer.eos_id]}
    assert_same_params(loaded, params)
    proc = subprocess.run([sys.executable, "-m", "jaxllm.convert", "export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["export"],  # --checkpoint and --out missing: argparse's error, which printed its usage block too
    ["import", "--checkpoint", "c", "--out", "o"],  # no such command
    ["export", "--checkpoint", "c", "--out", "o", "--bogus"],
    ["export", "--checkpoint", "missing", "--out", "o"],  # the library's CheckpointError
])
def test_convert_refuses_bad_input_with_one_line_and_exit_2(argv, tmp_path, capsys, monkeypatch):
    from jaxllm import convert

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(convert.main, argv, capsys)
    check_cli_outcome("python -m jaxllm.convert", rc, err, argv)
    assert rc == 2 and not (tmp_path / "o").exists()


def test_the_command_line_helpers_parse_flags_without_importing_jax():
    """train.py and convert parse flags with jaxllm.cli; importing it, the package and convert must
    not load JAX, or every bad flag would wait seconds for it."""
    code = ("import sys, jaxllm.cli, jaxllm.convert; assert 'jax' not in sys.modules, 'jax imported'; "
            "import jaxllm; print(jaxllm.generate.__module__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "jaxllm.generate", proc.stderr


def test_mistral_sliding_window_equals_transformers_past_the_window(tmp_path):
    torch, tf = reference_stack()
    torch.manual_seed(7)
    config = tf.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, sliding_window=8, initializer_range=0.3)
    model = tf.MistralForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    params, cfg, _, _ = load_hf(tmp_path)
    assert cfg.sliding_window == 8 and cfg.max_seq_len == 128  # the context is no longer capped at the window
    ids = np.random.default_rng(3).integers(0, 96, size=(2, 40))
    # greedy through an 8-slot ring cache, the prompt fed 4 tokens at a time
    got = compare_with_transformers(torch, model, params, cfg, ids, 12, 24, prefill_chunk=4)
    assert np.abs(got - np.asarray(forward(params, cfg.replace(sliding_window=0), jnp.asarray(ids), jnp.broadcast_to(jnp.arange(40), (2, 40)))[0])).max() > 1e-2
    back = load_hf(export_hf(tmp_path / "export", params, cfg))[1]
    assert back == cfg
