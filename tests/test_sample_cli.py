"""sample.py end to end on a checkpoint made here; bad input exits 2 with one line naming the flag."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jaxllm import generate, save_checkpoint
from conftest import REPO


@pytest.fixture(scope="module")
def checkpoint(cfg, params, tokenizer, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", params, cfg, tokenizer)


def run(*args):
    env = {**os.environ, "JAXLLM_CACHE_DIR": str(REPO / ".jax_cache")}
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_prints_the_same_completion_as_the_library(checkpoint, cfg, params, tokenizer):
    proc = run("--checkpoint", checkpoint, "--prompt", "def f(x):", "--prompt", "for i", "--max_new_tokens", 8, "--temperature", 0, "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    want = generate(params, cfg, ["def f(x):", "for i"], tokenizer=tokenizer, max_new_tokens=8, temperature=0.0).texts
    assert proc.stdout == "def f(x):" + want[0] + "\n\n" + "-" * 40 + "\nfor i" + want[1] + "\n"


@pytest.mark.parametrize(
    "args,named",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--max_new_tokens", "0"], "--max_new_tokens"),
        (["--seed", "-3"], "--seed"),
        (["--max_new_tokens", "many"], "--max_new_tokens"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(checkpoint, args, named):
    proc = run("--checkpoint", checkpoint, "--prompt", "x", *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and named in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_checkpoint_and_too_long_prompt_exit_2(checkpoint, tmp_path):
    proc = run("--checkpoint", tmp_path / "nowhere", "--prompt", "x")
    assert proc.returncode == 2 and "not found" in proc.stderr and proc.stderr.count("\n") == 1
    proc = run("--checkpoint", checkpoint, "--prompt", "word " * 200, "--max_new_tokens", 8)
    assert proc.returncode == 2 and "context" in proc.stderr and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
