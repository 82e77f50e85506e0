"""The caches jaxllm loads from (cachedirs.py): the CPU kernel's library (native.py), XLA's
persistent compilation cache and the constraint tables. Only a directory this user alone can
write is used, and only a library whose contents match the digest recorded when it was built
is ever loaded; anything else is rebuilt, or refused with the reason in `native.status()`.

A "planted" library here is a real shared library whose constructor creates a marker file, so
a test sees whether it was ever loaded into the process. Rebuilds use a stand-in compiler that
copies the library built once for the module (the same `--version`, so the same cache key):
what is tested is which file gets loaded, not the compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cachedirs, constraints, devices, native
from jaxllm.errors import CacheError
from jaxllm.quantize import dequantize, matmul, quantize

PLANTED_SOURCE = """
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char* path = getenv("JAXLLM_TEST_PLANTED");
  FILE* f = path ? fopen(path, "w") : NULL;
  if (f) fclose(f);
}
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fresh_available() -> bool:
    native.available.cache_clear()
    return native.available()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the library's file name, a copy of a good build, the compiler): built once, into a missing
    directory under a fresh $JAXLLM_KERNEL_DIR."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64") or not cxx:
        pytest.skip("the kernel is built only on x86-64 Linux with a C++ compiler")
    if jax.default_backend() != "cpu":
        pytest.skip("the kernel is for XLA:CPU")
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAXLLM_KERNEL_DIR", str(root / "new" / "kernels"))
        mp.delenv("JAXLLM_NATIVE", raising=False)
        try:
            ok = fresh_available()
            reason = native.status()
        finally:
            native.available.cache_clear()
    if not ok:
        pytest.skip(f"native kernel not in use here: {reason}")
    (lib,) = (root / "new" / "kernels").glob("qmatmul-*.so")
    good = root / "good.so"
    shutil.copy(lib, good)
    return lib.name, good, cxx


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    """A fresh $JAXLLM_KERNEL_DIR (0700); `available()`'s cache is cleared before and after."""
    path = tmp_path / "kernels"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("JAXLLM_KERNEL_DIR", str(path))
    monkeypatch.delenv("JAXLLM_NATIVE", raising=False)
    native.available.cache_clear()
    yield path
    monkeypatch.undo()
    native.available.cache_clear()


@pytest.fixture
def stand_in_compiler(built, tmp_path, monkeypatch):
    """$CXX: answers --version as the real compiler does, and "compiles" by copying the good
    build; -> the file that counts its compilations (one line each)."""
    name, good, cxx = built
    calls = tmp_path / "compilations"
    script = tmp_path / "cxx"
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then exec {cxx} --version; fi\n'
                      f'for a; do out="$a"; done\necho "$out" >> {calls}\ncp {good} "$out"\n')
    script.chmod(0o755)
    monkeypatch.setenv("CXX", str(script))
    return calls


@pytest.fixture(scope="module")
def planted_library(built, tmp_path_factory) -> Path:
    _, _, cxx = built
    d = tmp_path_factory.mktemp("planted")
    (d / "planted.c").write_text(PLANTED_SOURCE)
    subprocess.run([cxx, "-x", "c", "-shared", "-fPIC", str(d / "planted.c"), "-o", str(d / "planted.so")], check=True)
    return d / "planted.so"


@pytest.fixture
def marker(tmp_path, monkeypatch) -> Path:
    """The file a planted library's constructor creates if it is ever loaded."""
    path = tmp_path / "planted-library-was-loaded"
    monkeypatch.setenv("JAXLLM_TEST_PLANTED", str(path))
    return path


