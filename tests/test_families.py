"""Qwen2 and Gemma: options of the one decoder (q/k/v biases; GeGLU, scaled embeddings, (1 + w)
norms, a head_dim of its own), checked against transformers' own classes and the numpy reference."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import CheckpointError, forward, generate, init_params
from jaxllm.beam import beam_generate
from jaxllm.hf import config_from_hf, export_hf, load_hf
from conftest import reference_stack, tiny_config
from reference import np_forward, np_greedy
from test_hf import assert_same_params, compare_with_transformers

# name -> (transformers config class, its arguments, the ModelConfig options it must load as)
CASES = {
    "qwen2-untied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1e6),
                     dict(qkv_bias=True, tie_embeddings=False, activation="silu")),
    "qwen2-tied": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True),
                   dict(qkv_bias=True, tie_embeddings=True)),
    # head_dim 24 while d_model / n_heads is 8, as Gemma's are
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=24),
              dict(embed_scale=True, norm_offset=1.0, activation="gelu_tanh", head_dim=24, tie_embeddings=True)),
    # Gemma's first releases said "gelu" and meant the tanh form; transformers reads it so
    "gemma-legacy-gelu": ("GemmaConfig", dict(num_key_value_heads=2, head_dim=16, hidden_act="gelu", tie_word_embeddings=False),
                          dict(activation="gelu_tanh", head_dim=16, tie_embeddings=False)),
}
MODEL_CLASSES = {"Qwen2Config": "Qwen2ForCausalLM", "GemmaConfig": "GemmaForCausalLM"}


def randomize(torch, model):
    """Norm gains and biases off their init (ones/zeros), so a wrong offset or a dropped bias shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def hf_families(tmp_path_factory):
    torch, tf = reference_stack()
    models = {}
    for i, (name, (config_class, kwargs, _)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        config = getattr(tf, config_class)(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=128, initializer_range=0.3, **kwargs)
        model = randomize(torch, getattr(tf, MODEL_CLASSES[config_class])(config).eval())
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        models[name] = (model, path)
    return torch, tf, models


@pytest.mark.parametrize("name", CASES)
def test_logits_and_greedy_equal_transformers(hf_families, name):
    torch, _, models = hf_families
    model, path = models[name]
    params, cfg, _, _ = load_hf(path)
    for field, value in CASES[name][2].items():
        assert getattr(cfg, field) == value, field
    ids = np.random.default_rng(1).integers(0, 96, size=(3, 40))
    compare_with_transformers(torch, model, params, cfg, ids, 8, 32)


@pytest.mark.parametrize("name", ["qwen2-untied", "gemma"])
def test_beam_search_equals_transformers(hf_families, name):
    torch, _, models = hf_families
    model, path = models[name]
    params, cfg, _, _ = load_hf(path)
    prompt = np.random.default_rng(2).integers(3, 96, size=(1, 6))
    with torch.inference_mode():
        hf = model.generate(torch.from_numpy(prompt), attention_mask=torch.ones_like(torch.from_numpy(prompt)), num_beams=4,
                            max_new_tokens=10, num_return_sequences=2, eos_token_id=None, pad_token_id=0, do_sample=False,
                            output_scores=True, return_dict_in_generate=True)
    ours = beam_generate(params, cfg, prompt.tolist(), num_beams=4, max_new_tokens=10, num_return_sequences=2, eos_token_id=[])
    assert ours.token_ids == [seq[6:].tolist() for seq in hf.sequences]
    np.testing.assert_allclose(ours.scores, hf.sequences_scores.numpy(), rtol=1e-4, atol=1e-5)


# jaxllm configs -> the transformers class their export must load as
EXPORTS = {
    "Qwen2ForCausalLM": dict(qkv_bias=True, n_kv_heads=2),
    "GemmaForCausalLM": dict(embed_scale=True, norm_offset=1.0, activation="gelu_tanh", head_dim=12, tie_embeddings=True),
    "LlamaForCausalLM": dict(activation="gelu"),  # GeGLU without Gemma's other options is a Llama with hidden_act gelu
}


def random_params(cfg, seed):
    """Params far from init: matrices x5, norm gains and biases random."""
    params = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: x * 5 if x.ndim > 1 and x.shape[-1] > 1 and not (x.ndim == 2 and x.shape[0] == cfg.n_layers)
        else x + jnp.asarray(rng.normal(0, 0.5, x.shape), x.dtype), params)


