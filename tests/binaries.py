"""Helpers to run the binaries as a user does, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_binary(module: str, *args: str, timeout: int = 900, check: bool = True):
    """Runs ``python -m module args`` from the repository root; returns the CompletedProcess."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed:\n{result.stderr[-6000:]}")
    return result


def start_binary(module: str, *args: str, log_path: str) -> subprocess.Popen:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = open(log_path, "w")
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