def replace_file(path: Path, data: bytes) -> None:
    """`path` now names a new file holding `data`; a process that mapped the old one keeps it intact."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(0o700)
    os.replace(tmp, path)


def compilations(calls: Path) -> int:
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_a_new_kernel_directory_is_private_and_the_library_matches_its_recorded_digest(built):
    name, good, _ = built
    kernels = good.parent / "new" / "kernels"
    assert stat.S_IMODE(kernels.stat().st_mode) == 0o700
    assert sorted(p.name for p in kernels.iterdir()) == [name, name + ".sha256"]
    assert (kernels / (name + ".sha256")).read_text().strip() == sha256(kernels / name) == sha256(good)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_library_is_rebuilt_and_loads(built, kernel_dir, stand_in_compiler, planted_library, marker, damage):
    name, good, _ = built
    lib = kernel_dir / name
    shutil.copy(good, lib)
    (kernel_dir / (name + ".sha256")).write_text(sha256(good) + "\n")
    assert fresh_available() and compilations(stand_in_compiler) == 0  # a good library is loaded as it is
    # The damaged file replaces the name (a new inode): writing into the file this process has
    # just loaded would change its mapped pages, and the loader reads them on every later symbol
    # lookup (an xdist worker then crashed in unrelated tests).
    if damage == "truncated":  # e.g. a crash or a full disk half-way through a write
        replace_file(lib, good.read_bytes()[:4096])
    else:  # another library under the same name: its digest is not the recorded one
        replace_file(lib, planted_library.read_bytes())
    assert fresh_available(), native.status()
    assert native.status() == f"in use: {lib}" and compilations(stand_in_compiler) == 1
    assert sha256(lib) == sha256(good) == (kernel_dir / (name + ".sha256")).read_text().strip()
    assert not marker.exists()
    assert ctypes.CDLL(str(lib)).jaxllm_qmatmul_simd() == 512  # the rebuilt file is a working library
    w = np.random.default_rng(0).standard_normal((64, 24)).astype(np.float32)
    qw = quantize(w, 8)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    got = native.qmatmul(jnp.asarray(x), qw.values, qw.scales, 8, qw.group_size)
    np.testing.assert_allclose(np.asarray(got), x.astype(np.float64) @ np.asarray(dequantize(qw), np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("record", ["missing", "another library's"])
def test_a_planted_library_whose_digest_record_is_missing_or_wrong_is_never_loaded(
        built, kernel_dir, stand_in_compiler, planted_library, marker, record):
    name, good, _ = built
    shutil.copy(planted_library, kernel_dir / name)
    if record != "missing":
        (kernel_dir / (name + ".sha256")).write_text(sha256(good) + "\n")
    assert fresh_available(), native.status()
    assert not marker.exists()  # the planted file was replaced by a build, never loaded
    assert compilations(stand_in_compiler) == 1 and sha256(kernel_dir / name) == sha256(good)


@pytest.mark.parametrize("mode", [0o777, 0o757, 0o775], ids=oct)
def test_a_kernel_directory_others_can_write_is_refused_and_xla_runs_instead(built, kernel_dir, planted_library, marker, mode):
    # Even a library with a matching record is not loaded from there: whoever can write the
    # directory can write the record too.
    name, _, _ = built
    shutil.copy(planted_library, kernel_dir / name)
    (kernel_dir / (name + ".sha256")).write_text(sha256(planted_library) + "\n")
    kernel_dir.chmod(mode)
    before = sorted(p.name for p in kernel_dir.iterdir())
    assert not fresh_available()
    assert str(kernel_dir) in native.status() and f"writable by other users (mode {mode:#o})" in native.status()
    assert "JAXLLM_KERNEL_DIR" in native.status()
    assert not marker.exists() and sorted(p.name for p in kernel_dir.iterdir()) == before
    w = np.random.default_rng(2).standard_normal((1, 64, 32)).astype(np.float32)  # one stacked layer
    ready = devices.prepare({"layers": {"w_up": quantize(w, 4, 32)}})
    wq = ready["layers"][0]["w_up"]
    assert wq.impl == "xla_blocked" and not wq.tile  # the pure-XLA formulation
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    np.testing.assert_allclose(np.asarray(matmul(jnp.asarray(x), wq)), x @ np.asarray(dequantize(wq)), rtol=1e-5, atol=1e-5)


def test_a_kernel_directory_of_another_user_is_refused(built, kernel_dir, monkeypatch):
    name, good, _ = built
    shutil.copy(good, kernel_dir / name)
    (kernel_dir / (name + ".sha256")).write_text(sha256(good) + "\n")
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)  # as if another user ran this process
    assert not fresh_available()
    assert f"{kernel_dir} ($JAXLLM_KERNEL_DIR) is owned by uid {me}, not by this user (uid {me + 1})" in native.status()


@pytest.mark.parametrize("which", ["library", "record"])
def test_a_library_or_record_owned_by_another_user_is_refused(built, kernel_dir, planted_library, marker, monkeypatch, which):
    name, _, _ = built
    lib, rec = kernel_dir / name, kernel_dir / (name + ".sha256")
    shutil.copy(planted_library, lib)
    rec.write_text(sha256(planted_library) + "\n")
    foreign = (lib if which == "library" else rec).stat().st_ino
    real_fstat = os.fstat

    def fstat(fd):  # the file as another user's: the same stat, another owner
        st = real_fstat(fd)
        if st.st_ino != foreign:
            return st
        fields = list(st[:10])
        fields[stat.ST_UID] = os.geteuid() + 1
        return os.stat_result(fields)

    monkeypatch.setattr(os, "fstat", fstat)
    assert not fresh_available()
    assert f"{lib if which == 'library' else rec} is owned by uid {os.geteuid() + 1}" in native.status()
    assert not marker.exists()


def test_the_persistent_xla_cache_refuses_a_directory_others_can_write(tmp_path, monkeypatch):
    from jaxllm.compilation import enable_persistent_cache

    shared = tmp_path / "xla"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(CacheError, match=r"xla \(\$JAXLLM_CACHE_DIR\) is writable by other users \(mode 0o777\)"):
        enable_persistent_cache(shared)
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(CacheError, match=f"is owned by uid {me}, not by this user"):
        enable_persistent_cache(tmp_path / "new")
    assert jax.config.jax_compilation_cache_dir == before  # the cache was not switched to either


def test_private_dir_creates_missing_directories_0700_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = cachedirs.private_dir(tmp_path / "a" / "b", "JAXLLM_X")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(CacheError, match="is not a directory"):
        cachedirs.private_dir(tmp_path / "file", "JAXLLM_X")


def test_constraint_tables_are_not_read_from_or_written_to_a_directory_others_can_write(tokenizer, tmp_path, monkeypatch):
    c = constraints.Regex("(ab|ba)+c?")
    monkeypatch.setenv("JAXLLM_CONSTRAINT_CACHE", "off")
    want = constraints.compile_table(c, tokenizer)
    private = tmp_path / "private"
    monkeypatch.setenv("JAXLLM_CONSTRAINT_CACHE", str(private))
    constraints.compile_table(c, tokenizer)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    (cached,) = private.glob("*.npz")
    # A planted table under the same name: every state's acceptance flipped.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with np.load(cached) as z:
        np.savez(shared / cached.name, **{**z, "accepting": ~z["accepting"]})
    monkeypatch.setenv("JAXLLM_CONSTRAINT_CACHE", str(shared))
    with pytest.warns(UserWarning, match="writable by other users .*building constraint tables without it"):
        got = constraints.compile_table(c, tokenizer)
    for field in ("next", "token_class", "accepting", "cost"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert sorted(p.name for p in shared.iterdir()) == [cached.name]  # nothing written there either
