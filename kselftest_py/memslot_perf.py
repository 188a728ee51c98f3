"""memslot_perf: upstream memslot_perf_test's tests, in Python.

    python3 -m kselftest_py.memslot_perf [-s SLOTS] [-f FIRST] [-e LAST] [-l SECONDS]
                                         [-r RUNS] [-v] [-d] [--json FILE] [sizes...]

Tests (numbered as upstream): 0 map, 1 unmap, 2 unmap chunked, 3 move active area,
4 move inactive area, 5 RW. Each run builds a VM with the slot cap's worth of slots
(timed: the slot setup time), lets the guest loop over its memory while the host
loop does the test's memslot work for ``-l`` seconds, and reports the time per
iteration. ``-d`` verifies the values the guest wrote before they are unmapped.

Differences from upstream, on purpose: results are KTAP with kselftest exit codes; a
slot count the kernel or a test cannot take is a SKIP naming the limit (upstream
prints it and exits 0); the host↔guest sync timeout is ``--sync-timeout`` instead of
a hard-coded 2 s alarm that nested TCG trips; memory sizes are options (upstream's
values by default) and the output says when they were changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from kselftest_py.ioctls import KVM_CAP_NR_MEMSLOTS
from kselftest_py.ktap import KtapWriter
from kselftest_py.kvm import KVM_DEVICE, KvmSystem
from kselftest_py.memslot_guests import (
    MEM_GPA,
    TEST_GPA,
    VAL_1,
    VAL_2,
    GuestParams,
    map_guest,
    move_guest,
    rw_guest,
    unmap_guest,
)
from kselftest_py.memslot_layout import PAGE_SIZE, TooManySlots
from kselftest_py.memslot_vm import GuestFailure, SetupOverBudget, TestVm, run_unmap_plan
from kselftest_py.trace_marker import mark
from kselftest_py.watchdog import Watchdog
from kselftest_py.workload import Axis, Claim, Measure, Metric, Workload

MIB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    """Memory sizes in bytes; the defaults are upstream's."""

    mem_size: int = 512 * MIB + PAGE_SIZE
    map_size: int = 32 * MIB
    unmap_size: int = 128 * MIB
    unmap_chunk_pages: int = 2 * MIB // PAGE_SIZE
    move_size_pages: int = 50

    @property
    def move_size(self) -> int:
        return self.move_size_pages * PAGE_SIZE


class VerifyFailed(Exception):
    """-d found a guest-written value that is not what the guest should have written."""


@dataclass
class Test:
    """One of upstream's tests: its memory, guest program and host loop.

    ``prepare`` runs once per VM before the guest starts and returns what the loop
    needs every iteration (prepared memslot updates, unmap plans), so that the timed
    loop does the memslot work and little else.
    """

    name: str
    pages: Callable[[Sizes], int]
    guest: Callable[[GuestParams], bytes]
    loop: Callable[[TestVm, Sizes, bool, Any], None]
    prepare: Callable[[TestVm, Sizes], Any] = lambda vm, sizes: None
    whole_area: bool = False  # upstream ranks slot setup time only for these


# -- the host loops ---------------------------------------------------------------
def _check(vm: TestVm, gpa: int, expected: int, verify: bool) -> None:
    """Upstream's test_memslot_map_unmap_check: compare, then clear for the next round."""
    if not verify:
        return
    value = vm.read_qword(gpa)
    if value != expected:
        raise VerifyFailed(
            f"guest written value should read back correctly before unmap: "
            f"{value:#x} vs {expected:#x} at gpa {gpa:#x}"
        )
    vm.write_qword(gpa, 0)


def map_prepare(vm: TestVm, sizes: Sizes) -> tuple:
    half_pages = sizes.map_size // PAGE_SIZE // 2
    second_half = TEST_GPA + half_pages * PAGE_SIZE
    return (vm.unmap_plan(TEST_GPA, half_pages, half_pages),
            vm.unmap_plan(second_half, half_pages, half_pages))


