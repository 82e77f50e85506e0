"""Compile-time bookkeeping: count XLA compilations, enable the persistent cache."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = 0
_listening = False


def _on_event(name: str, duration: float, **kwargs) -> None:
    global _compiles
    if name == _COMPILE_EVENT:
        _compiles += 1


class CompileCounter:
    """`with CompileCounter() as c: ...; c.count` — XLA compilations inside the block."""

    def __enter__(self) -> "CompileCounter":
        global _listening
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listening = True
        self._start = _compiles
        return self

    def __exit__(self, *exc) -> None:
        self.count = _compiles - self._start

    @property
    def so_far(self) -> int:
        return _compiles - self._start


def enable_persistent_cache(path: str | os.PathLike | None = None) -> Path:
    """Keeps compiled programs on disk between runs (default: ~/.cache/jaxllm/xla)."""
    path = Path(path or os.environ.get("JAXLLM_CACHE_DIR") or Path.home() / ".cache" / "jaxllm" / "xla")
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class Compiled:
    """jit + an explicit cache of compiled programs, so compile time is measured on its own.

    Call with keywords: `program(dynamic_args..., static=dict(...))`.
    """

    def __init__(self, fn, donate_argnames=()):
        self._fn, self._donate, self._programs = fn, donate_argnames, {}

    def __call__(self, static: dict, **args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = (tuple(sorted(static.items())), tree, tuple((x.shape, x.dtype, getattr(x, "weak_type", False)) for x in leaves))
        compile_s = 0.0
        if key not in self._programs:
            t = time.perf_counter()
            jitted = jax.jit(self._fn, static_argnames=tuple(static), donate_argnames=self._donate)
            self._programs[key] = jitted.lower(**args, **static).compile()
            compile_s = time.perf_counter() - t
        return self._programs[key](**args), compile_s
