"""jaxllm.nnx: the NNX module is the pure functions behind a Flax door.

The oracle of every test is the pure API: `forward`, `training.loss_fn` and `jax.grad`, a manual
`optax` update, `generate` on the plain params tree.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")
import optax  # noqa: E402

from conftest import REPO, tiny_config  # noqa: E402
from jaxllm import JaxllmError, export_hf, forward, generate, init_cache, init_params, load_checkpoint, save_checkpoint  # noqa: E402
from jaxllm import training  # noqa: E402
from jaxllm.nnx import LanguageModel  # noqa: E402
from jaxllm.quantize import quantize_params  # noqa: E402

CFG = tiny_config(256)
B, T = 2, 8
PROMPTS = [[1, 40, 41, 42], [1, 50, 51, 52, 53, 54]]


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    return jax.random.randint(jax.random.key(1), (B, T + 1), 0, CFG.vocab_size, dtype=jnp.int32)


def positions(tokens):
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def paths(tree) -> dict:
    """{"['layers']['wq']": leaf, ...}: a tree's leaves by their key path."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_tree(got, want, rtol=0.0, atol=0.0):
    got, want = paths(got), paths(want)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=rtol, atol=atol, err_msg=name)


def test_the_state_is_the_pure_params_tree_and_the_config_is_static(params):
    model = LanguageModel.from_params(params, CFG)
    state = nnx.state(model, nnx.Param)
    assert_same_tree(nnx.to_pure_dict(state), params)
    assert_same_tree(model.params, params)
    assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(params)
    assert paths(nnx.to_pure_dict(nnx.state(model))).keys() == paths(params).keys()  # nothing else is state: cfg is not
    assert model.cfg is CFG
    # the config lives in the graph definition: equal configs, equal (hashable) graphdefs; another config, another
    other = LanguageModel.from_params(init_params(CFG, jax.random.key(5)), CFG)
    assert nnx.graphdef(model) == nnx.graphdef(other) and hash(nnx.graphdef(model)) == hash(nnx.graphdef(other))
    untied = tiny_config(256, tie_embeddings=not CFG.tie_embeddings)
    assert nnx.graphdef(LanguageModel(untied, rngs=nnx.Rngs(0))) != nnx.graphdef(model)
    # split and merge (what nnx.jit does at its boundary) give the same model back
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)
    assert merged.cfg == CFG
    assert_same_tree(merged.params, params)


def test_fresh_params_are_init_params_from_the_rngs_key():
    model = LanguageModel(CFG, rngs=nnx.Rngs(params=3))
    assert_same_tree(model.params, init_params(CFG, nnx.Rngs(params=3).params()))


def test_leaves_it_does_not_know_are_carried_under_their_names(params):
    # Another branch may add optional leaves (attention biases); the module must not list the keys.
    extra = {**params, "layers": {**params["layers"], "bq": jnp.full((CFG.n_layers, CFG.n_heads * CFG.dim_per_head), 0.5)}}
    model = LanguageModel.from_params(extra, CFG)
    assert_same_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param)), extra)
    assert_same_tree(model.params, extra)


def test_logits_equal_forward(params, batch):
    model = LanguageModel.from_params(params, CFG)
    tokens = batch[:, :-1]
    want, _ = forward(params, CFG, tokens, positions(tokens))
    np.testing.assert_array_equal(model(tokens), want)
    np.testing.assert_array_equal(model(tokens, positions(tokens)), want)
    shifted = positions(tokens) + 3  # positions are passed through, not assumed
    np.testing.assert_array_equal(model(tokens, shifted), forward(params, CFG, tokens, shifted)[0])


def test_prefill_and_a_decode_step_with_a_cache_equal_forward(params, batch):
    model = LanguageModel.from_params(params, CFG)
    prompt, nxt = batch[:, :6], batch[:, 6:7]
    cache = init_cache(CFG, B, 16)
    want_logits, want_cache = forward(params, CFG, prompt, positions(prompt), cache)
    logits, got_cache = model(prompt, cache=cache)  # positions from the cache's cursor (0)
    np.testing.assert_array_equal(logits, want_logits)
    assert_same_tree(got_cache, want_cache)
    step_pos = jnp.full((B, 1), 6, jnp.int32)
    want_step, want_cache2 = forward(params, CFG, nxt, step_pos, want_cache)
    step, cache2 = model(nxt, cache=got_cache)  # cursor 6 -> position 6
    np.testing.assert_array_equal(step, want_step)
    assert_same_tree(cache2, want_cache2)
    # and the decode step agrees with a cache-free forward over the whole sequence
    full, _ = forward(params, CFG, batch[:, :7], positions(batch[:, :7]))
    np.testing.assert_allclose(step[:, 0], full[:, 6], atol=1e-5)