@pytest.mark.parametrize("architecture", EXPORTS)
def test_transformers_loads_the_export_as_its_family_with_equal_logits(architecture, tmp_path):
    torch, tf = reference_stack()
    cfg = tiny_config(96, **EXPORTS[architecture])
    params = random_params(cfg, 3)
    model = tf.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path / "out", params, cfg)).eval()
    assert type(model).__name__ == architecture
    ids = np.random.default_rng(0).integers(0, 96, size=(2, 30))
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(30), (2, 30)))[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    back, back_cfg, _, _ = load_hf(tmp_path / "out")
    assert back_cfg == cfg
    assert_same_params(back, params)


def test_qwen2_with_a_sliding_window_on_every_layer_equals_transformers(tmp_path):
    torch, tf = reference_stack()
    cfg = tiny_config(96, qkv_bias=True, sliding_window=8)
    params = random_params(cfg, 4)
    model = tf.AutoModelForCausalLM.from_pretrained(export_hf(tmp_path, params, cfg)).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and load_hf(tmp_path)[1] == cfg
    ids = np.random.default_rng(5).integers(0, 96, size=(2, 40))
    got = compare_with_transformers(torch, model, params, cfg, ids, 12, 24, prefill_chunk=4)
    full = forward(params, cfg.replace(sliding_window=0), jnp.asarray(ids), jnp.broadcast_to(jnp.arange(40), (2, 40)))[0]
    assert np.abs(got - np.asarray(full)).max() > 1e-2  # the window did change the logits


# every option at once, against the numpy reference: a cache-free float64 forward per step
ALL_OPTIONS = dict(qkv_bias=True, activation="gelu", embed_scale=True, norm_offset=1.0, head_dim=12, n_kv_heads=1)


def test_all_options_together_equal_the_numpy_reference_with_and_without_a_cache():
    cfg = tiny_config(64, **ALL_OPTIONS)
    params = random_params(cfg, 6)
    ids = np.random.default_rng(7).integers(0, 64, size=(1, 20))
    got = np.asarray(forward(params, cfg, jnp.asarray(ids), jnp.arange(20)[None])[0][0])
    np.testing.assert_allclose(got, np_forward(params, cfg, ids[0]), atol=2e-4, rtol=2e-4)
    prompt = ids[0, :5].tolist()
    out = generate(params, cfg, [prompt], max_new_tokens=12, temperature=0.0, eos_token_id=[])
    assert out.token_ids[0] == np_greedy(params, cfg, prompt, 12)


def test_each_option_changes_the_logits():
    """Each option is read: switching one off (the same weights) moves the logits."""
    cfg = tiny_config(64, **ALL_OPTIONS)
    params = random_params(cfg, 8)
    ids, pos = jnp.arange(10)[None], jnp.arange(10)[None]
    base = forward(params, cfg, ids, pos)[0]
    for change in (dict(activation="silu"), dict(embed_scale=False), dict(norm_offset=0.0)):
        assert jnp.abs(forward(params, cfg.replace(**change), ids, pos)[0] - base).max() > 1e-3, change
    # GELU and its tanh form differ by under 5e-4 anywhere: a small but real change (float32 noise is ~1e-6)
    assert jnp.abs(forward(params, cfg.replace(activation="gelu_tanh"), ids, pos)[0] - base).max() > 2e-5
    no_bias = {**params, "layers": {**params["layers"], **{b: jnp.zeros_like(params["layers"][b]) for b in ("bq", "bk", "bv")}}}
    assert jnp.abs(forward(no_bias, cfg, ids, pos)[0] - base).max() > 1e-3


def test_activations_equal_their_formulas():
    """Tighter than the logits' tolerance, which cannot tell GELU from its tanh form."""
    from jaxllm.model import ACTIVATION_FNS
    from reference import np_activation

    x = np.linspace(-8, 8, 4001)
    for name, fn in ACTIVATION_FNS.items():
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x, jnp.float32))), np_activation(name, x), atol=2e-6, err_msg=name)
    assert np.abs(np_activation("gelu", x) - np_activation("gelu_tanh", x)).max() > 1e-4


