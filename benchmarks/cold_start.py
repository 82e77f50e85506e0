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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, str(ROOT / "sample.py"), "--prompt", "def fibonacci(n):", "--max_new_tokens", "64"]
CACHES = ("JAXLLM_KERNEL_DIR", "JAXLLM_CACHE_DIR", "JAXLLM_CONSTRAINT_CACHE")


def timed_run(caches: Path, verbose: bool) -> tuple[float, str]:
    """(seconds from start to exit, sample.py's --verbose report or '') for one run on `caches`."""
    env = {**os.environ, **{name: str(caches / name.lower()) for name in CACHES}}
    command = COMMAND + (["--verbose"] if verbose else [])
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"cold_start.py: sample.py failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    report = [line for line in done.stderr.splitlines() if line.startswith("sample.py: ")] if verbose else []
    return seconds, "\n".join(report)


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
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="jaxllm-cold-") as tmp:
        for i in range(args.runs):
            caches = Path(tmp) / f"run{i}"  # new, empty cache directories: a fresh machine
            seconds, report = timed_run(caches, args.verbose)
            cold.append(seconds)
            print(f"cold {i + 1}: {seconds:.2f} s" + (f"\n{report}" if report else ""), flush=True)
        for i in range(args.runs):
            seconds, report = timed_run(caches, args.verbose)  # the last cold run's caches, now filled
            warm.append(seconds)
            print(f"warm {i + 1}: {seconds:.2f} s" + (f"\n{report}" if report else ""), flush=True)
    print(f"cold: best {min(cold):.2f} s (runs {', '.join(f'{s:.2f}' for s in cold)}); "
          f"warm: best {min(warm):.2f} s (runs {', '.join(f'{s:.2f}' for s in warm)}); "
          f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")


if __name__ == "__main__":
    main()