def map_loop(vm: TestVm, sizes: Sizes, verify: bool, plans: tuple) -> None:
    """Unmap one half while the guest maps (writes) the other, then swap."""
    first_half, second_half = plans
    middle = TEST_GPA + sizes.map_size // 2
    run_unmap_plan(second_half)
    vm.host_sync()
    _check(vm, TEST_GPA, VAL_1, verify)
    _check(vm, middle - PAGE_SIZE, VAL_1, verify)
    run_unmap_plan(first_half)
    vm.host_sync()
    _check(vm, middle, VAL_2, verify)
    _check(vm, TEST_GPA + sizes.map_size - PAGE_SIZE, VAL_2, verify)


def _unmap_prepare(vm: TestVm, sizes: Sizes, chunk: int) -> tuple:
    half_pages = sizes.unmap_size // PAGE_SIZE // 2
    second_half = TEST_GPA + half_pages * PAGE_SIZE
    return (vm.unmap_plan(TEST_GPA, half_pages, chunk), vm.unmap_plan(second_half, half_pages, chunk))


def unmap_loop(vm: TestVm, sizes: Sizes, verify: bool, plans: tuple) -> None:
    """Wait for the guest's touch of one half, unmap that half page by page (or by
    chunk), and likewise for the other half."""
    starts = (TEST_GPA, TEST_GPA + sizes.unmap_size // 2)
    for plan, start, expected in zip(plans, starts, (VAL_1, VAL_2), strict=True):
        vm.host_sync()
        _check(vm, start, expected, verify)
        run_unmap_plan(plan)


def _last_slot(vm: TestVm) -> int:
    return vm.layout.nslots - 1


def _move_updates(vm: TestVm, sizes: Sizes) -> tuple:
    return vm.move_updates(_last_slot(vm), MEM_GPA + sizes.mem_size)


def move_active_prepare(vm: TestVm, sizes: Sizes) -> tuple:
    """Half the move area in the last slot (which moves away), half in the one before."""
    source = vm.layout.slot_gpa(_last_slot(vm))
    if vm.layout.pages_left_in_slot(source) < sizes.move_size_pages // 2:
        raise TooManySlots(vm.layout.nslots, 0)
    vm.set_move_area(source - sizes.move_size // 2)
    vm.mmio_window = (source, source + sizes.move_size // 2 - 1)
    return _move_updates(vm, sizes)


def move_inactive_prepare(vm: TestVm, sizes: Sizes) -> tuple:
    """The move area entirely below the slot that moves."""
    vm.set_move_area(vm.layout.slot_gpa(_last_slot(vm)) - sizes.move_size)
    return _move_updates(vm, sizes)


def move_loop(vm: TestVm, sizes: Sizes, verify: bool, updates: tuple) -> None:
    """Move the last slot past the end of the test memory and back."""
    away, home = updates
    away.apply()
    home.apply()


def rw_loop(vm: TestVm, sizes: Sizes, verify: bool, state: None) -> None:
    end = TEST_GPA + sizes.mem_size - PAGE_SIZE
    for gpa in range(TEST_GPA + PAGE_SIZE // 2, end, PAGE_SIZE):
        vm.write_qword(gpa, VAL_2)
    vm.host_sync()
    for gpa in range(TEST_GPA, end, PAGE_SIZE):
        value = vm.read_qword(gpa)
        if value != VAL_1:
            raise VerifyFailed(f"guest written values should read back correctly: {value:#x} at gpa {gpa:#x}")
        vm.write_qword(gpa, 0)
    vm.host_sync()


def _unmap_pages(sizes: Sizes) -> int:
    return sizes.unmap_size // PAGE_SIZE + 1


TESTS = [
    Test("map", lambda s: s.map_size // PAGE_SIZE + 1, map_guest, map_loop, map_prepare),
    Test("unmap", _unmap_pages, unmap_guest, unmap_loop, lambda vm, s: _unmap_prepare(vm, s, 1)),
    Test("unmap chunked", _unmap_pages, unmap_guest, unmap_loop,
         lambda vm, s: _unmap_prepare(vm, s, s.unmap_chunk_pages)),
    Test("move active area", lambda s: s.mem_size // PAGE_SIZE, move_guest, move_loop,
         move_active_prepare, whole_area=True),
    Test("move inactive area", lambda s: s.mem_size // PAGE_SIZE, move_guest, move_loop,
         move_inactive_prepare, whole_area=True),
    Test("RW", lambda s: s.mem_size // PAGE_SIZE, rw_guest, rw_loop, whole_area=True),
]


# -- one run of one test ------------------------------------------------------------
@dataclass
class RunResult:
    test: str
    run: int
    slots: int
    slot_setup_ns: int
    iterations: int
    guest_runtime_ns: int
    host_cpu_ns: int = 0
    """CPU time of the test's host thread over the loop (CLOCK_THREAD_CPUTIME_ID): its own
    memslot work, without the vCPU thread's share of a CPU they may have to share."""

    @property
    def iteration_ns(self) -> int | None:
        return self.guest_runtime_ns // self.iterations if self.iterations else None

    @property
    def iteration_cpu_ns(self) -> int | None:
        return self.host_cpu_ns // self.iterations if self.iterations else None


def run_once(kvm: KvmSystem, test: Test, nslots: int, options: argparse.Namespace, run: int) -> RunResult:
    """Upstream's test_execute: build the VM, launch, loop for the time given, verify."""
    sizes: Sizes = options.sizes
    params = GuestParams(
        map_size=sizes.map_size, unmap_size=sizes.unmap_size, test_size=sizes.mem_size - PAGE_SIZE,
        move_size=sizes.move_size, val_1=VAL_1 ^ 0xFF if options.inject_wrong_value else VAL_1,
        hang=options.inject_hang,
    )
    labels = {"test": test.name, "slots": nslots, "run": run}
    mark("begin", "setup", **labels)
    vm = TestVm(kvm, test.guest(params), test.pages(sizes), nslots - 1, options.sync_timeout,
                options.setup_budget)
    mark("end", "setup", **labels)
    try:
        state = test.prepare(vm, sizes)
        vm.launch()
        iterations = 0
        mark("begin", "loop", **labels)
        started, started_cpu = time.monotonic_ns(), time.thread_time_ns()
        vm.let_guest_run()
        limit_ns = options.seconds * 1_000_000_000
        while True:
            runtime = time.monotonic_ns() - started
            if runtime >= limit_ns:
                cpu = time.thread_time_ns() - started_cpu
                break
            test.loop(vm, sizes, options.verify, state)
            vm.check()
            iterations += 1
        mark("end", "loop", **labels, iterations=iterations)
        vm.stop()
        return RunResult(test.name, run, nslots, vm.slot_setup_ns, iterations, runtime, cpu)
    finally:
        vm.close()


# -- as kvmlab qualify runs it --------------------------------------------------------
#: Tests whose runs give upstream's "slot setup time for the whole test area".
WHOLE_AREA = ("move active area", "move inactive area", "RW")
#: Tests whose work also grows with the size of one slot: the test memory is split over
#: the slots (a slot is mem_size / n), and a move moves the last slot whole.
SLOT_SIZED = ("move active area", "move inactive area")
SLOT_SETUP = "slot setup"


class MemslotPerf(Workload):
    """One run: ``-f T -e T -r 1``, so that runs of the two kernels can alternate run by run."""

    def measures(self, tests: tuple[str, ...]) -> list[Measure]:
        """Each test's time per iteration, then the slot setup time: of the runs of
        upstream's whole-area tests (upstream takes its "best slot setup time" from
        those), or of every test when none of them runs."""
        rows = [Measure(test, "iteration_ns", (test,), point_sized=test in SLOT_SIZED) for test in tests]
        whole = tuple(test for test in tests if test in WHOLE_AREA) or tuple(tests)
        return rows + [Measure(SLOT_SETUP, "slot_setup_ns", whole, per_point=True)]

    def argv(self, test: str, point: int, seconds: float, result_file: str,
             setup_budget: float | None = None) -> list[str]:
        number = str(self.tests.index(test))
        argv = ["python3", "-m", self.module, "-s", str(point), "-f", number, "-e", number, "-r", "1",
                "-l", str(seconds), "--json", result_file]
        return argv + (["--setup-budget", str(setup_budget)] if setup_budget else [])

    def figures(self, result: dict) -> dict:
        return {**super().figures(result), "default_sizes": result.get("default_sizes")}

    def cost(self, point: int) -> float:
        # A run's fixed part (restore, the measured loop) plus slot setup, linear and worse in n.
        return 1.0 + point / 1000

    def option(self, test: str) -> str:
        return test.lower().removesuffix(" area").replace(" ", "-")


WORKLOAD = MemslotPerf(
    name="memslot-perf",
    module="kselftest_py.memslot_perf",
    tests=tuple(test.name for test in TESTS),
    axis=Axis("slots", "memslots", "slot", "{} slots in use", (10, 30, 50, 100, 509, 32764), 2,
              ((32764, "32k"),)),
    metrics=(Metric("iteration_ns", "per iteration"), Metric("slot_setup_ns", "per VM")),
    summary="time per iteration (slot setup: per VM)",
    complexity="time against slot count, fitted as a + b·f(n), best by AIC; R² of the best; slot setup "
    "per slot; a move's time also against its slot's size, which the test shrinks as 1/n",
    claim=Claim("The scalable-memslots series (Linux 5.17) claims O(n) before and O(log n) after",
                base=("n", "n log n"), patched=("constant", "log n")),
    suite="memslots",
    kept=("iteration_cpu_ns", "iterations", "guest_runtime_ns"),
    columns=("iterations",),
)


# -- the command line ---------------------------------------------------------------
def _seconds(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m kselftest_py.memslot_perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-s", dest="slots", type=int, default=-1, help="memslot count cap (-1: none)")
    parser.add_argument("-f", dest="first", type=int, default=0, help="first test to run")
    parser.add_argument("-e", dest="last", type=int, default=len(TESTS) - 1, help="last test to run")
    parser.add_argument("-l", dest="seconds", type=float, default=5, help="test length in seconds")
    parser.add_argument("-r", dest="runs", type=int, default=1, help="runs per test")
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose")
    parser.add_argument("-d", dest="verify", action="store_true", help="verify guest-written values")
    parser.add_argument("--json", help="write every run as JSON to this file")
    parser.add_argument("--sync-timeout", type=float, default=60.0,
                        help="seconds to wait for the guest at a sync (upstream: 2)")
    parser.add_argument("--mem-size-mib", type=float, help="test memory for move and RW (512)")
    parser.add_argument("--map-size-mib", type=float, help="map test area (32)")
    parser.add_argument("--unmap-size-mib", type=float, help="unmap test area (128)")
    parser.add_argument("--setup-budget", type=float, metavar="SECONDS",
                        help="give up (skip, with the rate reached) a run whose slot setup takes longer")
    parser.add_argument("--inject-wrong-value", action="store_true",
                        help="make the guest write a wrong value (proves that -d catches it)")
    parser.add_argument("--inject-hang", action="store_true",
                        help="make the guest spin once started (proves a guest that stops answering "
                             "is stopped and located)")
    parser.add_argument("--device", default=KVM_DEVICE, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.slots <= 1 and options.slots != -1:
        parser.error("-s: slot count cap has to be above 1, or -1 for no cap")
    if not 0 <= options.first <= options.last < len(TESTS):
        parser.error(f"-f/-e: need 0 <= first <= last < {len(TESTS)}")
    if options.runs <= 0 or options.seconds < 0:
        parser.error("-r has to be positive and -l non-negative")
    if options.setup_budget is not None and not options.setup_budget > 0:
        parser.error("--setup-budget wants a positive number of seconds")
    sizes = Sizes()
    for option, field in (("mem_size_mib", "mem_size"), ("map_size_mib", "map_size"),
                          ("unmap_size_mib", "unmap_size")):
        value = getattr(options, option)
        if value is not None:
            extra = PAGE_SIZE if field == "mem_size" else 0
            sizes = replace(sizes, **{field: int(value * MIB) // PAGE_SIZE * PAGE_SIZE + extra})
    options.sizes = sizes
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    tests = TESTS[options.first:options.last + 1]
    ktap = KtapWriter()
    ktap.header()
    ktap.plan(len(tests))
    record = {"kernel_release": os.uname().release, "slot_cap": options.slots, "seconds": options.seconds,
              "runs_per_test": options.runs, "verify": options.verify, "sizes": asdict(options.sizes),
              "default_sizes": options.sizes == Sizes(), "runs": [], "tests": []}
    if options.sizes != Sizes():
        ktap.diag(f"memory sizes changed from upstream's: {asdict(options.sizes)}")
    try:
        kvm = KvmSystem(options.device)
    except OSError as err:
        return _skip_all(tests, f"{options.device} unavailable: {err.strerror}", ktap, record, options)
    with kvm:
        limit = kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
        record["nr_memslots"] = limit
        ktap.diag(f"KVM_CAP_NR_MEMSLOTS: {limit}")
        if options.slots > limit:
            reason = f"slot cap {options.slots} is above this kernel's limit of {limit} memslots"
            return _skip_all(tests, reason, ktap, record, options)
        nslots = limit if options.slots == -1 else options.slots
        best_setup: RunResult | None = None
        for test in tests:
            best_setup = _run_test(kvm, test, nslots, options, ktap, record, best_setup)
        if best_setup is not None:
            best = _seconds(best_setup.slot_setup_ns)
            ktap.diag(f"Best slot setup time for the whole test area was {best}")
    return _finish(ktap, record, options)


def _run_test(kvm, test: Test, nslots: int, options, ktap: KtapWriter, record: dict,
              best_setup: RunResult | None) -> RunResult | None:
    ktap.diag(f"Testing {test.name} performance with {options.runs} runs, {options.seconds:g} seconds each")
    best: RunResult | None = None
    for run in range(options.runs):
        try:
            limit = options.seconds + 4 * options.sync_timeout + (options.setup_budget or 0)
            with Watchdog(limit, f"{test.name} run {run}"):
                result = run_once(kvm, test, nslots, options, run)
        except (TooManySlots, SetupOverBudget) as err:
            too_many = isinstance(err, TooManySlots) and not err.maximum
            reason = "Memslot count may be too high for this test" if too_many else str(err)
            ktap.skip(test.name, reason)
            record["tests"].append({"test": test.name, "result": "skip", "reason": reason})
            return best_setup
        except (GuestFailure, VerifyFailed) as err:
            ktap.diag(f"{test.name} run {run}: {err}")
            ktap.not_ok(test.name)
            record["tests"].append({"test": test.name, "result": "fail", "reason": str(err)})
            return best_setup
        ktap.diag(f"Test took {_seconds(result.slot_setup_ns)} for slot setup + "
                  f"{_seconds(result.guest_runtime_ns)} all iterations")
        if result.iterations == 0:
            ktap.diag("No full loops done - too short test time or system too loaded?")
        else:
            ktap.diag(f"Done {result.iterations} iterations, avg {_seconds(result.iteration_ns)} each")
        record["runs"].append({**asdict(result), "iteration_ns": result.iteration_ns,
                               "iteration_cpu_ns": result.iteration_cpu_ns,
                               "kernel_release": record["kernel_release"], **asdict(options.sizes)})
        if result.iterations and (best is None or result.iteration_ns < best.iteration_ns):
            best = result
        if test.whole_area and (best_setup is None or result.slot_setup_ns < best_setup.slot_setup_ns):
            best_setup = result
    if best is not None:
        ktap.diag(f"Best runtime result was {_seconds(best.iteration_ns)} per iteration "
                  f"(with {best.iterations} iterations)")
    ktap.ok(test.name)
    record["tests"].append({"test": test.name, "result": "pass", "slots": nslots})
    return best_setup


def _skip_all(tests: list[Test], reason: str, ktap: KtapWriter, record: dict, options) -> int:
    for test in tests:
        ktap.skip(test.name, reason)
        record["tests"].append({"test": test.name, "result": "skip", "reason": reason})
    return _finish(ktap, record, options)


def _finish(ktap: KtapWriter, record: dict, options) -> int:
    code = ktap.finish()
    record["exit_code"] = code
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(record, handle, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
