"""What a qualification runs: cells of (test, point), each run N times per kernel.

The tests and the axis the points lie on are the workload's (``workloads``; memslot_perf's
tests, numbered as upstream, at slot counts, by default). Each run is one invocation of
the workload's module for one test at one point, so that runs of the two kernels can
alternate run by run. Within a cell the pair order alternates too (base first, then
patched first, ...): whatever a guest gains or loses from running first after a switch
falls on both kernels alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from kselftest_py.workload import Workload
from kvmlab.errors import KvmlabError
from kvmlab.qualify.config import SIDES
from kvmlab.qualify.store import RunKey
from kvmlab.vm.clock import ICOUNT, WALL

#: Mann-Whitney U with 5 runs a side reaches p = 0.008 when the sides do not overlap and
#: stays below 0.05 with up to two swapped pairs; 4 is the least that can reach 0.05 at all.
MIN_RUNS = 4
#: Per clock: runs per kernel and cell, the practical threshold and the L1 vCPUs. Under
#: icount one vCPU repeats within 1 % across boots (two quantize at the 4 ms tick) and
#: Welch's t on 3 runs, each in its own boot, resolves a 2 % change; the wall clock
#: keeps the rank test's 5 runs and a threshold above its noise. The
#: repeatability tables in docs/benchmarks.md are the evidence for both.
DEFAULTS = {
    ICOUNT: {"runs": 3, "threshold": 0.02, "cpus": 1},
    WALL: {"runs": 5, "threshold": 0.05, "cpus": 2},
}


@dataclass(frozen=True)
class Item:
    """One run of one kernel in one cell: the unit the store records."""

    side: str
    test: str
    point: int
    run: int

    @property
    def key(self) -> RunKey:
        return RunKey(self.side, self.test, self.point, self.run)

    def describe(self, axis: str = "slots") -> str:
        return f"{self.side} {self.test} @{self.point} {axis} run {self.run + 1}"


def parse_tests(workload: Workload, text: str | None) -> list[str]:
    """The workload's test names from ``a,b,...`` (its command-line words; all when None)."""
    if not text:
        return list(workload.tests)
    words = {workload.option(test): test for test in workload.tests}
    names = []
    for word in text.split(","):
        word = word.strip().lower().replace(" ", "-").replace("_", "-")
        if word not in words:
            raise KvmlabError(f"--tests: {workload.name} has no test {word!r}; known: {', '.join(words)}")
        names.append(words[word])
    return list(dict.fromkeys(names))


def parse_points(workload: Workload, text: str | None, option: str = "--slots") -> list[int]:
    """Points on the workload's axis from ``10,509`` (its defaults when None), sorted."""
    if not text:
        return list(workload.axis.defaults)
    try:
        points = sorted({int(word) for word in text.split(",")})
    except ValueError:
        raise KvmlabError(f"{option} wants comma-separated counts, got {text!r}") from None
    if points[0] < workload.axis.minimum:
        raise KvmlabError(f"{option}: {workload.name} needs at least {workload.axis.minimum} "
                          f"{workload.axis.title} per VM")
    return points


def run_order(tests: list[str], points: list[int], runs: int, rounds_first: bool = False) -> list[Item]:
    """Every item in the order they run, runs of the two kernels alternating.

    Cell by cell by default (the wall clock: a cell's runs close together in time, so
    host drift falls on both kernels alike); ``rounds_first`` runs the whole matrix once
    per round instead (icount: each round in fresh boots, so that the spread between
    boots shows in every cell's runs)."""
    cells = [(point, test) for point in points for test in tests]
    order = (
        [(cell, run) for run in range(runs) for cell in cells]
        if rounds_first
        else [(cell, run) for cell in cells for run in range(runs)]
    )
    items = []
    for (point, test), run in order:
        sides = SIDES if run % 2 == 0 else SIDES[::-1]
        items += [Item(side, test, point, run) for side in sides]
    return items


def units(items: list[Item], by_cell: bool, restored: bool = False) -> list[list[Item]]:
    """The plan cut into what one guest (or, under the wall clock, one pair) runs, in the plan's order.

    ``by_cell`` (the wall clock): whole cells, so that a cell's two kernels alternate on
    one pair of guests. ``restored`` (icount, guests restored from templates): one run,
    each in a guest of its own restored from its round's template, so that every run
    starts from the same saved state. An icount guest idle between two requests runs
    its clock ahead to its next timers, as far as the host takes to send the next one,
    so a second run in one guest starts at a tick phase the host's latency chose (slot
    setup at 10 slots moved 0.2 % with the host's gap between requests, and 1.3 % in CI
    between a one-piece run and its shards); a restore costs 0.3 s. Otherwise (icount,
    ``--fresh-boot``) one boot's worth: one kernel's runs of one row (point) in one round. Cut
    this way, every guest runs the same tests in the same order with ``--jobs 1``,
    ``--jobs 8`` or in a shard, and both kernels of a cell have the same history."""
    if restored and not by_cell:
        return [[item] for item in items]
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        key = (item.test, item.point) if by_cell else (item.run, item.side, item.point)
        groups.setdefault(key, []).append(item)
    return list(groups.values())
