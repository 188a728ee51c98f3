"""What a kselftest_py test declares to be qualified: ``kvmlab qualify --workload NAME``.

A qualification runs a matrix of the test's tests × points on one axis of it (the
memslot count, for memslot_perf and dirty_log_perf), each cell N times per kernel, one
run per invocation, and compares the figures each run's JSON result holds. The host
reads these declarations and nothing else about a test: adding a workload is writing
its guest module, which builds its ``WORKLOAD``, and registering it with the host
(``kvmlab.qualify.workloads``).

What every workload's JSON result holds (``--json FILE``), as memslot_perf writes it:

- ``kernel_release``: ``uname -r`` in the guest;
- ``tests``: one ``{"test": NAME, "result": "pass"|"skip"|"fail", "reason": ...}`` per
  test run; with exit code 4 (kselftest's skip) and a skip first, the cell is n/a on
  that kernel, for that reason;
- ``runs``: one object per run, holding at least each metric's ``key``.

Standard library only: the guest imports this module too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A figure in each run's result: ``key`` in ``runs[0]``, which the store keeps under
    the same name."""

    key: str
    per: str
    """What one value is the time of, as a plot's title says it: "per iteration", "per VM"."""
    unit: str = "ns"
    lower_is_better: bool = True


@dataclass(frozen=True)
class Measure:
    """A row of the report: one metric over the runs of some of the tests."""

    name: str
    metric: str
    tests: tuple[str, ...]
    per_point: bool = False
    """Fit its growth per point (setting up n slots is n additions: fit the time per slot)."""
    point_sized: bool = False
    """Its work also grows with the size of one slot, which the test shrinks as 1/n: the
    fit takes 1/n as a covariate, so that its share is not credited to the lookup."""


@dataclass(frozen=True)
class Axis:
    """The axis a qualification sweeps: the value a run is invoked with, per cell."""

    name: str
    """Its key in the store's records and the qualification's config: "slots"."""
    title: str
    """How a plot's axis names it: "memslots"."""
    noun: str
    """One unit of it, as the text counts them: "slot" (slot counts, per slot)."""
    heading: str
    """A table's heading for one point, ``{}`` standing for it: "{} slots in use"."""
    defaults: tuple[int, ...]
    minimum: int
    short: tuple[tuple[int, str], ...] = ()
    """Points the tables name otherwise: ((32764, "32k"),)."""

    def label(self, point: int) -> str:
        return dict(self.short).get(point, str(point))


@dataclass(frozen=True)
class Claim:
    """The growth a patch series claims for a workload's measures, in the classes
    ``kvmlab.stats.complexity_fit`` knows, before (base) and after (patched)."""

    text: str
    base: tuple[str, ...]
    patched: tuple[str, ...]


@dataclass(frozen=True)
class Workload(ABC):
    """A test as ``kvmlab qualify`` runs it. Subclasses say how one run is invoked."""

    name: str
    module: str
    tests: tuple[str, ...]
    axis: Axis
    metrics: tuple[Metric, ...]
    summary: str
    """What the report says a run measures: "time per iteration (slot setup: per VM)"."""
    complexity: str = "value against the point, fitted as a + b·f(n), best by AIC; R² of the best"
    """What the report's complexity table fits, in a phrase."""
    claim: Claim | None = None
    suite: str = ""
    """The JUnit classname's first word (the workload's name when empty)."""
    kept: tuple[str, ...] = ()
    """Other fields of a run's result the store keeps beside the metrics."""
    columns: tuple[str, ...] = ()
    """Of those, the ones runs.csv shows after the metrics."""

    def measures(self, tests: tuple[str, ...]) -> list[Measure]:
        """The report's rows when ``tests`` run: by default each metric of each test."""
        return [Measure(test if len(self.metrics) == 1 else f"{test}: {metric.key}", metric.key, (test,))
                for test in tests for metric in self.metrics]

    @abstractmethod
    def argv(self, test: str, point: int, seconds: float, result_file: str,
             setup_budget: float | None = None) -> list[str]:
        """The guest command of one run of ``test`` at ``point``, writing its result to ``result_file``."""

    def figures(self, result: dict) -> dict:
        """What the store keeps of a passed run's JSON result: each metric, and ``kept``."""
        run = result["runs"][0]
        return {**{metric.key: run[metric.key] for metric in self.metrics},
                **{name: run.get(name) for name in self.kept}}

    def run_length(self, seconds: float) -> str:
        """How long one run is, as the report says it ("0.5 s"; a test that runs a number of
        iterations instead of a time says so)."""
        return f"{seconds} s"

    def cost(self, point: int) -> float:
        """A run's cost at ``point``, relative to the others (shards are dealt by it)."""
        return 1.0

    def metric(self, key: str) -> Metric:
        return next(metric for metric in self.metrics if metric.key == key)

    def option(self, test: str) -> str:
        """The command-line word for a test: "move active area" → "move-active-area"."""
        return test.lower().replace(" ", "-")
