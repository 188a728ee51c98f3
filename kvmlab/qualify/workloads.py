"""The workloads ``kvmlab qualify`` can run, by name (``--workload NAME``).

Each is a kselftest_py test's own declaration (``kselftest_py.workload``): its tests,
the axis a qualification sweeps, its metrics and how one run is invoked. The matrix,
the store, the analysis, the reports and the command line read only these; adding a
workload is writing its guest module and registering its ``WORKLOAD`` here.
"""

from __future__ import annotations

from kselftest_py import dirty_log_perf, memslot_perf
from kselftest_py.workload import Workload
from kvmlab.errors import KvmlabError

DEFAULT = memslot_perf.WORKLOAD.name
_KNOWN: dict[str, Workload] = {}


def register(workload: Workload) -> Workload:
    """Make ``workload`` known by its name; a second one of that name replaces the first."""
    _KNOWN[workload.name] = workload
    return workload


def names() -> list[str]:
    return list(_KNOWN)


def get(name: str) -> Workload:
    try:
        return _KNOWN[name]
    except KeyError:
        raise KvmlabError(f"--workload: unknown workload {name!r}; known: {', '.join(_KNOWN)}") from None


register(memslot_perf.WORKLOAD)
register(dirty_log_perf.WORKLOAD)
