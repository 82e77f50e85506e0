"""jaxllm's own CPU kernel for the quantized matmul, compiled on first use and called through XLA's FFI.

XLA:CPU has no fused dequantize-matmul (quantize.py says why that matters), so decoding with
int8/int4 weights on a CPU calls `kernels/qmatmul_cpu.cc`: it widens each weight slice to
float in registers, so only the quantized bytes cross the memory bus. The same tiles multiply
float32 weights by a few rows of x (`matmul_f32`), which XLA:CPU's dot reads at under half the
memory bandwidth. Which weights go to the kernel is decided once, by `devices.prepare`; the
model's matmuls then follow the weight they are given. The library is built with
the machine's C++ compiler (`$CXX`, else g++/c++) for this very CPU (`-march=native`) and kept
under ~/.cache/jaxllm/kernels (or `$JAXLLM_KERNEL_DIR`), keyed by the source, the compiler, the
CPU's feature flags and jaxlib's FFI headers. It is built on the first `available()` call,
which `devices.prepare` makes only for params with weights the kernel would multiply.

A library found there is code this process will run, so it is loaded only from a directory
only this user can write (cachedirs.py: created 0700; someone else's, or a group- or
world-writable one, is refused), only when the file itself is this user's and not writable by
others, and only when its SHA-256 equals the one recorded beside it (`qmatmul-<key>.so.sha256`)
by the build that wrote it. A library without its record, or not matching it (truncated by a
crash, overwritten, planted), is rebuilt. The check and the load read the same open file
(dlopen of /proc/self/fd/N), so the file cannot be swapped between them.

Whenever the kernel cannot be used — JAX runs on a GPU or TPU, not an x86 CPU with AVX-512, no
compiler, a failed build, a cache directory others can write, or `JAXLLM_NATIVE=0` —
`available()` is False and `devices.prepare` chooses XLA's formulations instead; nothing else
changes. Why it was not used is in `status()`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import cachedirs
from jaxllm.errors import CacheError
from jaxllm.qformat import dequantize_values, untile_values

SOURCE = Path(__file__).parent / "kernels" / "qmatmul_cpu.cc"
TARGET = "jaxllm_qmatmul"
TARGET_F32 = "jaxllm_matmul_f32"
_status = {"reason": "not tried yet"}
_registered: list = []  # the library whose handlers XLA calls (set once per process)


def status() -> str:
    """Why the kernel is (not) in use: "in use: <path>" or the reason, e.g. "JAXLLM_NATIVE=0"."""
    available()
    return _status["reason"]


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the kernel is built (or loads from the cache) and registered with XLA:CPU.

    Whether a backend uses it is devices.py's choice (only XLA:CPU does); this only says whether
    it can be had on this machine."""
    if os.environ.get("JAXLLM_NATIVE", "1") == "0":
        return _fail("JAXLLM_NATIVE=0")
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        return _fail(f"no kernel for {platform.system()} {platform.machine()}")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        return _fail("no C++ compiler found (set CXX)")
    try:
        fd, path = _build(cxx)
    except CacheError as e:
        return _fail(f"kernel not loaded: {e}")
    except (OSError, subprocess.SubprocessError) as e:
        return _fail(f"kernel build failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}")
    # Loaded through the descriptor whose contents were checked, not through the path (which
    # could name another file by now). The descriptor stays open for the life of the process:
    # the loader knows the library by this name, which must not come to mean another file.
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except OSError as e:
        os.close(fd)
        return _fail(f"kernel load failed: {path}: {e}")
    if not lib.jaxllm_qmatmul_simd():
        return _fail("this CPU has no AVX-512: the portable loops are slower than XLA")
    if not _registered:  # XLA refuses a second handler under a name; a process needs one
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxllmQMatmul), platform="cpu")
        jax.ffi.register_ffi_target(TARGET_F32, jax.ffi.pycapsule(lib.JaxllmMatmulF32), platform="cpu")
        _registered.append(lib)
    _status["reason"] = f"in use: {path}"
    return True


def _fail(reason: str) -> bool:
    _status["reason"] = reason
    return False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def kernel_dir() -> Path:
    """Where built libraries are kept: $JAXLLM_KERNEL_DIR, else ~/.cache/jaxllm/kernels."""
    return Path(os.environ.get("JAXLLM_KERNEL_DIR") or Path.home() / ".cache" / "jaxllm" / "kernels")


