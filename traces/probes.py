"""Named probe sets: what ``kvmlab run --trace SET`` asks ftrace to record.

A set is ``traces/probes/<name>.toml``: a description, the tracer, the functions to
time and the events to record. The guest resolves it against the kernel under test
(``traces.guest.capture``): what the kernel lacks is skipped and listed there.
"""

import tomllib
from pathlib import Path

from traces.errors import TraceError


class ProbeError(TraceError):
    """A probe set that does not exist or does not parse."""


PROBES = Path(__file__).resolve().parent / "probes"
TRACERS = ("function_graph", "function", "nop")


def names() -> list[str]:
    return sorted(path.stem for path in PROBES.glob("*.toml"))


def load(name: str) -> dict:
    """The probe set ``name`` (or a path to a .toml file), checked, as a plain dict."""
    path = Path(name) if name.endswith(".toml") else PROBES / f"{name}.toml"
    if not path.exists():
        raise ProbeError(f"no probe set {name!r}; known sets: {', '.join(names())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ProbeError(f"probe set {path}: {err}") from None
    tracer = data.get("tracer", "function_graph")
    functions, events = data.get("functions", []), data.get("events", [])
    if tracer not in TRACERS:
        raise ProbeError(f"probe set {path}: tracer {tracer!r} is not one of {', '.join(TRACERS)}")
    if not all(isinstance(f, str) for f in functions + events) or not (functions or events):
        raise ProbeError(f"probe set {path}: wants non-empty lists of strings 'functions' and/or 'events'")
    return {"set": path.stem, "tracer": tracer, "functions": functions, "events": events,
            "description": data.get("description", "")}
