"""Training: the loss against a numpy reference, the schedule, the step, resume, NaN stops, sharding."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import TrainConfig, TrainingError, data, train_loop, training
from jaxllm.errors import ConfigError
from jaxllm.checkpoint import flatten, load_checkpoint
from conftest import REPO
from reference import np_forward

SEQ = 32


@pytest.fixture(scope="module")
def tokens(corpus, tokenizer, tmp_path_factory):
    """The shared corpus as train tokens (framed as one document per 32 KB piece)."""
    _, splits = data.prepare(str(corpus), tmp_path_factory.mktemp("shards"), tokenizer=tokenizer, val_fraction=0.1)
    return splits["train"].tokens


@pytest.fixture(scope="module")
def tcfg():
    return TrainConfig(batch_size=8, max_steps=40, lr=1e-2, warmup_steps=5, weight_decay=0.0)


@pytest.fixture(scope="module")
def step_fn(cfg, tcfg):
    mesh = training.make_mesh(1, jax.devices()[:1])
    shapes = jax.eval_shape(lambda k: training.init_state(cfg, tcfg, k), jax.random.key(0))
    return training.compile_step(cfg, tcfg, mesh, training.state_shardings(shapes, mesh))


def fresh_state(cfg, tcfg, seed=0):
    return training.init_state(cfg, tcfg, jax.random.key(seed))


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------- pure pieces


def test_loss_is_the_mean_next_token_cross_entropy_of_the_numpy_reference(cfg, params, tokens):
    batch = data.train_batch(tokens, 0, 0, SEQ, 3)[0]
    want = np.mean(
        [-np_log_softmax(np_forward(params, cfg, row[:-1]))[np.arange(SEQ), row[1:]] for row in batch]
    )
    got = float(training.loss_fn(params, cfg, jnp.asarray(batch)))
    assert got == pytest.approx(want, rel=1e-5)


def test_cross_entropy_matches_log_softmax():
    logits = np.random.default_rng(0).normal(size=(2, 3, 11)).astype(np.float32) * 4
    targets = np.array([[0, 5, 10], [3, 3, 7]])
    want = -np.take_along_axis(np_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(training.cross_entropy(jnp.asarray(logits), jnp.asarray(targets)), want, rtol=1e-5)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    t = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)

    def ref(s):
        if s < 10:
            return 1e-3 * (s + 1) / 10
        p = min((s - 10) / 100, 1.0)
        return 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * p))

    for s in (0, 4, 9, 10, 35, 60, 109, 110, 500):
        assert float(training.learning_rate(s, t)) == pytest.approx(ref(s), rel=1e-5), s


def test_weight_decay_skips_norm_gains_but_not_matrices(params):
    mask = flatten(training.decay_mask(params))
    assert not mask["layers.attn_norm"] and not mask["layers.mlp_norm"] and not mask["final_norm"]
    assert all(mask[k] for k in ("embed", "lm_head", "layers.wq", "layers.wo", "layers.w_down"))


def test_gradient_accumulation_equals_one_big_batch(cfg, tcfg, tokens, step_fn):
    batch = data.train_batch(tokens, 0, 0, SEQ, 8)  # [1, 8, T+1]
    one, m1 = step_fn(fresh_state(cfg, tcfg), jnp.asarray(batch))
    acc_cfg = tcfg.replace(grad_accum=4)
    two, m2 = jax.jit(lambda s, b: training.train_step(s, b, cfg, acc_cfg))(
        fresh_state(cfg, acc_cfg), jnp.asarray(batch.reshape(4, 2, SEQ + 1))
    )
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)  # a mean, not a sum
    # Adam's first step is ~lr * sign(g): a gradient within rounding of 0 may flip, so allow lr * 1e-2
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=tcfg.lr * 1e-2)


def test_loss_decreases_on_a_tiny_corpus(cfg, tcfg, tokens, step_fn):
    state, losses = fresh_state(cfg, tcfg), []
    for s in range(40):
        state, m = step_fn(state, jnp.asarray(data.train_batch(tokens, 0, s, SEQ, 8)))
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(math.log(cfg.vocab_size), abs=0.3)  # uniform at init
    assert np.mean(losses[-5:]) < losses[0] - 2.0
    assert int(state.step) == 40


def test_the_tiny_model_overfits_one_batch(cfg, tcfg, tokens, step_fn):
    batch = jnp.asarray(data.train_batch(tokens, 1, 0, SEQ, 8))
    state = fresh_state(cfg, tcfg)
    for _ in range(150):
        state, m = step_fn(state, batch)
    assert float(m["loss"]) < 0.5


def test_a_non_finite_loss_leaves_the_state_unchanged(cfg, tcfg, tokens, step_fn):
    state = fresh_state(cfg, tcfg)
    state.params["embed"] = state.params["embed"].at[:].set(jnp.inf)
    before = jax.device_get(state)
    after, m = step_fn(state, jnp.asarray(data.train_batch(tokens, 0, 0, SEQ, 8)))
    assert not math.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree_util.tree_leaves(before.params), jax.tree_util.tree_leaves(after.params)):
        np.testing.assert_array_equal(a, b)


def test_bf16_compute_keeps_float32_master_weights(cfg, tcfg, tokens):
    bf = cfg.replace(compute_dtype="bfloat16", param_dtype="bfloat16")
    batch = jnp.asarray(data.train_batch(tokens, 0, 0, SEQ, 8))
    state, m = jax.jit(lambda s, b: training.train_step(s, b, bf, tcfg))(fresh_state(bf, tcfg), batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))
    f32 = float(training.loss_fn(fresh_state(cfg, tcfg).params, cfg, batch[0]))
    assert float(m["loss"]) == pytest.approx(f32, abs=0.05)


# ---------------------------------------------------------------------------- sharding

SHARDED_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json, jax, numpy as np
from jaxllm import ModelConfig, TrainConfig, training

cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
tcfg = TrainConfig(batch_size=8, grad_accum=2, max_steps=10, warmup_steps=1, lr=1e-3)
rng = np.random.default_rng(0)
batches = [rng.integers(0, 128, (2, 4, 17)).astype(np.int32) for _ in range(3)]

start = []

def run(devices, fsdp):
    mesh = training.make_mesh(fsdp, devices)
    state, shardings = training.init_sharded_state(cfg, tcfg, jax.random.key(0), mesh)
    start.append(jax.device_get(state.params))
    step = training.compile_step(cfg, tcfg, mesh, shardings)
    losses = []
    for b in batches:
        state, m = step(state, training.global_batch(b, training.batch_sharding(mesh)))
        losses.append(float(m["loss"]))
    return losses, state

l1, s1 = run(jax.devices()[:1], 1)
l4, s4 = run(jax.devices(), 2)
diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
wq = s4.params["layers"]["wq"]
print(json.dumps({
    "losses_1": l1, "losses_4": l4,
    "param_diff": diff(s1.params, s4.params), "opt_diff": diff(s1.opt_state, s4.opt_state),
    "moved": diff(start[0], s1.params), "init_diff": diff(start[0], start[1]),
    "devices": len(jax.devices()), "wq_spec": str(wq.sharding.spec),
    "wq_shard_shape": list(wq.addressable_shards[0].data.shape), "wq_shape": list(wq.shape),
}))
"""


