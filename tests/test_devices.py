"""devices.py: params are prepared for decoding once per params object, the layout per backend
is encoded in the params, raw params run plain XLA, and the CPU kernel is built only for
weights that use it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import devices, native
from jaxllm.quantize import QuantizedWeight, quantize_params
from conftest import REPO, tiny_config

BUNDLED = Path(jaxllm.__file__).parent / "assets" / "default"


def _spy_on_layout(monkeypatch) -> list:
    calls = []
    layout = devices._layout
    monkeypatch.setattr(devices, "_layout", lambda params, compute: calls.append(1) or layout(params, compute))
    return calls


def test_generate_prepares_the_same_params_once_and_frees_the_copy_with_them(cfg, params, monkeypatch):
    calls = _spy_on_layout(monkeypatch)
    mine = jax.tree.map(jnp.copy, params)  # stacked params of this test's own (the fixture's may be cached already)
    kw = dict(max_new_tokens=4, temperature=0.0)
    first = jaxllm.generate(mine, cfg, [[5, 6, 7]], **kw).token_ids
    assert jaxllm.generate(mine, cfg, [[5, 6, 7]], **kw).token_ids == first
    assert len(calls) == 1  # the second call found the first call's preparation
    other = jax.tree.map(jnp.copy, params)  # equal values, another object: prepared anew
    assert jaxllm.generate(other, cfg, [[5, 6, 7]], **kw).token_ids == first
    assert len(calls) == 2
    # the cached copy lives only as long as the params it was made from
    kept = weakref.ref(jax.tree.leaves(devices.prepare(mine, cfg))[-1])
    assert len(calls) == 2 and kept() is not None
    del mine
    gc.collect()
    assert kept() is None


def test_prepare_is_idempotent_and_raw_params_never_call_the_kernel(cfg, params):
    ready = devices.prepare(params, cfg)
    assert devices.prepare(ready, cfg) is ready
    tokens, positions = jnp.zeros((4, 1), jnp.int32), jnp.zeros((4, 1), jnp.int32)  # 4 rows: the kernel's range

    def hlo(p):
        return jax.jit(lambda p: jaxllm.forward(p, cfg, tokens, positions)[0]).lower(p).compile().as_text()

    assert native.TARGET_F32 not in hlo(params)  # training, a user's own jit: plain XLA on every backend
    uses_kernel = jax.default_backend() == "cpu" and native.available()
    assert (native.TARGET_F32 in hlo(ready)) == uses_kernel
    np.testing.assert_allclose(
        np.asarray(jaxllm.forward(ready, cfg, tokens, positions)[0]),
        np.asarray(jaxllm.forward(params, cfg, tokens, positions)[0]), rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_accelerators_get_their_layout_and_never_the_cpu_kernel(cfg, params, monkeypatch, backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(native, "available", lambda: pytest.fail("the CPU kernel was asked for"))
    q = quantize_params(params, 8)
    ready = devices.prepare(q, cfg)
    if backend == "tpu":  # the layers stay stacked, run by lax.scan: nothing changes
        assert ready is q and devices.prepare(params, cfg) is params
    else:
        assert isinstance(ready["layers"], list) and len(ready["layers"]) == cfg.n_layers
    is_q = lambda x: isinstance(x, QuantizedWeight)  # noqa: E731
    assert {(w.impl, w.tile) for w in jax.tree.leaves(ready, is_leaf=is_q) if is_q(w)} == {("xla", 0)}
    assert f"decoding on {backend}: " in devices.describe(ready, cfg)


def test_the_kernel_is_built_only_when_a_weight_uses_it(tmp_path):
    if not BUNDLED.exists():
        pytest.skip("the bundled model is missing")
    code = (
        "import os, sys, jax, jaxllm\n"
        "from jaxllm import devices, native\n"
        "sys.path.insert(0, 'tests'); from conftest import tiny_config\n"
        "params, cfg, _ = jaxllm.load_checkpoint(sys.argv[1])\n"  # bfloat16: XLA's dot only
        "print(devices.describe(devices.prepare(params, cfg), cfg))\n"
        "libraries = lambda: len([f for f in os.listdir(sys.argv[2]) if f.endswith('.so')])\n"
        "print(libraries())\n"
        "cfg = tiny_config(64); devices.prepare(jaxllm.init_params(cfg, jax.random.key(0)), cfg)\n"  # float32
        "print(libraries(), native.available())\n"
    )
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    env = {**os.environ, "JAXLLM_KERNEL_DIR": str(kernels)}
    env.pop("JAXLLM_NATIVE", None)
    out = subprocess.run([sys.executable, "-c", code, str(BUNDLED), str(kernels)], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    described, after_bundled, after_f32 = out.stdout.splitlines()
    assert "bfloat16 weights: XLA's dot" in described and "jaxllm's CPU kernel" not in described
    assert after_bundled == "0"  # the bundled model never calls the kernel: nothing was built
    built, available = after_f32.split()
    if available == "True":  # float32 weights go to the kernel where it runs: built now
        assert built == "1"
