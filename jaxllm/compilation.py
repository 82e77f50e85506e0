"""Compile-time bookkeeping: count XLA compilations and persistent-cache hits, enable the
persistent cache, and compile programs ahead of time (`Compiled`; warmup.py uses these to
compile all of generation's programs before the first real call)."""

from __future__ import annotations

import functools
import gc
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import jax

from jaxllm import cachedirs

# JAX reports this duration for every program it compiles *or loads from the persistent cache*;
# a load also reports a cache hit, so new compilations = compiles - cache hits.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_counts = {"compiles": 0, "cache_hits": 0, "compile_s": 0.0}
_listening = False


def _on_duration(name: str, duration: float, **kwargs) -> None:
    if name == _COMPILE_EVENT:
        _counts["compiles"] += 1
        _counts["compile_s"] += duration


def _on_event(name: str, **kwargs) -> None:
    if name == _HIT_EVENT:
        _counts["cache_hits"] += 1


class CompileCounter:
    """`with CompileCounter() as c: ...` — inside the block: `c.count` programs compiled or loaded
    from the persistent cache, `c.cache_hits` of them loaded, `c.new` really compiled by XLA,
    `c.seconds` spent on them."""

    def __enter__(self) -> "CompileCounter":
        global _listening
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_on_duration)
            jax.monitoring.register_event_listener(_on_event)
            _listening = True
        self._start = dict(_counts)
        return self

    def __exit__(self, *exc) -> None:
        self.count, self.cache_hits, self.seconds = self.so_far, self._delta("cache_hits"), self._delta("compile_s")
        self.new = self.count - self.cache_hits

    def _delta(self, key):
        return _counts[key] - self._start[key]

    @property
    def so_far(self) -> int:
        return self._delta("compiles")


def enable_persistent_cache(path: str | os.PathLike | None = None) -> Path:
    """Keeps compiled programs on disk between runs (default: $JAXLLM_CACHE_DIR, else ~/.cache/jaxllm/xla).

    XLA loads machine code from there, so the directory must be this user's alone (created
    0700; cachedirs.py): otherwise this raises CacheError and leaves the cache off."""
    path = cachedirs.private_dir(path or os.environ.get("JAXLLM_CACHE_DIR") or Path.home() / ".cache" / "jaxllm" / "xla",
                                 "JAXLLM_CACHE_DIR")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class Compiled:
    """jit + an explicit cache of compiled programs, so compile time is measured on its own.

    Call with keywords: `program(static=dict(...), **dynamic_args)` -> (outputs, seconds spent
    compiling in this call). `out_info` and `compile_ahead` let a caller compile a later program
    from an earlier one's output shapes while the earlier one compiles: XLA compiles a program
    on one thread, so on a cold start two programs compile in about the time of the longer.
    """

    def __init__(self, fn, donate_argnames=()):
        # key -> jax.stages.Lowered (not compiled yet), a Future (compiling) or jax.stages.Compiled
        self._fn, self._donate, self._programs = fn, donate_argnames, {}
        _instances.add(self)

    def __len__(self) -> int:
        """Programs held (lowered, compiling or compiled)."""
        return len(self._programs)

    def clear(self) -> None:
        """Drops every program held; the next call compiles (or loads from the persistent cache) again."""
        self._programs.clear()

    @staticmethod
    def _key(static: dict, args: dict) -> tuple:
        leaves, tree = jax.tree_util.tree_flatten(args)
        return tuple(sorted(static.items())), tree, tuple((x.shape, x.dtype, getattr(x, "weak_type", False)) for x in leaves)

    def _program(self, static: dict, args: dict):
        """(key, the program for these arguments: lowered now if it is new)."""
        key = self._key(static, args)
        if key not in self._programs:
            jitted = jax.jit(self._fn, static_argnames=tuple(static), donate_argnames=self._donate)
            self._programs[key] = jitted.lower(**args, **static)
        return key, self._programs[key]

    def __call__(self, static: dict, **args):
        t = time.perf_counter()
        key, program = self._program(static, args)
        compile_s = 0.0
        if not isinstance(program, jax.stages.Compiled):
            program = program.result() if isinstance(program, Future) else program.compile()
            self._programs[key] = program
            compile_s = time.perf_counter() - t
        return program(**args), compile_s

    def out_info(self, static: dict, **args):
        """-> (the outputs as ShapeDtypeStructs, seconds spent lowering); does not compile."""
        t = time.perf_counter()
        new = self._key(static, args) not in self._programs
        _, program = self._program(static, args)
        program = program.result() if isinstance(program, Future) else program
        return program.out_info, time.perf_counter() - t if new else 0.0

    def compile_ahead(self, static: dict, **args) -> float:
        """Starts compiling for these arguments (arrays or ShapeDtypeStructs) on a background
        thread; the call that needs the program waits for it. -> seconds spent lowering here."""
        t = time.perf_counter()
        key, program = self._program(static, args)
        if not isinstance(program, jax.stages.Lowered):
            return 0.0
        self._programs[key] = _background().submit(program.compile)
        return time.perf_counter() - t


_instances: weakref.WeakSet[Compiled] = weakref.WeakSet()


def clear() -> None:
    """Lets go of every compiled program this process holds: each `Compiled`'s and JAX's own
    caches (`jax.clear_caches`). Later calls compile again, or load from the persistent cache.
    For a long-running process that has been through many models or shapes (see the module's
    docstring); results are unchanged."""
    for compiled in list(_instances):
        compiled.clear()
    jax.clear_caches()
    gc.collect()  # the programs' memory goes back now, not at the next collection


@functools.lru_cache(maxsize=None)
def _background() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxllm-compile")