def test_int8_quantization_keeps_biases_and_norms_as_they_are():
    """int8 weight quantization leaves the biases and norm gains as they are, and decoding the
    quantized model stays close to the float one."""
    from jaxllm.quantize import quantize_params

    cfg = tiny_config(64, **ALL_OPTIONS)
    params = random_params(cfg, 9)
    q = quantize_params(params, 8)
    for name in ("bq", "bk", "bv", "attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(np.asarray(q["layers"][name]), np.asarray(params["layers"][name]))
    ids, pos = jnp.arange(10)[None], jnp.arange(10)[None]
    a, b = forward(params, cfg, ids, pos)[0], forward(q, cfg, ids, pos)[0]
    assert float(jnp.abs(a - b).max()) < 0.05 * float(jnp.abs(a).max())


# ---------------------------------------------------------------------------- what is refused

BASE = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 96, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("change,message", [
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "some layers use a sliding window"),
    (dict(layer_types=["full_attention", "sliding_attention"], sliding_window=8), "some layers use a sliding window"),
    (dict(layer_types=["chunked_attention"] * 2), "layer_types"),
    (dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    (dict(model_type="gemma", architectures=["GemmaForCausalLM"], use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma", architectures=["GemmaForCausalLM"], hidden_activation="relu"), "hidden_activation 'relu'"),
    (dict(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True), "attention_bias"),
    (dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"]), "unsupported architecture"),
])
def test_configs_jaxllm_cannot_run_are_refused_by_name(change, message):
    with pytest.raises(CheckpointError, match=message) as e:
        config_from_hf({**BASE, **change})
    assert "\n" not in str(e.value)


def test_qwen2_windows_that_cover_no_layer_or_every_layer_load():
    assert config_from_hf({**BASE, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}).sliding_window == 0
    assert config_from_hf({**BASE, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}).sliding_window == 8
    assert config_from_hf({**BASE, "sliding_window": 8}).sliding_window == 0  # use_sliding_window defaults to false
    gemma = config_from_hf({**BASE, "model_type": "gemma", "architectures": ["GemmaForCausalLM"], "hidden_act": "gelu",
                            "hidden_activation": "gelu_pytorch_tanh"})
    assert (gemma.activation, gemma.tie_embeddings, gemma.norm_offset, gemma.embed_scale) == ("gelu_tanh", True, 1.0, True)


@pytest.mark.parametrize("options,message", [
    (dict(norm_offset=0.5), "matches no transformers architecture"),
    (dict(embed_scale=True), "matches no transformers architecture"),
    (dict(embed_scale=True, norm_offset=1.0, activation="gelu_tanh", qkv_bias=True), "Gemma-style"),
    (dict(embed_scale=True, norm_offset=1.0, activation="gelu"), "Gemma-style"),
])
def test_an_export_no_architecture_matches_is_refused_before_writing(options, message, tmp_path):
    cfg = tiny_config(64, **options)
    with pytest.raises(CheckpointError, match=message):
        export_hf(tmp_path / "out", init_params(cfg, jax.random.key(0)), cfg)
    assert not (tmp_path / "out").exists()


def test_old_configs_without_the_new_fields_load_as_llama(tmp_path):
    """A checkpoint config written before the family options existed means a Llama."""
    from jaxllm.config import ModelConfig

    values = json.loads(json.dumps(tiny_config(64).to_dict()))
    for name in ("qkv_bias", "activation", "embed_scale", "norm_offset"):
        values.pop(name)
    assert ModelConfig.from_dict(values) == tiny_config(64)


def test_ids_past_the_tokenizer_are_never_generated(tokenizer):
    """Qwen2 pads its embedding table past its tokenizer; those ids are no token. With the
    tokenizer they are never generated (greedy, sampled, beam), whatever their logits; greedy is
    then the numpy argmax over the tokenizer's ids. Without a tokenizer every id is fair."""
    V = tokenizer.vocab_size
    cfg = tiny_config(V + 16, qkv_bias=True)
    params = random_params(cfg, 10)
    params["lm_head"] = params["lm_head"].at[:, V:].set(params["lm_head"][:, :16] * 3)  # padded rows that often win
    prompt = tokenizer.encode("def f(x):", add_bos=True)

    def np_greedy_in_vocab(steps):
        ids, out = list(prompt), []
        for _ in range(steps):
            out.append(int(np.argmax(np_forward(params, cfg, ids)[-1][:V])))
            ids.append(out[-1])
        return out

    free = generate(params, cfg, [prompt], max_new_tokens=12, temperature=0.0, eos_token_id=[])
    assert any(t >= V for t in free.token_ids[0])  # the padded ids do win without a tokenizer
    greedy = generate(params, cfg, [prompt], tokenizer=tokenizer, max_new_tokens=12, temperature=0.0, eos_token_id=[])
    assert greedy.token_ids[0] == np_greedy_in_vocab(12)
    sampled = generate(params, cfg, [prompt] * 4, tokenizer=tokenizer, max_new_tokens=12, temperature=1.5, seed=1, eos_token_id=[])
    beams = beam_generate(params, cfg, [prompt], tokenizer=tokenizer, num_beams=4, num_return_sequences=4, max_new_tokens=8, eos_token_id=[])
    assert all(t < V for ids in sampled.token_ids + beams.token_ids for t in ids)
    assert sampled.texts == [tokenizer.decode(ids) for ids in sampled.token_ids]
    # a prompt id past the tokenizer, or an allow-list of nothing but such ids, is refused by name
    from jaxllm import GenerationError

    with pytest.raises(GenerationError, match=f"outside the vocabulary \\(size {V}\\)"):
        generate(params, cfg, [prompt + [V + 3]], tokenizer=tokenizer, max_new_tokens=2)
    with pytest.raises(GenerationError, match="allowed_token_ids: every id is past"):
        generate(params, cfg, [prompt], tokenizer=tokenizer, max_new_tokens=2, allowed_token_ids=[V + 1])


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(tokenizer, tmp_path):
    cfg = tiny_config(tokenizer.vocab_size - 10)
    export_hf(tmp_path, init_params(cfg, jax.random.key(0)), cfg, tokenizer)
    with pytest.raises(CheckpointError, match=f"the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size"):
        load_hf(tmp_path)
