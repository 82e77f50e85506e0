"""Cold start: the wall time of one `python sample.py` on a fresh machine, then warm.

    python benchmarks/cold_start.py                  # 3 cold runs (best counts), then 3 warm ones
    python benchmarks/cold_start.py --runs 5 --verbose

Times, in a subprocess, `python sample.py --prompt "def fibonacci(n):" --max_new_tokens 64`
(the bundled model) from start to exit. "Fresh" means jaxllm's on-disk caches are empty: each
cold run gets new temporary directories for the CPU kernel (`JAXLLM_KERNEL_DIR`), the
persistent XLA compilation cache (`JAXLLM_CACHE_DIR`) and the constraint tables
(`JAXLLM_CONSTRAINT_CACHE`). Warm runs reuse the last cold run's directories. What a real fresh
machine would add and this cannot undo: reading Python and the libraries from disk (they are in
the page cache here) and writing their bytecode (pip writes it at install).

--verbose adds sample.py's --verbose to every run and prints its report (the params' layout,
programs compiled or loaded from the persistent cache) after each time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, str(ROOT / "sample.py"), "--prompt", "def fibonacci(n):", "--max_new_tokens", "64"]
CACHES = ("JAXLLM_KERNEL_DIR", "JAXLLM_CACHE_DIR", "JAXLLM_CONSTRAINT_CACHE")


def timed_run(caches: Path, verbose: bool) -> tuple[float, float, str]:
    """(wall seconds from start to exit, CPU seconds it used, sample.py's --verbose report or '')
    for one run on `caches`. The CPU seconds barely change with other jobs on the machine."""
    env = {**os.environ, **{name: str(caches / name.lower()) for name in CACHES}}
    command = COMMAND + (["--verbose"] if verbose else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode:
        sys.exit(f"cold_start.py: sample.py failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    report = [line for line in done.stderr.splitlines() if line.startswith("sample.py: ")] if verbose else []
    return seconds, cpu, "\n".join(report)


def versions() -> str:
    import jax
    import jaxlib
    import numpy

    return f"Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, numpy {numpy.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="cold runs (the best counts), and as many warm ones")
    ap.add_argument("--verbose", action="store_true", help="pass --verbose to sample.py and show its report")
    args = ap.parse_args()

    load = os.getloadavg()[0]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{when} · {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs · {versions()}")
    print("command: " + " ".join(f'"{a}"' if " " in a else a for a in COMMAND[1:]))
    runs = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="jaxllm-cold-") as tmp:
        for kind in runs:
            for i in range(args.runs):
                if kind == "cold":
                    caches = Path(tmp) / f"run{i}"  # new, empty cache directories: a fresh machine
                seconds, cpu, report = timed_run(caches, args.verbose)  # warm: the last cold run's caches
                runs[kind].append((seconds, cpu))
                print(f"{kind} {i + 1}: {seconds:.2f} s wall, {cpu:.2f} s CPU" + (f"\n{report}" if report else ""), flush=True)
    for kind, times in runs.items():
        best = min(times)
        print(f"{kind}: best {best[0]:.2f} s wall ({best[1]:.2f} s CPU); runs "
              + ", ".join(f"{s:.2f}" for s, _ in times))
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
