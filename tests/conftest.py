"""Shared fixtures: the kvmlab command as a user runs it, and a QEMU process census."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def kvmlab(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the installed ``kvmlab`` CLI exactly as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "kvmlab.cli", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout, check=False,
    )


def qemu_pids() -> set[int]:
    """Every running qemu-system process on this machine."""
    done = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True)
    return {int(pid) for pid in done.stdout.split()}


@pytest.fixture
def no_leaked_qemu():
    """Fail the test if it leaves a QEMU process behind."""
    before = qemu_pids()
    yield
    leaked = qemu_pids() - before
    assert not leaked, f"QEMU processes left behind: {sorted(leaked)}"
