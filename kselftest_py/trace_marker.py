"""Marks in the ftrace buffer, so a trace can be cut into the tests that ran.

When a job runs under ``kvmlab run --trace`` (``traces.guest.capture`` sets
``KVMLAB_TRACE_MARKERS``), each phase of a test writes a JSON line to tracefs's
``trace_marker``; it shows in trace.dat as an ``ftrace:print`` event at the moment it
was written, e.g. ``kvmlab {"edge": "begin", "phase": "loop", "test": "unmap",
"slots": 10, "run": 0}``. The host splits the calls table by these intervals.
Without the variable, or without a writable trace_marker, marks cost nothing.
"""

from __future__ import annotations

import json
import os

ENV = "KVMLAB_TRACE_MARKERS"
PREFIX = "kvmlab "
_PATH = "/sys/kernel/tracing/trace_marker"
_handle = None
_enabled = os.environ.get(ENV) == "1"


def line(edge: str, phase: str, **labels) -> str:
    """One mark as written to trace_marker (``traces.segments`` reads it back)."""
    return PREFIX + json.dumps({"edge": edge, "phase": phase, **labels}) + "\n"


def mark(edge: str, phase: str, **labels) -> None:
    """Write ``edge`` ("begin" or "end") of ``phase`` with its labels, if tracing."""
    global _handle, _enabled
    if not _enabled:
        return
    try:
        if _handle is None:
            _handle = open(_PATH, "w")  # noqa: SIM115 - kept open for the process's life
        _handle.write(line(edge, phase, **labels))
        _handle.flush()
    except OSError:
        _enabled = False  # no tracefs here: stay quiet, the job is what matters
