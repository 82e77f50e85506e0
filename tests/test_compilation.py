"""compilation.py's `clear()` lets go of every program the process holds (each `Compiled`'s and
JAX's caches), giving their memory mappings back to the system: a process that holds too many
reaches vm.max_map_count and cannot load another program."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import memory_mappings

from jaxllm import compilation
from jaxllm.compilation import CompileCounter, Compiled


def affine(x, *, scale):
    return jnp.tanh(x * scale) @ x.T + scale


def run(program, n, scale=2.0):
    x = np.linspace(-1, 1, n * 3, dtype=np.float32).reshape(n, 3)
    out, _ = program(dict(scale=scale), x=jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), np.tanh(x * scale) @ x.T + scale, rtol=1e-5, atol=1e-5)


def compiles(program, n) -> int:
    with CompileCounter() as c:
        run(program, n)
    return c.count


def test_after_clear_a_held_program_is_compiled_again_and_gives_the_same_results():
    program = Compiled(affine)
    first = compiles(program, 2)
    assert first >= 1 and compiles(program, 2) == 0 and len(program) == 1
    compilation.clear()
    assert len(program) == 0 and compiles(program, 2) == first  # (or loaded from the persistent cache)


@pytest.mark.skipif(memory_mappings() == 0, reason="counts /proc/self/maps (Linux)")
def test_clear_gives_the_programs_memory_mappings_back():
    program = Compiled(affine)
    compilation.clear()
    before = memory_mappings()
    for n in range(1, 41):
        run(program, n, scale=float(n))
    held = memory_mappings()
    assert len(program) == 40 and held - before > 40 * 4  # each program keeps several mappings
    compilation.clear()
    assert len(program) == 0
    assert memory_mappings() - before < (held - before) / 4  # most of them are given back
    run(program, 7)  # and it still works, compiling (or loading) again