def test_gradients_equal_jax_grad_of_loss_fn_leaf_by_leaf(params, batch):
    model = LanguageModel.from_params(params, CFG)
    want = jax.grad(training.loss_fn)(params, CFG, batch)
    via_loss = nnx.grad(lambda m: m.loss(batch))(model)
    assert_same_tree(nnx.to_pure_dict(via_loss), want, rtol=1e-6, atol=1e-9)
    # through __call__: a loss a user writes over the module's logits
    via_call = nnx.grad(lambda m: training.cross_entropy(m(batch[:, :-1]), batch[:, 1:]).mean())(model)
    assert_same_tree(nnx.to_pure_dict(via_call), want, rtol=1e-6, atol=1e-9)


def adamw(eps=1e-8):
    return optax.adamw(1e-2, b1=0.9, b2=0.95, eps=eps, weight_decay=0.1)


def nnx_grads(model, grads: dict):
    """Pure gradients as the State `nnx.grad` would give for `model`."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, grads)
    return state


def test_optimizer_updates_equal_manual_optax_updates_on_the_pure_params(params, batch):
    model = LanguageModel.from_params(params, CFG)
    optimizer = nnx.Optimizer(model, adamw(), wrt=nnx.Param)
    tx, want = adamw(), params
    opt_state = tx.init(want)
    for step in range(2):  # the second step uses the moments of the first
        grads = jax.grad(training.loss_fn)(want, CFG, batch)
        updates, opt_state = tx.update(grads, opt_state, want)
        want = optax.apply_updates(want, updates)
        optimizer.update(model, nnx_grads(model, grads))
        assert_same_tree(model.params, want, rtol=1e-6, atol=1e-9)
    assert_same_tree(params, init_params(CFG, jax.random.key(0)))  # the params given were not changed


@nnx.jit
def nnx_step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(lambda m: m.loss(batch))(model)
    optimizer.update(model, grads)
    return loss


def test_a_jitted_nnx_training_step_equals_a_jitted_pure_one_and_steps_lower_the_loss(params, batch):
    # Adam with eps=1e-8 turns a gradient near zero into about lr * its sign, so rounding
    # differences between two compiled programs' gradients (1e-8 here) could flip an update;
    # a larger eps keeps the comparison about the step, not about rounding.
    model = LanguageModel.from_params(params, CFG)
    optimizer = nnx.Optimizer(model, adamw(eps=1e-3), wrt=nnx.Param)
    first = nnx_step(model, optimizer, batch)

    @jax.jit
    def pure_step(params):
        tx = adamw(eps=1e-3)
        loss, grads = jax.value_and_grad(training.loss_fn)(params, CFG, batch)
        updates, _ = tx.update(grads, tx.init(params), params)
        return loss, optax.apply_updates(params, updates)

    loss, want = pure_step(params)
    np.testing.assert_allclose(first, loss, rtol=1e-6)
    assert_same_tree(model.params, want, rtol=1e-6, atol=1e-7)

    losses = [float(first)] + [float(nnx_step(model, optimizer, batch)) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    np.testing.assert_allclose(training.loss_fn(model.params, CFG, batch), model.loss(batch), rtol=1e-6)


class Tempered(nnx.Module):
    """A user's module around the language model: a learned temperature on its logits."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.log_temperature = nnx.Param(jnp.zeros(()))

    def __call__(self, tokens):
        return self.lm(tokens) / jnp.exp(self.log_temperature[...])


@nnx.jit
def tempered_step(model, optimizer, batch):
    def loss(m):
        return training.cross_entropy(m(batch[:, :-1]), batch[:, 1:]).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value


