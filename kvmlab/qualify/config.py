"""What a qualification was asked to do: qualify.json, and a plan's config, typed.

Every key the file may hold, its default and its check are here, and only here: a new
qualification is made with ``Config``, and resume, shards, merge, the analysis and the
reports read one back with ``Config.from_json``, which names the first thing wrong
with a damaged or foreign file in one line. Keys an older kvmlab did not write take
the default it meant (a store without ``clock`` was measured on the wall clock; one
without ``workload`` ran memslot_perf).

The points of the matrix are kept under the name of the workload's axis (``slots``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace

from kselftest_py.workload import Workload
from kvmlab import stats
from kvmlab.errors import KvmlabError, shown
from kvmlab.qualify import workloads
from kvmlab.vm.clock import ICOUNT, WALL

SIDES = ("base", "patched")
#: Upper bounds of what a qualification may ask for, each far beyond any use seen (a
#: 32k-slot run takes minutes under TCG): a typo of 999999999 runs is refused, not run.
MAX_RUNS = 1000
MAX_SECONDS = 3600.0
MAX_SETUP_BUDGET = 86400.0
MAX_CPUS = 64
MAX_POINT = 1 << 20
#: A plan's id: hex digits of a sha256 (``plan.plan_id``).
PLAN_ID = re.compile(r"[0-9a-f]{8,64}")


@dataclass(frozen=True)
class Side:
    """One kernel of the A/B, as it was resolved when the qualification was made."""

    spec: str
    exact: str
    release: str | None = None
    version: str | None = None
    patches: tuple[dict, ...] | None = None
    """name and sha256 of each patch (kvm-modules: kernels)."""
    append: str = ""
    """Kernel arguments for this side's guests only."""

    def to_json(self) -> dict:
        data = {"spec": self.spec, "exact": self.exact, "release": self.release, "version": self.version}
        if self.patches:
            data["patches"] = [dict(patch) for patch in self.patches]
        if self.append:
            data["append"] = self.append
        return data


@dataclass(frozen=True)
class Config:
    base: Side
    patched: Side
    tests: tuple[str, ...]
    points: tuple[int, ...]
    runs: int
    seconds: float
    threshold: float
    workload_name: str = workloads.DEFAULT
    clock: str = WALL
    method: str = stats.MANN_WHITNEY
    boot_per_round: bool = False
    """Each round in guests of its own (icount): the spread between boots is in every cell."""
    cpus: int | None = None
    emulator: dict | None = None
    """The QEMU measured with: ``version`` and Debian ``package``."""
    cpu: str | None = None
    accel: str | None = None
    append: str = ""
    trace: dict | None = None
    check_invariants: bool = False
    reference: dict | None = None
    setup_budget: float | None = None
    fresh_boot: bool = False
    created: str | None = None
    plan: dict | None = None
    """A shard's plan: ``id``, ``shard``, ``shards``."""
    cells: tuple[tuple[str, int], ...] | None = None
    """A shard's cells (None: the whole matrix)."""
    merged: dict | None = None
    """A merged qualification's plan id and shard directories."""
    extra: dict = field(default_factory=dict, compare=False)
    """Keys a newer kvmlab wrote that this one does not know: kept, so a rewrite loses nothing."""

    @property
    def workload(self) -> Workload:
        return workloads.get(self.workload_name)

    def side(self, name: str) -> Side:
        return self.base if name == "base" else self.patched

    def kernel_arguments(self, side: str) -> str:
        """What ``side``'s guests append to the kernel command line: ``append``, then the side's own."""
        return " ".join(filter(None, (self.append, self.side(side).append)))

    def with_(self, **changes) -> Config:
        return replace(self, **changes)

    def common(self) -> Config:
        """What every shard of one plan has alike: without its cells, plan and creation time."""
        return replace(self, created=None, plan=None, cells=None, merged=None)

    # -- JSON -------------------------------------------------------------------------
    def to_json(self) -> dict:
        data = {"base": self.base.to_json(), "patched": self.patched.to_json(),
                "workload": self.workload_name,
                "tests": list(self.tests), self.workload.axis.name: list(self.points)}
        for name in _PLAIN:
            value = getattr(self, name)
            if name in _WRITTEN_WHEN_SET and not value:
                continue
            data[name] = list(map(list, value)) if name == "cells" and value is not None else value
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data) -> Config:
        """The config in ``data`` (a qualify.json's object), or a KvmlabError naming what is wrong."""
        problem = _problem(data)
        if problem:
            raise KvmlabError(problem)
        workload = workloads.get(data.get("workload", workloads.DEFAULT))
        sides = {name: _side(data[name]) for name in SIDES}
        known = {"base", "patched", "workload", "tests", workload.axis.name, *_PLAIN}
        plain = {name: data[name] for name in _PLAIN if name in data}
        if plain.get("cells") is not None:
            plain["cells"] = tuple((test, point) for test, point in plain["cells"])
        return cls(**sides, workload_name=workload.name, tests=tuple(data["tests"]),
                   points=tuple(data[workload.axis.name]), **plain,
                   extra={key: value for key, value in data.items() if key not in known})