def test_a_sharded_step_on_4_devices_equals_the_single_device_step():
    env = {**os.environ, "JAXLLM_CACHE_DIR": str(REPO / ".jax_cache")}
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env, timeout=300, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 4
    assert "fsdp" in r["wq_spec"] and r["wq_shard_shape"] != r["wq_shape"]  # really sharded
    np.testing.assert_allclose(r["losses_4"], r["losses_1"], atol=1e-6)
    assert r["init_diff"] == 0 and r["moved"] > 1e-3  # same start, and the steps did train
    assert r["param_diff"] < 1e-6 and r["opt_diff"] < 1e-6


# ---------------------------------------------------------------------------- runs: resume, NaN, retention


@pytest.fixture(scope="module")
def run_cfg(cfg, corpus, tokenizer, tmp_path_factory):
    """A tiny run on the shared corpus with the shared tokenizer; shards prepared once."""
    tok_path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer.save(tok_path)
    t = TrainConfig(
        data=str(corpus), tokenizer=str(tok_path), data_dir=str(tmp_path_factory.mktemp("runshards")),
        val_fraction=0.1, seq_len=SEQ, batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2,
        eval_every=4, eval_batches=1, log_every=1, save_every=4, keep=2,
    )  # fmt: skip
    return cfg, t