def test_a_user_module_holding_the_model_trains_and_its_inner_params_stay_the_pure_tree(params, batch):
    outer = Tempered(LanguageModel.from_params(params, CFG))
    optimizer = nnx.Optimizer(outer, adamw(), wrt=nnx.Param)
    losses = [float(tempered_step(outer, optimizer, batch)) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1, losses
    assert float(outer.log_temperature[...]) != 0.0  # the user's own Param trained too
    state = nnx.to_pure_dict(nnx.state(outer, nnx.Param))
    assert sorted(state) == ["lm", "log_temperature"]
    assert_same_tree(state["lm"], outer.lm.params)
    assert paths(outer.lm.params).keys() == paths(params).keys()
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(outer.lm.params))
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(outer.lm.params), jax.tree_util.tree_leaves(params)))

    trained = outer.lm.params
    plain = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), state["lm"])  # the same arrays, off the module
    got = generate(trained, CFG, PROMPTS, max_new_tokens=8, temperature=0.0, eos_token_id=[])
    want = generate(plain, CFG, PROMPTS, max_new_tokens=8, temperature=0.0, eos_token_id=[])
    assert got.token_ids == want.token_ids
    for prompt, ids in zip(PROMPTS, got.token_ids):  # generate's first token is the module's argmax
        logits = outer.lm(jnp.asarray([prompt], jnp.int32))
        assert ids[0] == int(jnp.argmax(logits[0, -1]))


def test_module_to_checkpoint_and_back_gives_identical_logits(params, batch, tmp_path):
    model = LanguageModel.from_params(params, CFG)
    nnx_step(model, nnx.Optimizer(model, adamw(), wrt=nnx.Param), batch)  # params that init_params did not give
    tokens = batch[:, :-1]
    save_checkpoint(tmp_path / "ckpt", model.params, model.cfg)
    loaded, cfg, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert cfg == CFG and tokenizer is None
    np.testing.assert_array_equal(LanguageModel.from_params(loaded, cfg)(tokens), model(tokens))
    again, tokenizer = LanguageModel.from_checkpoint(tmp_path / "ckpt")
    assert tokenizer is None
    np.testing.assert_array_equal(again(tokens), model(tokens))
    # and through a Hugging Face directory (export_hf; from_checkpoint reads it with load_any)
    from_hf, _ = LanguageModel.from_checkpoint(export_hf(tmp_path / "hf", model.params, model.cfg))
    np.testing.assert_allclose(from_hf(tokens), model(tokens), rtol=1e-6, atol=1e-6)


def test_under_nnx_jit_results_equal_the_eager_ones(params, batch):
    model = LanguageModel.from_params(params, CFG)
    tokens = batch[:, :-1]
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, tokens), model(tokens), rtol=1e-6, atol=1e-6)
    cache = init_cache(CFG, B, 16)
    jit_logits, jit_cache = nnx.jit(lambda m, t, c: m(t, cache=c))(model, tokens, cache)
    eager_logits, eager_cache = model(tokens, cache=cache)
    np.testing.assert_allclose(jit_logits, eager_logits, rtol=1e-6, atol=1e-6)
    assert_same_tree(jit_cache, eager_cache, rtol=1e-6, atol=1e-6)
    eager = nnx.grad(lambda m: m.loss(batch))(model)
    jitted = nnx.jit(nnx.grad(lambda m: m.loss(batch)))(model)
    assert_same_tree(nnx.to_pure_dict(jitted), nnx.to_pure_dict(eager), rtol=1e-5, atol=1e-8)


def test_params_it_cannot_train_are_refused_in_one_line(params):
    with pytest.raises(JaxllmError, match=r"but embed is a QuantizedWeight"):
        LanguageModel.from_params(quantize_params(params, 8), CFG)
    with pytest.raises(JaxllmError, match="'params' cannot be a LanguageModel attribute"):
        LanguageModel.from_params({**params, "params": params["embed"]}, CFG)
    with pytest.raises(JaxllmError, match="exactly one of"):
        LanguageModel(CFG)


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_importing_jaxllm_does_not_import_flax():
    done = run_python(
        "import sys, jaxllm, jaxllm.model, jaxllm.training, jaxllm.generate, jaxllm.checkpoint\n"
        "jaxllm.forward, jaxllm.generate, jaxllm.save_checkpoint\n"
        "assert 'flax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('flax'))\n"
    )
    assert done.returncode == 0, done.stderr


def test_without_flax_jaxllm_nnx_says_how_to_install_it():
    done = run_python(
        "import sys\n"
        "sys.modules['flax'] = None  # as if Flax were not installed\n"
        "from jaxllm.errors import JaxllmError\n"
        "try:\n"
        "    import jaxllm.nnx\n"
        "except ImportError as e:\n"
        "    assert isinstance(e, JaxllmError)\n"
        "    print(e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "jaxllm.nnx needs Flax, which is not installed: pip install 'jaxllm[flax]'"
