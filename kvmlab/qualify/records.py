"""The store's records, typed: each kind and what it holds, spelled once.

The lanes make these and the store writes them as one JSON object a line, the run's
point under the name of the workload's axis (``slots``), a run's metrics under their
keys; ``REQUIRED`` is what each kind must hold when read back, which the store checks.
Kinds: ``Run`` (a measured run), ``Skip`` (the kernel or the test cannot take this
cell: n/a, with the reason, for every run of that kernel in the cell), ``Fail`` (the
test failed), ``Crash`` (the guest hung, crashed or vanished, during a run or, with no
run, while idle), ``Splat`` (a kernel report on the console of a guest that went on),
``Invariant`` (a memslot invariant violation, or checks that could not run), ``Checks``
(a guest's invariant-check summary when it shut down), ``Conditions`` (what a boot's
KVM ran with).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

#: The point's field, named by the workload's axis when written.
POINT = "<axis>"


@dataclass(frozen=True)
class Record:
    """Which side, and which run of which cell (None: a record about a guest, not a run)."""

    KIND: ClassVar[str] = ""
    REQUIRED: ClassVar[dict[str, str]] = {}
    OPTIONAL: ClassVar[dict[str, str]] = {"boot": "a string"}
    """What a field holds when a record has it (an older kvmlab may not have written it)."""
    side: str
    test: str | None = None
    point: int | None = None
    run: int | None = None

    def to_json(self, axis: str) -> dict:
        data = {"kind": self.KIND, "side": self.side, "test": self.test, axis: self.point, "run": self.run}
        for spec in fields(self)[4:]:
            value = getattr(self, spec.name)
            if spec.metadata.get("flat"):
                data.update(value)
            else:
                data[spec.name] = value
        return data


def _flat():
    """A mapping whose keys go into the record itself (a run's figures, where its guest came from)."""
    return field(default_factory=dict, metadata={"flat": True})


@dataclass(frozen=True)
class Run(Record):
    KIND: ClassVar[str] = "run"
    REQUIRED: ClassVar[dict[str, str]] = {"test": "a string", POINT: "an integer",
                                          "run": "an integer of at least 0", "release": "a string"}
    OPTIONAL: ClassVar[dict[str, str]] = {"boot": "a string", "trace_dir": "a path inside the store or null"}
    figures: dict = _flat()
    """The workload's metrics and kept fields (``Workload.figures``)."""
    release: str = "?"
    boot: str = ""
    origin: dict = _flat()
    """restored, and the template and its boot when it was."""
    elapsed_s: float = 0.0
    lane: int = 0
    trace: dict = _flat()
    """``trace_dir`` when the run was traced."""


@dataclass(frozen=True)
class Skip(Record):
    KIND: ClassVar[str] = "skip"
    REQUIRED: ClassVar[dict[str, str]] = {"test": "a string", POINT: "an integer", "reason": "a string"}
    reason: str = ""


@dataclass(frozen=True)
class Fail(Record):
    KIND: ClassVar[str] = "fail"
    REQUIRED: ClassVar[dict[str, str]] = {"test": "a string", POINT: "an integer",
                                          "run": "an integer of at least 0", "reason": "a string"}
    reason: str = ""


@dataclass(frozen=True)
class Crash(Record):
    KIND: ClassVar[str] = "crash"
    REQUIRED: ClassVar[dict[str, str]] = {"outcome": "a string", "message": "a string or null"}
    OPTIONAL: ClassVar[dict[str, str]] = {"boot": "a string", "vmcore": "a string or null"}
    outcome: str = ""
    message: str | None = None
    boot: str = ""
    vmcore: str | None = None


@dataclass(frozen=True)
class Splat(Record):
    KIND: ClassVar[str] = "splat"
    REQUIRED: ClassVar[dict[str, str]] = {"summary": "a string"}
    summary: str = ""
    excerpt: str = ""
    boot: str = ""


@dataclass(frozen=True)
class Invariant(Record):
    KIND: ClassVar[str] = "invariant"
    REQUIRED: ClassVar[dict[str, str]] = {"summary": "a string"}
    summary: str = ""
    violations: list = field(default_factory=list)
    error: str | None = None
    boot: str = ""


@dataclass(frozen=True)
class Checks(Record):
    KIND: ClassVar[str] = "checks"
    REQUIRED: ClassVar[dict[str, str]] = {"checks": "an integer of at least 0",
                                          "max_slots": "an integer of at least 0",
                                          "violations": "an integer of at least 0"}
    checks: int = 0
    checks_with_vms: int = 0
    max_slots: int = 0
    violations: int = 0
    boot: str = ""


@dataclass(frozen=True)
class Conditions(Record):
    KIND: ClassVar[str] = "conditions"
    REQUIRED: ClassVar[dict[str, str]] = {"conditions": "an object of strings", "boot": "a string"}
    conditions: dict = field(default_factory=dict)
    boot: str = ""
    origin: dict = _flat()


KINDS: dict[str, type[Record]] = {kind.KIND: kind for kind in (Run, Skip, Fail, Crash, Splat, Invariant,
                                                              Checks, Conditions)}
RUN, SKIP, FAIL, CRASH = Run.KIND, Skip.KIND, Fail.KIND, Crash.KIND
SPLAT, INVARIANT, CHECKS, CONDITIONS = Splat.KIND, Invariant.KIND, Checks.KIND, Conditions.KIND
