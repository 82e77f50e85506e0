"""What every fuzz case must end in, and how long the fuzz run is.

    JAXLLM_FUZZ_EXAMPLES=N   N random examples per property (each run draws new ones).
                             Unset (CI): each property's small default, derandomized, so
                             every run checks the same cases.

The outcome rule, for the CLIs (`sample.py`, `train.py`) and the API:

- exit code 0; or exit code 2 with a stderr whose last line is `PROG: error: MESSAGE` and is
  its only `error:` line; the other lines of stderr, if any, are the CLI's own notes (each
  starts with `PROG: `): no traceback, no stray output. train.py also exits 1, the same way,
  when the loss becomes NaN/inf (its documented stop).
- The API raises a `JaxllmError` whose message is one non-empty line, or succeeds.
- No case runs past its time bound (`time_bound`), and no write leaves a partial file behind
  (`partial_files`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st

from jaxllm.errors import JaxllmError

LONG_RUN = "JAXLLM_FUZZ_EXAMPLES" in os.environ


def fuzz_settings(default: int) -> settings:
    """`default` examples, derandomized (CI), or JAXLLM_FUZZ_EXAMPLES random ones; no deadline:
    compile times vary. One capsys serves every example (`run_cli` reads it before and after)."""
    return settings(
        max_examples=int(os.environ["JAXLLM_FUZZ_EXAMPLES"]) if LONG_RUN else default, deadline=None,
        derandomize=not LONG_RUN, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


def one_in(n: int, rare, common):
    """`rare` about once in `n` draws, else `common` (st.one_of would pick them evenly)."""
    return st.sampled_from([common] * (n - 1) + [rare]).flatmap(lambda s: s)


class Hang(AssertionError):
    """A case ran past its bound."""


@contextlib.contextmanager
def time_bound(seconds: float, what: str):
    """Fails the case if it runs longer than `seconds`: interrupted by SIGALRM in the main
    thread (pytest and its xdist workers run tests there), else checked when it returns."""
    start = time.monotonic()
    if threading.current_thread() is not threading.main_thread():
        yield
        if time.monotonic() - start > seconds:
            raise Hang(f"{what} took {time.monotonic() - start:.0f}s (bound {seconds}s)")
        return

    fired = []

    def alarm(signum, frame):
        fired.append(True)
        raise Hang(f"{what} ran past its bound of {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if fired:  # the code under test caught the first Hang (e.g. `except Exception`) and went on
        raise Hang(f"{what} ran past its bound of {seconds}s")


def run_cli(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Calls a CLI's `main(argv)` in this process -> (exit code, stdout, stderr).

    argparse exits through SystemExit; any other exception is a bug and propagates with its
    traceback (which fails the case)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse: --help (0) and bad flags (2)
        rc = 0 if e.code is None else e.code
    out, err = capsys.readouterr()
    return rc, out, err


def check_cli_outcome(prog: str, rc: int, err: str, argv, *, also_allowed: tuple[int, ...] = ()) -> None:
    """The CLI rule (module doc): 0, or 2 (or `also_allowed`) ending in one `PROG: error:` line.
    A line ends at "\n"; a "\r" (which a terminal shows as one) may not appear."""
    lines = err.removesuffix("\n").split("\n") if err else []
    context = f"{prog} {argv!r} -> exit {rc}, stderr:\n{err}"
    assert "Traceback" not in err and "\r" not in err, context
    assert all(line.startswith(f"{prog}: ") for line in lines), context
    if rc == 0:
        assert not any(f"{prog}: error:" in line for line in lines), context
        return
    assert rc in (2, *also_allowed), context
    assert lines and lines[-1].startswith(f"{prog}: error: ") and len(lines[-1]) > len(f"{prog}: error: "), context
    assert sum("error:" in line for line in lines) == 1, context


def check_api_error(e: JaxllmError) -> None:
    """A JaxllmError for people: one non-empty line."""
    message = str(e)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


# Names a writer uses while a file is incomplete: checkpoint.py/data.py write `.NAME.tmp` and
# rename, the constraint cache `KEY.PID.tmp.npz`, Orbax `STEP.orbax-checkpoint-tmp-*`.
PARTIAL_MARKERS = (".tmp", "orbax-checkpoint-tmp")
MODEL_FILES = ("config.json", "params.safetensors", "tokenizer.model")


def partial_files(root: Path) -> list[str]:
    """What an interrupted or failed write would leave under `root`: files or directories with
    a temporary name, and model directories missing one of their three files."""
    found = []
    for path in Path(root).rglob("*"):
        if any(m in path.name for m in PARTIAL_MARKERS):
            found.append(str(path.relative_to(root)))
    for directory in [Path(root), *(p for p in Path(root).rglob("*") if p.is_dir())]:
        present = [f for f in MODEL_FILES if (directory / f).exists()]
        if "params.safetensors" in present and len(present) < len(MODEL_FILES):
            found.append(f"{directory.relative_to(root)}: a model directory with only {present}")
    return found
