"""What a qualification runs: cells of (test, slot count), each run N times per kernel.

The tests are kselftest_py.memslot_perf's, numbered as upstream; each run is one
``memslot_perf -f T -e T -r 1`` in the guest, so that runs of the two kernels can
alternate run by run. Within a cell the pair order alternates too (base first, then
patched first, ...): whatever a guest gains or loses from running first after a switch
falls on both kernels alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from kselftest_py import memslot_perf
from kvmlab.errors import KvmlabError
from kvmlab.qualify.store import SIDES, RunKey
from kvmlab.vm.clock import ICOUNT, WALL


def _option(name: str) -> str:
    """The CLI word for a memslot_perf test: "move active area" → "move-active"."""
    return name.lower().removesuffix(" area").replace(" ", "-")


#: CLI name → memslot_perf's test number and name (as the scalable-memslots tables call them).
TESTS = {_option(test.name): (number, test.name) for number, test in enumerate(memslot_perf.TESTS)}
TEST_NAMES = tuple(name for _, name in TESTS.values())
#: memslot_perf's tests whose runs give upstream's "slot setup time for the whole test area".
WHOLE_AREA = ("move active area", "move inactive area", "RW")
DEFAULT_SLOTS = (10, 30, 50, 100, 509, 32764)
#: Tests whose work also grows with the size of one slot, which the test varies with n:
#: memslot_perf splits its test memory over the slots (a slot is mem_size / n), and a
#: move moves the last slot whole, which KVM then flushes. Their complexity fits take
#: the slot size (1/n) as a covariate, so that its share is not credited to the lookup.
SLOT_SIZED = ("move active area", "move inactive area")
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
    slots: int
    run: int

    @property
    def key(self) -> RunKey:
        return RunKey(self.side, self.test, self.slots, self.run)

    def describe(self) -> str:
        return f"{self.side} {self.test} @{self.slots} slots run {self.run + 1}"


def parse_tests(text: str | None) -> list[str]:
    """memslot_perf test names from ``map,unmap,...`` (all six when None)."""
    if not text:
        return [name for _, name in TESTS.values()]
    names = []
    for word in text.split(","):
        word = word.strip().lower().replace(" ", "-").replace("_", "-")
        if word not in TESTS:
            raise KvmlabError(f"--tests: unknown test {word!r}; known: {', '.join(TESTS)}")
        names.append(TESTS[word][1])
    return list(dict.fromkeys(names))


def parse_slots(text: str | None) -> list[int]:
    if not text:
        return list(DEFAULT_SLOTS)
    try:
        slots = sorted({int(word) for word in text.split(",")})
    except ValueError:
        raise KvmlabError(f"--slots wants comma-separated counts, got {text!r}") from None
    if slots[0] < 2:
        raise KvmlabError("--slots: memslot_perf needs at least 2 slots per VM")
    return slots


def kernel_arguments(config: dict, side: str) -> str:
    """What ``side``'s guests append to the kernel command line: ``--append``, then the side's own."""
    return " ".join(filter(None, (config.get("append", ""), config[side].get("append", ""))))


def test_number(name: str) -> int:
    return next(number for number, test in TESTS.values() if test == name)


def plan(tests: list[str], slots: list[int], runs: int, rounds_first: bool = False) -> list[Item]:
    """Every item in the order they run, runs of the two kernels alternating.

    Cell by cell by default (the wall clock: a cell's runs close together in time, so
    host drift falls on both kernels alike); ``rounds_first`` runs the whole matrix once
    per round instead (icount: each round in fresh boots, so that the spread between
    boots shows in every cell's runs)."""
    cells = [(count, test) for count in slots for test in tests]
    order = (
        [(cell, run) for run in range(runs) for cell in cells]
        if rounds_first
        else [(cell, run) for cell in cells for run in range(runs)]
    )
    items = []
    for (count, test), run in order:
        sides = SIDES if run % 2 == 0 else SIDES[::-1]
        items += [Item(side, test, count, run) for side in sides]
    return items


def units(items: list[Item], by_cell: bool) -> list[list[Item]]:
    """The plan cut into what one lane runs at a stretch, in the plan's order.

    ``by_cell`` (the wall clock): whole cells, so that a cell's two kernels alternate on
    one pair of guests. Otherwise (icount) one boot's worth: one kernel's runs of one
    row (slot count) in one round. A run's figures depend a little on what its boot ran
    before (slot setup at 10 slots moved 2 % with it), so a boot's history must not
    depend on how many lanes or shards share the work: cut this way, every boot runs
    the same tests in the same order with ``--jobs 1``, ``--jobs 8`` or in a shard, and
    both kernels of a cell have the same history."""
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        key = (item.test, item.slots) if by_cell else (item.run, item.side, item.slots)
        groups.setdefault(key, []).append(item)
    return list(groups.values())
