"""The tracefs files the guest-side capture reads and writes (standard library only)."""

from __future__ import annotations

import os

ROOT = "/sys/kernel/tracing"


def path(*parts: str) -> str:
    return os.path.join(ROOT, *parts)


def read(*parts: str) -> str:
    with open(path(*parts)) as handle:
        return handle.read()


def write(name: str, value: str) -> None:
    """Replace a control file's value (tracing_on, buffer_percent...)."""
    with open(path(name), "w") as handle:
        handle.write(value)


def append(*parts_and_line: str) -> None:
    """Add one line to a list file (kprobe_events, synthetic_events, a trigger).

    O_APPEND by hand: Python's "a" mode seeks to the end first, which tracefs's
    kprobe_events and synthetic_events refuse with EINVAL.
    """
    *parts, line = parts_and_line
    fd = os.open(path(*parts), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)
