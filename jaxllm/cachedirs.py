"""The directories jaxllm caches things in, and the rule they share: only the user can write them.

    $JAXLLM_KERNEL_DIR        ~/.cache/jaxllm/kernels       the CPU kernel's shared library (native.py): code
    $JAXLLM_CACHE_DIR         ~/.cache/jaxllm/xla           XLA's persistent compilation cache: machine code
    $JAXLLM_CONSTRAINT_CACHE  ~/.cache/jaxllm/constraints   constraint token tables (.npz, no pickle)

Whoever can put a file into the first two runs code inside every jaxllm process that reads
them; into the third, decides which outputs a constraint lets through. Their file names come
from public inputs (source hashes, compiler versions), so they can be planted ahead of time. A
missing directory is created with mode 0700; an existing one, and any file loaded from it, is
used only when it belongs to the effective user and neither its group nor others may write it
(so a shared or world-writable directory is refused, and a group-writable one too: a group
often holds other users). Parent directories are not checked; the kernel's library is in
addition checked against a digest recorded when it was built (native.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from jaxllm.errors import CacheError


def problem(st: os.stat_result) -> str | None:
    """Why a file or directory with this stat is unsafe to load from, or None when it is safe."""
    uid = os.geteuid()
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):#o})"
    return None


def private_dir(path: str | os.PathLike, env: str) -> Path:
    """`path` as a directory only this user can write: created 0700 when missing (its parents
    as the umask says), checked when it exists. Raises CacheError naming the directory, what
    is wrong and `env`, the variable that moves it."""
    path = Path(path)
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise CacheError(f"cannot create the cache directory {path} (${env}): {e.strerror or e}") from None
    try:
        st = os.stat(path)  # through a symlink: what counts is the directory files are written to
    except OSError as e:
        raise CacheError(f"cannot read the cache directory {path} (${env}): {e.strerror or e}") from None
    why = "is not a directory" if not stat.S_ISDIR(st.st_mode) else problem(st)
    if why:
        raise CacheError(f"the cache directory {path} (${env}) {why}: not used "
                         f"(chmod 700 it, or set ${env} to a directory only you can write)")
    return path
