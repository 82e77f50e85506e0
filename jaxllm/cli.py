"""What every command line (sample.py, train.py, `python -m jaxllm.convert`) shares: an
error is one line, `PROG: error: ...`, and bad input exits with code 2.

This module imports nothing heavy (no JAX), so a script can parse its flags, and refuse bad
ones, before it loads the library.
"""

from __future__ import annotations

import argparse
import sys


def one_line(message: str) -> str:
    """A line break inside a message (from a path, flag or key the user wrote) is shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def fail(prog: str, message: str) -> int:
    """Prints `prog: error: message` as one line to stderr; -> 2, the exit code for bad input."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr)
    return 2


class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (no usage block) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")