def read_metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(out_dir, cfg):
    return flatten(load_checkpoint(out_dir, expect_config=cfg)[0])


def test_resume_gives_the_losses_and_params_of_an_uninterrupted_run(run_cfg, tmp_path):
    cfg, t = run_cfg
    whole = train_loop.run(cfg, t, tmp_path / "whole", progress=False, log=lambda m: None)
    half = train_loop.run(cfg, t, tmp_path / "split", stop_at=4, progress=False, log=lambda m: None)
    assert half.step == 4 and half.stop_reason == "stop_at"
    rest = train_loop.run(cfg, t, tmp_path / "split", resume=True, progress=False, log=lambda m: None)
    assert sorted(rest.losses) == [5, 6, 7, 8]
    assert {**half.losses, **rest.losses} == whole.losses  # bit-identical on CPU
    a, b = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in a] == [(r["step"], r["loss"], r.get("val_loss")) for r in b]
    pa, pb = final_params(tmp_path / "whole", cfg), final_params(tmp_path / "split", cfg)
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(run_cfg, tmp_path, monkeypatch):
    cfg, t = run_cfg
    real_batch, real_losses = data.train_batch, training.token_losses

    def poisoned_batch(tokens, seed, step, *args, **kwargs):
        batch = real_batch(tokens, seed, step, *args, **kwargs)
        if step == 5:  # the 6th step: after the checkpoint at step 4
            batch[..., 0] = -1
        return batch

    def nan_on_poison(params, cfg, batch):
        return real_losses(params, cfg, batch) * jnp.where(jnp.any(batch < 0), jnp.nan, 1.0)

    monkeypatch.setattr(data, "train_batch", poisoned_batch)
    monkeypatch.setattr(training, "token_losses", nan_on_poison)
    with pytest.raises(TrainingError, match=r"at step 6.*Last good checkpoint: step 4"):
        train_loop.run(cfg, t, tmp_path / "run", progress=False, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "run" / "state").iterdir() if p.name.isdigit()) == ["4"]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]  # 5 was fine
    monkeypatch.undo()
    # the model directory and the state both hold step 4: resuming reproduces a clean run
    rest = train_loop.run(cfg, t, tmp_path / "run", resume=True, progress=False, log=lambda m: None)
    clean = train_loop.run(cfg, t, tmp_path / "clean", progress=False, log=lambda m: None)
    assert rest.losses == {s: v for s, v in clean.losses.items() if s > 4}


def test_checkpoints_keep_the_last_n_and_the_best_by_val_loss(tmp_path):
    mngr = train_loop._manager(tmp_path / "state", keep=2)
    import orbax.checkpoint as ocp

    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 4.0), (5, 5.0)]:
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.ones(2)})), metrics={"val_loss": val})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 4, 5]
    mngr.close()


@pytest.mark.parametrize("values", [[None], ["lr"], 3, "lr"])
def test_a_train_config_that_is_not_a_json_object_is_refused_by_name(values):
    with pytest.raises(ConfigError, match="train config must be a JSON object"):
        TrainConfig.from_dict(values)


# ---------------------------------------------------------------------------- the loss plot


def without_matplotlib(monkeypatch):
    """`import matplotlib` (or any of its modules) fails from here on, as if it were not installed."""
    for name in [m for m in sys.modules if m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_a_run_succeeds_with_no_plot_and_one_line_saying_how_to_get_one(run_cfg, tmp_path, monkeypatch):
    cfg, t = run_cfg
    lines = []
    without_matplotlib(monkeypatch)
    result = train_loop.run(cfg, t, tmp_path / "run", stop_at=2, progress=False, log=lines.append)
    assert result.step == 2 and result.stop_reason == "stop_at"
    assert (tmp_path / "run" / "config.json").exists() and [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "loss.png").exists()
    assert [line for line in lines if "jaxllm[plot]" in line] == ["no loss.png: the loss plot needs matplotlib (pip install 'jaxllm[plot]')"]
    monkeypatch.undo()
    # with matplotlib importable, the same metrics give a PNG
    path = train_loop.write_plot(tmp_path / "run")
    assert path == tmp_path / "run" / "loss.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
