"""CI cannot pass without its correctness oracle: when .ci/run asks for the reference stack
(torch + transformers), a failed install stops CI and a missing stack fails the parity tests."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, REQUIRE_REFERENCE

PARITY = ["tests/test_hf_parity.py", "tests/test_sampling.py::test_matches_transformers_processors"]


def run_parity_tests_without_torch(tmp_path, require: bool):
    """The parity tests in a fresh pytest where `import torch` fails (a stand-in package shadows it)."""
    fake = tmp_path / "shadow" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is broken here on purpose')\n")
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_REFERENCE}
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent), env.get("PYTHONPATH", "")])
    if require:
        env[REQUIRE_REFERENCE] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_parity_tests_skip_without_the_reference_stack(tmp_path):
    proc = run_parity_tests_without_torch(tmp_path, require=False)
    assert proc.returncode == 0, proc.stdout
    assert "skipped" in proc.stdout and "passed" not in proc.stdout and "failed" not in proc.stdout


def test_parity_tests_fail_when_ci_requires_the_reference_stack(tmp_path):
    proc = run_parity_tests_without_torch(tmp_path, require=True)
    assert proc.returncode != 0
    assert f"{REQUIRE_REFERENCE}=1 but the reference stack does not import" in proc.stdout
    assert "skipped" not in proc.stdout


def run_ci_script(tmp_path, torch_installs: bool):
    """.ci/run with a stand-in `python3` that records each call (and the variable) and fails the
    torch install when told to: -> (exit code, recorded calls)."""
    log = tmp_path / "calls.log"
    shim = tmp_path / "bin" / "python3"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "${REQUIRE_REFERENCE}|$*" >> "{log}"\n'
                    f'case "$*" in *torch==*) exit {0 if torch_installs else 1};; esac\nexit 0\n')
    shim.chmod(0o755)
    for tool in ("apt-get", "sudo"):  # where chromium is missing, .ci/run installs it: never for real here
        stub = shim.parent / tool
        stub.write_text(f'#!/bin/sh\necho "{tool}|$*" >> "{log}"\nexit 0\n')
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_REFERENCE}
    env["PATH"] = f"{shim.parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)
    return proc.returncode, log.read_text().splitlines() if log.exists() else []


def test_ci_stops_when_the_reference_stack_does_not_install(tmp_path):
    code, calls = run_ci_script(tmp_path, torch_installs=False)
    assert code != 0
    assert any("torch==" in c for c in calls) and not any("-m pytest" in c for c in calls)


def test_ci_runs_the_suite_requiring_the_reference_stack(tmp_path):
    code, calls = run_ci_script(tmp_path, torch_installs=True)
    assert code == 0
    assert [c.split("|")[0] for c in calls if "-m pytest" in c] == ["1"]