def _build(cxx: str) -> tuple[int, Path]:
    """-> (an open descriptor of the library, verified against its recorded digest, and its path).

    Builds it when the cache has no verified copy. Raises CacheError for an unsafe directory
    or file, OSError for a failed build."""
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-isystem", include]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), _cpu_flags().encode(),
                 (Path(include) / "xla" / "ffi" / "api" / "c_api.h").read_bytes()):
        key.update(part)
    out_dir = cachedirs.private_dir(kernel_dir(), "JAXLLM_KERNEL_DIR")
    path = out_dir / f"qmatmul-{key.hexdigest()[:16]}.so"
    fd = _open_verified(path)
    if fd is not None:
        return fd, path
    tmp_fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # concurrent builds each write their own file
    os.close(tmp_fd)
    try:
        done = subprocess.run([cxx, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise OSError(done.stderr or f"{cxx} exited with {done.returncode}")
        os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _write_digest(digest_path(path), _sha256(fd))
            os.replace(tmp, path)  # a process that checks the pair in between sees a mismatch and builds too
        except BaseException:
            os.close(fd)
            raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return fd, path


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of the library at `path` is recorded (hex, one line)."""
    return path.with_name(path.name + ".sha256")


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _open_checked(path: Path) -> int | None:
    """An open descriptor of `path`, a regular file of this user that others cannot write; None
    when it does not exist. Raises CacheError otherwise (a symlink included)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheError(f"{path} cannot be opened as a plain file ({e.strerror or e})") from None
    st = os.fstat(fd)
    why = "is not a regular file" if not stat.S_ISREG(st.st_mode) else cachedirs.problem(st)
    if why:
        os.close(fd)
        raise CacheError(f"{path} {why}")
    return fd


def _open_verified(path: Path) -> int | None:
    """An open descriptor of the library at `path` when its contents match the recorded digest;
    None when either file is missing or they differ (it is then rebuilt)."""
    record = _open_checked(digest_path(path))
    if record is None:
        return None
    try:
        recorded = os.read(record, 128).decode("ascii", "replace").strip()
    finally:
        os.close(record)
    fd = _open_checked(path)
    if fd is not None and _sha256(fd) != recorded:
        os.close(fd)
        return None
    return fd


def _write_digest(path: Path, digest: str) -> None:
    """Writes the record atomically: a reader sees the old record or the new one, never half."""
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def qmatmul(x: jax.Array, values: jax.Array, scales: jax.Array, bits: int, group_size: int, tile: int = 0) -> jax.Array:
    """x f32 [M, I] @ the weight (`values`, `scales`) in quantize.py's layout -> f32 [M, O].

    `tile` > 0: `values` are in quantize.tile_weight's layout [ceil(O/T), rows, T].

    Differentiable in x and the scales (the backward pass runs the XLA formulation). Under vmap
    the mapped axis of x joins its rows (one call over B * M rows); a mapped weight runs the
    XLA formulation instead.
    """
    return _qmatmul(x, values, scales, bits, group_size, tile)


@functools.lru_cache(maxsize=None)
def _qkernel(bits: int, group_size: int, tile: int):
    """The FFI call for one weight format, batched by folding vmapped axes of x into its rows."""

    @jax.custom_batching.custom_vmap
    def call(x, values, scales):
        out = jax.ShapeDtypeStruct((x.shape[0], scales.shape[1]), jnp.float32)
        return jax.ffi.ffi_call(TARGET, out)(x, values, scales, bits=np.int64(bits), group=np.int64(group_size), tile=np.int64(tile))

    @call.def_vmap
    def rule(axis_size, in_batched, x, values, scales):
        x_b, values_b, scales_b = in_batched
        if values_b or scales_b:  # one weight per element: the kernel takes one, so XLA's formulation runs
            axes = [0 if b else None for b in in_batched]
            return jax.vmap(lambda x, v, s: _reference(x, v, s, bits, group_size, tile), in_axes=axes)(x, values, scales), True
        b, m, i = x.shape
        return call(x.reshape(b * m, i), values, scales).reshape(b, m, -1), True

    return call


def _reference(x, values, scales, bits, group_size, tile):
    """XLA's formulation of the kernel's product (for mapped weights and the backward pass)."""
    if tile:
        values = untile_values(values, scales.shape[-1])
    return x @ dequantize_values(bits, group_size, values, scales, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _qmatmul(x, values, scales, bits, group_size, tile):
    return _qkernel(bits, group_size, tile)(x, values, scales)


def _fwd(x, values, scales, bits, group_size, tile):
    return _qkernel(bits, group_size, tile)(x, values, scales), (x, values, scales)


def _bwd(bits, group_size, tile, saved, g):
    x, values, scales = saved
    _, vjp = jax.vjp(lambda x, s: _reference(x, values, s, bits, group_size, tile), x, scales)
    dx, ds = vjp(g)
    return dx, np.zeros(values.shape, jax.dtypes.float0), ds


_qmatmul.defvjp(_fwd, _bwd)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w"], meta_fields=["rows"])
@dataclasses.dataclass(frozen=True)
class Float32Weight:
    """A float32 weight [I, O] whose products with `rows` = (lo, hi) rows of x, bounds included,
    run in the kernel (`model.linear`); other products are XLA's dot. `devices.prepare` makes
    these on a CPU the kernel runs on; `devices.as_stored` turns them back into arrays."""

    w: jax.Array  # f32 [I, O]
    rows: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @property
    def ndim(self) -> int:
        return self.w.ndim


def matmul_f32(x: jax.Array, w: jax.Array) -> jax.Array:
    """x f32 [M, I] @ w f32 [I, O] -> f32 [M, O] with the kernel's float32 tiles.

    For decode-sized M: XLA:CPU's own dot reads the weight at under half the memory bandwidth
    once M > 1 (devices.py says when this is used). Differentiable in both (the backward pass
    is XLA's). Under vmap the mapped axis of x joins its rows; a mapped w runs XLA's dot.
    """
    return _matmul_f32(x, w)


@jax.custom_batching.custom_vmap
def _f32_kernel(x, w):
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET_F32, out)(x, w)


@_f32_kernel.def_vmap
def _f32_rule(axis_size, in_batched, x, w):
    x_b, w_b = in_batched
    if w_b:
        return jnp.matmul(x, w), True
    b, m, i = x.shape
    return _f32_kernel(x.reshape(b * m, i), w).reshape(b, m, -1), True


@jax.custom_vjp
def _matmul_f32(x, w):
    return _f32_kernel(x, w)


def _fwd_f32(x, w):
    return _f32_kernel(x, w), (x, w)


def _bwd_f32(saved, g):
    x, w = saved
    return g @ w.T, x.T @ g


_matmul_f32.defvjp(_fwd_f32, _bwd_f32)