_FIXED = ("base", "patched", "tests", "points", "workload_name", "extra")
_PLAIN = tuple(f.name for f in fields(Config) if f.name not in _FIXED)
#: Keys an older kvmlab wrote only when they were set; written the same way.
_WRITTEN_WHEN_SET = ("setup_budget", "fresh_boot", "created", "plan", "cells", "merged")


def _side(data: dict) -> Side:
    patches = data.get("patches")
    return Side(data["spec"], data["exact"], data.get("release"), data.get("version"),
                tuple(patches) if patches else None, data.get("append", ""))


# -- checks ----------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    if _is_int(value):
        return abs(value) < 2**63
    return isinstance(value, float) and math.isfinite(value)


def _is_patches(value) -> bool:
    return value is None or (isinstance(value, list) and all(
        isinstance(patch, dict) and all(isinstance(patch.get(key), str) for key in ("name", "sha256"))
        for patch in value))


def _is_plan(value) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        return False
    if not PLAN_ID.fullmatch(value["id"]):
        return False
    shard, shards = value.get("shard"), value.get("shards")
    return _is_int(shard) and _is_int(shards) and 1 <= shard <= shards


#: What a key may hold, by the words an error message uses for it.
_TYPES = {
    "a positive number": lambda value: _is_number(value) and value > 0,
    f"a positive number of seconds up to {MAX_SECONDS:g}": lambda value: _is_number(value)
    and 0 < value <= MAX_SECONDS,
    f"a positive number of seconds up to {MAX_SETUP_BUDGET:g}": lambda value: _is_number(value)
    and 0 < value <= MAX_SETUP_BUDGET,
    "a fraction in [0, 1)": lambda value: _is_number(value) and 0 <= value < 1,
    f"an integer from 1 to {MAX_CPUS} or null": lambda value: value is None or (
        _is_int(value) and 1 <= value <= MAX_CPUS),
    f"an integer from 2 to {MAX_RUNS}": lambda value: _is_int(value) and 2 <= value <= MAX_RUNS,
    "a statistical method (" + " or ".join(stats.METHODS) + ")": lambda value: value in stats.METHODS,
    "a shard of a plan (id, shard, shards) or null": _is_plan,
    "a list of patches (name, sha256) or null": _is_patches,
    "a string or null": lambda value: value is None or isinstance(value, str),
    "an object or null": lambda value: value is None or isinstance(value, dict),
    "true or false": lambda value: isinstance(value, bool),
    "icount or wall": lambda value: value in (ICOUNT, WALL),
    "a string": lambda value: isinstance(value, str),
    "a list of test names, each once": lambda value: isinstance(value, list) and bool(value)
    and all(isinstance(v, str) for v in value) and len(set(value)) == len(value),
    "published figures": lambda value: value is None or (
        isinstance(value, dict) and isinstance(value.get("rows"), list)
        and all(isinstance(row, dict) and isinstance(row.get("test"), str)
                and _is_number(row.get("before")) and _is_number(row.get("after")) and row["before"] > 0
                and isinstance(row.get("source"), str) for row in value["rows"])),
    "a list of cells": lambda value: value is None or (isinstance(value, list) and all(
        isinstance(cell, list) and len(cell) == 2 and isinstance(cell[0], str) and _is_int(cell[1])
        for cell in value)),
}
_REQUIRED = {"tests": "a list of test names, each once", "runs": f"an integer from 2 to {MAX_RUNS}",
             "seconds": f"a positive number of seconds up to {MAX_SECONDS:g}",
             "threshold": "a fraction in [0, 1)"}
_OPTIONAL = {"cpus": f"an integer from 1 to {MAX_CPUS} or null", "clock": "icount or wall",
             "method": "a statistical method (" + " or ".join(stats.METHODS) + ")",
             "boot_per_round": "true or false", "emulator": "an object or null", "cpu": "a string or null",
             "check_invariants": "true or false", "append": "a string", "trace": "an object or null",
             "accel": "a string or null", "reference": "published figures",
             "setup_budget": f"a positive number of seconds up to {MAX_SETUP_BUDGET:g}",
             "fresh_boot": "true or false", "created": "a string or null",
             "plan": "a shard of a plan (id, shard, shards) or null",
             "cells": "a list of cells", "merged": "an object or null", "workload": "a string"}


def _problem(data) -> str | None:
    """What is wrong with a qualify.json's object, or None."""
    if not isinstance(data, dict):
        return f"a JSON object is expected, found {type(data).__name__}"
    for side in SIDES:
        problem = _side_problem(data.get(side))
        if problem:
            return f"{side!r} {problem}"
    name = data.get("workload", workloads.DEFAULT)
    if not isinstance(name, str) or name not in workloads.names():
        return f"unknown workload {shown(name)} (known: {', '.join(workloads.names())})"
    axis = workloads.get(name).axis
    for key, wanted in _REQUIRED.items():
        if key not in data:
            return f"no {key!r}"
        if not _TYPES[wanted](data[key]):
            return f"{key!r} wants {wanted}, found {shown(data[key])}"
    points = data.get(axis.name)
    if points is None:
        return f"no {axis.name!r}"
    if not (isinstance(points, list) and points and len(set(map(repr, points))) == len(points)
            and all(_is_int(p) and axis.minimum <= p <= MAX_POINT for p in points)):
        wanted = f"a list of {axis.noun} counts from {axis.minimum} to {MAX_POINT}, each once"
        return f"{axis.name!r} wants {wanted}, found {shown(points)}"
    for key, wanted in _OPTIONAL.items():
        if key in data and not _TYPES[wanted](data[key]):
            return f"{key!r} wants {wanted}, found {shown(data[key])}"
    unknown = [test for test in data["tests"] if test not in workloads.get(name).tests]
    if unknown:
        return f"unknown test {shown(unknown[0])} (a {name} qualification)"
    matrix = {(test, point) for test in data["tests"] for point in points}
    cells = data.get("cells")
    chosen = {tuple(cell) for cell in cells} if cells is not None else set()
    if cells is not None and not (len(chosen) == len(cells) and chosen <= matrix):
        return "'cells' wants cells of its own matrix, each once"
    return None


def _side_problem(kernel) -> str | None:
    """What is wrong with one side's kernel record, or None."""
    if not isinstance(kernel, dict) or not all(isinstance(kernel.get(k), str) for k in ("spec", "exact")):
        return f"wants the kernel's spec and exact spec, found {shown(kernel)}"
    for key in ("release", "version"):
        if kernel.get(key) is not None and not isinstance(kernel[key], str):
            return f"{key!r} wants a string or null, found {shown(kernel[key])}"
    if not _is_patches(kernel.get("patches")):
        return f"'patches' wants a list of patches (name, sha256) or null, found {shown(kernel['patches'])}"
    if not isinstance(kernel.get("append", ""), str):
        return f"'append' wants a string, found {shown(kernel['append'])}"
    return None


