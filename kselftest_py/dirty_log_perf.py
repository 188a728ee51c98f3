"""dirty_log_perf: upstream dirty_log_perf_test, in Python.

    python3 -m kselftest_py.dirty_log_perf [-i ITERATIONS] [-b BYTES] [-v VCPUS] [-x SLOTS]
                                           [-g] [-e] [-o] [-p GPA] [-c CPUS] [--json FILE]

Each vCPU runs in its own host thread a guest that writes one qword to every page of
its part of the test memory, then syncs with the host (a ucall), over and over; the
host thread enters the guest again only when the host starts the next iteration.
The host times, as upstream does:

- populate: the first pass of every vCPU over its memory (faulting it all in);
- enabling dirty logging (KVM_MEM_LOG_DIRTY_PAGES on every test slot);
- per iteration: the vCPUs' pass over their memory (dirty memory), KVM_GET_DIRTY_LOG
  of every slot, and KVM_CLEAR_DIRTY_LOG of every slot when manual protection is on;
- disabling dirty logging.

Manual protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, with KVM_DIRTY_LOG_INITIALLY_SET
where the kernel has it) is used unless ``-g`` is given or the kernel lacks it; without
it KVM_GET_DIRTY_LOG clears and write-protects by itself. After every get, each page a
vCPU wrote in that iteration must have its bit set: a page missing fails the test.

The timing lines are upstream's words ("Populate memory time: 0.012345678s", "Iteration
1 get dirty log time: …", "Get dirty log over 2 iterations took … (Avg …/iteration)"),
as KTAP diagnostics, so that :func:`parse_figures` reads both tests' output.

Differences from upstream, on purpose: results are KTAP with kselftest exit codes, and
the dirty bitmaps are checked; ``-b`` defaults to 64M per vCPU instead of 1G, because
kvmlab's L1 guest has 4 GiB and runs under TCG, where a 1G pass takes minutes (the
output says when the size is not upstream's); the test memory sits at 256 MiB
(``-p``), inside the 4 GiB the guest page tables map, where upstream puts it at the
top of the guest physical address space; the guest maps it with 2 MiB pages, where
upstream's uses 4 KiB pages (dirty logging works on KVM's own mappings of guest
memory, 4 KiB either way); the host threads wait on a condition variable instead of
spinning; a stuck vCPU is reported after ``--sync-timeout`` seconds. Not ported: -m
(guest modes), -n (nested), -s (backing memory type), -f/-w (read fraction) and -a/-r
(random access).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from kselftest_py.ioctls import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MAX_VCPUS,
    KVM_CAP_NR_MEMSLOTS,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_EXIT_IO,
    KVM_MEM_LOG_DIRTY_PAGES,
)
from kselftest_py.ktap import KtapWriter
from kselftest_py.kvm import KVM_DEVICE, DirtyBitmap, KvmError, KvmSystem, Vm
from kselftest_py.memslot_guests import MEM_GPA, emit_page_loop
from kselftest_py.memslot_layout import PAGE_SIZE
from kselftest_py.trace_marker import mark
from kselftest_py.watchdog import Watchdog
from kselftest_py.workload import Axis, Measure, Metric, Workload
from kselftest_py.x86_asm import RAX, RDI, RDX, RSI, Assembler
from kselftest_py.x86_guest import (
    CODE_GPA,
    IDENTITY_MAP_GB,
    UCALL_SYNC,
    emit_ucall,
    install_system,
    read_ucall,
    start_vcpu,
)

MIB = 1 << 20
UPSTREAM_BYTES_PER_VCPU = 1 << 30
DEFAULT_BYTES_PER_VCPU = 64 * MIB
DEFAULT_ITERATIONS = 2
GUEST_VALUE = 0x0123456789ABCDEF
#: Upstream's PERF_TEST_MEM_SLOT_INDEX: test slot i is KVM memslot FIRST_SLOT + i.
FIRST_SLOT = 1
TEST_NAME = "dirty_log_perf"


class GuestFailure(Exception):
    """A vCPU exited for something other than its sync, or did not sync in time."""


class DirtyPagesMissing(Exception):
    """KVM_GET_DIRTY_LOG left out pages the guest wrote in the iteration."""


# -- plain data: sizes, slots, regions ----------------------------------------------
_SIZE = re.compile(r"(\d+|0x[0-9a-f]+)([kmgt]?)b?", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Upstream's parse_size: a number with an optional K, M, G or T (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1G)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[match[2].lower()]
    return int(match[1], 0) << shift


@dataclass(frozen=True)
class Slot:
    """One test memslot: KVM slot id, guest physical address and size in pages."""

    slot: int
    gpa: int
    pages: int


def split_slots(gpa: int, total_pages: int, nslots: int) -> list[Slot]:
    """The test memory cut into ``nslots`` equal slots, as upstream's perf_test_create_vm
    (which refuses memory that does not divide evenly)."""
    if nslots < 1:
        raise ValueError(f"need at least one memslot, not {nslots}")
    if total_pages % nslots:
        raise ValueError(f"guest memory of {total_pages} pages cannot be evenly divided into {nslots} slots")
    per_slot = total_pages // nslots
    return [Slot(FIRST_SLOT + i, gpa + i * per_slot * PAGE_SIZE, per_slot) for i in range(nslots)]


def vcpu_regions(gpa: int, vcpus: int, bytes_per_vcpu: int, overlap: bool) -> list[tuple[int, int]]:
    """(first gpa, end gpa) of the memory each vCPU writes: its own part, or with
    ``overlap`` (upstream's -o) all of it."""
    if overlap:
        return [(gpa, gpa + vcpus * bytes_per_vcpu)] * vcpus
    return [(gpa + i * bytes_per_vcpu, gpa + (i + 1) * bytes_per_vcpu) for i in range(vcpus)]


def spans_in_slots(slots: list[Slot], start: int, end: int) -> list[tuple[int, int, int]]:
    """The pages of guest memory [start, end) as (slot index, first page, page count)."""
    spans = []
    for index, slot in enumerate(slots):
        slot_end = slot.gpa + slot.pages * PAGE_SIZE
        low, high = max(start, slot.gpa), min(end, slot_end)
        if low < high:
            spans.append((index, (low - slot.gpa) // PAGE_SIZE, (high - low) // PAGE_SIZE))
    return spans


def check_bitmaps(slots: list[Slot], bitmaps: list[DirtyBitmap], written: list[tuple[int, int]],
                  iteration: int) -> int:
    """Raise DirtyPagesMissing unless every page of every ``written`` range has its bit
    set; returns how many pages the bitmaps hold."""
    missing, examples = 0, []
    for start, end in sorted(set(written)):
        for index, first, count in spans_in_slots(slots, start, end):
            total, pages = bitmaps[index].missing(first, count)
            missing += total
            slot = slots[index]
            examples += [f"slot {slot.slot} page {page} (gpa {slot.gpa + page * PAGE_SIZE:#x})"
                         for page in pages]
    if missing:
        raise DirtyPagesMissing(
            f"Iteration {iteration}: {missing} page(s) the guest wrote are not in the dirty log: "
            + ", ".join(examples[:8]) + (", ..." if missing > 8 else ""))
    return sum(bitmap.count() for bitmap in bitmaps)


# -- the timing lines, upstream's words ----------------------------------------------
def seconds(ns: int) -> str:
    """``%ld.%.9lds``, as upstream prints a struct timespec."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


_TIME = r"(\d+)\.(\d{9})s"
LINES = {
    "populate_ns": re.compile(rf"Populate memory time: {_TIME}"),
    "enable_dirty_logging_ns": re.compile(rf"Enabling dirty logging time: {_TIME}"),
    "dirty_memory_ns": re.compile(rf"Iteration (\d+) dirty memory time: {_TIME}"),
    "get_dirty_log_ns": re.compile(rf"Iteration (\d+) get dirty log time: {_TIME}"),
    "clear_dirty_log_ns": re.compile(rf"Iteration (\d+) clear dirty log time: {_TIME}"),
    "disable_dirty_logging_ns": re.compile(rf"Disabling dirty logging time: {_TIME}"),
    "get_dirty_log_total_ns": re.compile(rf"Get dirty log over (\d+) iterations took {_TIME}\. "
                                         rf"\(Avg {_TIME}/iteration\)"),
    "clear_dirty_log_total_ns": re.compile(rf"Clear dirty log over (\d+) iterations took {_TIME}\. "
                                           rf"\(Avg {_TIME}/iteration\)"),
}
PER_ITERATION = ("dirty_memory_ns", "get_dirty_log_ns", "clear_dirty_log_ns")


def _ns(sec: str, nsec: str) -> int:
    return int(sec) * 1_000_000_000 + int(nsec)


def parse_figures(text: str) -> dict:
    """Every timing line of one run of this test or of upstream's (the last run, if
    several): the JSON's figure names, per-iteration ones as lists in iteration order,
    and the iteration count from the totals line."""
    figures: dict = {name: [] for name in PER_ITERATION}
    for line in text.splitlines():
        for name, pattern in LINES.items():
            found = pattern.search(line)
            if not found:
                continue
            if name in PER_ITERATION:
                iteration = int(found[1])
                if iteration == 1:
                    figures[name] = []  # a new run starts
                figures[name].append(_ns(found[2], found[3]))
            elif name.endswith("_total_ns"):
                figures["iterations"] = int(found[1])
                figures[name] = _ns(found[2], found[3])
            else:
                figures[name] = _ns(found[1], found[2])
            break
    return figures


# -- the guest ------------------------------------------------------------------------
def guest_code() -> bytes:
    """Write GUEST_VALUE to the first qword of every page in [rdi, rsi), sync, repeat
    (upstream's perf_test_guest_code with every page written)."""
    asm = Assembler(CODE_GPA)
    asm.label("pass")
    asm.mov(RAX, RDI)
    asm.mov_imm(RDX, GUEST_VALUE)
    emit_page_loop(asm, "write", RAX, RSI, RDX)
    emit_ucall(asm, UCALL_SYNC)  # clobbers rax, rdx
    asm.jmp("pass")
    return asm.assemble()


# -- the host: vCPU threads and the iteration handshake -------------------------------
class Iterations:
    """Upstream's ``iteration`` and ``vcpu_last_completed_iteration``, behind one
    condition variable: the host moves the iteration on, each vCPU thread reports the
    iteration it completed and waits for the next one.

    With ``busy_wait`` both sides spin before they take the lock, as upstream's threads
    spin on those variables: on a machine with fewer CPUs than threads a spinning
    thread takes CPU time from the one doing the work, and upstream's figures show it.
    """

    def __init__(self, vcpus: int, busy_wait: bool = False):
        self.busy_wait = busy_wait
        self.condition = threading.Condition()
        self.iteration = 0
        self.completed = [-1] * vcpus
        self.quit = False
        self.failure: Exception | None = None

    def start(self, iteration: int) -> None:
        with self.condition:
            self.iteration = iteration
            self.condition.notify_all()

    def stop(self) -> None:
        with self.condition:
            self.quit = True
            self.condition.notify_all()

    def fail(self, err: Exception) -> None:
        with self.condition:
            self.failure = self.failure or err
            self.condition.notify_all()

    @staticmethod
    def _spin(ready, timeout_s: float) -> float:
        """Spin until ``ready()`` or the timeout; the time left, for the locked wait after."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                return 0
        return deadline - time.monotonic()

    def wait_all(self, iteration: int, timeout_s: float) -> None:
        """Until every vCPU completed ``iteration`` (or one failed, or time ran out)."""
        def ready() -> bool:
            return self.failure is not None or all(c == iteration for c in self.completed)

        if self.busy_wait:
            timeout_s = max(0, self._spin(ready, timeout_s))
        with self.condition:
            done = self.condition.wait_for(ready, timeout_s)
            if self.failure is not None:
                raise self.failure
            if not done:
                late = [i for i, c in enumerate(self.completed) if c != iteration]
                raise GuestFailure(f"vCPU(s) {late} did not finish iteration {iteration} "
                                   f"within {timeout_s:g} s")

    def next_for(self, index: int) -> int | None:
        """For vCPU ``index``: the iteration to run now, once there is one; None: quit.
        A negative iteration (upstream's -e) means: keep running."""
        def ready() -> bool:
            return self.quit or self.iteration != self.completed[index] or self.iteration < 0

        if self.busy_wait:
            self._spin(ready, float("inf"))
        with self.condition:
            self.condition.wait_for(ready)
            return None if self.quit else self.iteration

    def done(self, index: int, iteration: int) -> None:
        with self.condition:
            self.completed[index] = iteration
            self.condition.notify_all()


class VcpuThread(threading.Thread):
    """Runs one vCPU for each iteration the host starts; records KVM_RUN's time."""

    def __init__(self, vcpu, index: int, iterations: Iterations, cpu: int | None):
        super().__init__(name=f"vcpu{index}", daemon=True)
        self.vcpu, self.index, self.iterations, self.cpu = vcpu, index, iterations, cpu
        self.run_ns: dict[int, int] = {}

    def run(self) -> None:
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})
            while True:
                iteration = self.iterations.next_for(self.index)
                if iteration is None:
                    return
                started = time.monotonic_ns()
                reason = self.vcpu.run()
                elapsed = time.monotonic_ns() - started
                ucall = read_ucall(self.vcpu) if reason == KVM_EXIT_IO else None
                if ucall is None or ucall[0] != UCALL_SYNC:
                    raise GuestFailure(f"vCPU {self.index}: invalid guest sync status: exit_reason="
                                       f"{self.vcpu.exit_reason_name}")
                if iteration >= 0:
                    self.run_ns[iteration] = elapsed
                self.iterations.done(self.index, iteration)
        except Exception as err:  # the main thread raises it
            self.iterations.fail(err)


# -- one run ----------------------------------------------------------------------------
@dataclass
class Result:
    """Every figure of a run, in ns; per-iteration lists are in iteration order (1..N)."""

    populate_ns: int = 0
    enable_dirty_logging_ns: int = 0
    dirty_memory_ns: list = field(default_factory=list)
    get_dirty_log_ns: list = field(default_factory=list)
    clear_dirty_log_ns: list = field(default_factory=list)
    disable_dirty_logging_ns: int = 0
    dirty_pages: list = field(default_factory=list)
    """Pages set in the bitmaps at each get (at least every page written)."""
    vcpu_run_ns: list = field(default_factory=list)
    """Per vCPU, its KVM_RUN time at populate (0) and each iteration."""


class DirtyLogVm:
    """The VM of one run: system slot, test slots, one vCPU per region, the bitmaps and
    every memslot update and dirty-log call prepared before anything is timed."""

    def __init__(self, kvm: KvmSystem, options: argparse.Namespace, manual_caps: int):
        self.options = options
        total = options.vcpus * options.bytes_per_vcpu
        self.slots = split_slots(options.gpa, total // PAGE_SIZE, options.slots)
        self.regions = vcpu_regions(options.gpa, options.vcpus, options.bytes_per_vcpu, options.overlap)
        self.vm: Vm = kvm.create_vm()
        try:
            install_system(self.vm, guest_code())
            memory = [self.vm.add_memslot(s.slot, s.gpa, s.pages * PAGE_SIZE) for s in self.slots]
            if manual_caps:
                self.vm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual_caps)
            self.vcpus = []
            for index, (start, end) in enumerate(self.regions):
                vcpu = start_vcpu(self.vm, index)
                regs = vcpu.get_regs()
                short = PAGE_SIZE if options.inject_missing_page and index == 0 else 0
                regs.rdi, regs.rsi = start, end - short
                vcpu.set_regs(regs)
                self.vcpus.append(vcpu)
        except BaseException:
            self.vm.close()
            raise
        self.bitmaps = [DirtyBitmap(s.pages) for s in self.slots]
        self.enable, self.disable, self.get, self.clear = [], [], [], []
        for index, slot in enumerate(self.slots):
            size, hva, bitmap = memory[index].size, memory[index].hva, self.bitmaps[index]
            logging = KVM_MEM_LOG_DIRTY_PAGES
            self.enable.append(self.vm.memslot_update(slot.slot, slot.gpa, size, hva, logging))
            self.disable.append(self.vm.memslot_update(slot.slot, slot.gpa, size, hva))
            self.get.append(self.vm.get_dirty_log_call(slot.slot, bitmap))
            if manual_caps:
                self.clear.append(self.vm.clear_dirty_log_call(slot.slot, bitmap))

    def close(self) -> None:
        self.vm.close()


def _apply_all(calls: list) -> int:
    """Apply every prepared call; the time it took, in ns."""
    started = time.monotonic_ns()
    for call in calls:
        call.apply()
    return time.monotonic_ns() - started


def run_test(kvm: KvmSystem, options: argparse.Namespace, manual_caps: int, ktap: KtapWriter) -> Result:
    """Upstream's run_test: populate, enable, iterate (dirty, get, check, clear), disable."""
    result = Result()
    labels = {"vcpus": options.vcpus, "slots": options.slots}
    test_vm = DirtyLogVm(kvm, options, manual_caps)
    iterations = Iterations(options.vcpus, options.busy_wait)
    cpus = options.cpus or []
    threads = [VcpuThread(vcpu, i, iterations, cpus[i] if i < len(cpus) else None)
               for i, vcpu in enumerate(test_vm.vcpus)]
    try:
        if len(cpus) > options.vcpus:
            os.sched_setaffinity(0, {cpus[options.vcpus]})
        end = options.gpa + options.vcpus * options.bytes_per_vcpu
        ktap.diag(f"guest physical test memory: [{options.gpa:#x}, {end:#x})")
        timeout = options.sync_timeout

        mark("begin", "populate", **labels)
        started = time.monotonic_ns()
        for thread in threads:
            thread.start()
        iterations.wait_all(0, timeout)
        result.populate_ns = time.monotonic_ns() - started
        mark("end", "populate", **labels)
        ktap.diag(f"Populate memory time: {seconds(result.populate_ns)}")

        mark("begin", "enable", **labels)
        result.enable_dirty_logging_ns = _apply_all(test_vm.enable)
        mark("end", "enable", **labels)
        ktap.diag(f"Enabling dirty logging time: {seconds(result.enable_dirty_logging_ns)}")
        ktap.diag("")

        for iteration in range(1, options.iterations + 1):
            mark("begin", "dirty", iteration=iteration, **labels)
            started = time.monotonic_ns()
            iterations.start(iteration)
            iterations.wait_all(iteration, timeout)
            result.dirty_memory_ns.append(time.monotonic_ns() - started)
            mark("end", "dirty", iteration=iteration, **labels)
            ktap.diag(f"Iteration {iteration} dirty memory time: {seconds(result.dirty_memory_ns[-1])}")

            mark("begin", "get_dirty_log", iteration=iteration, **labels)
            result.get_dirty_log_ns.append(_apply_all(test_vm.get))
            mark("end", "get_dirty_log", iteration=iteration, **labels)
            ktap.diag(f"Iteration {iteration} get dirty log time: {seconds(result.get_dirty_log_ns[-1])}")
            dirty = check_bitmaps(test_vm.slots, test_vm.bitmaps, test_vm.regions, iteration)
            result.dirty_pages.append(dirty)

            if test_vm.clear:
                mark("begin", "clear_dirty_log", iteration=iteration, **labels)
                result.clear_dirty_log_ns.append(_apply_all(test_vm.clear))
                mark("end", "clear_dirty_log", iteration=iteration, **labels)
                ktap.diag(f"Iteration {iteration} clear dirty log time: "
                          f"{seconds(result.clear_dirty_log_ns[-1])}")

        if options.run_while_disabling:
            iterations.start(-1)
        mark("begin", "disable", **labels)
        result.disable_dirty_logging_ns = _apply_all(test_vm.disable)
        mark("end", "disable", **labels)
        ktap.diag(f"Disabling dirty logging time: {seconds(result.disable_dirty_logging_ns)}")
        iterations.stop()
        for thread in threads:
            thread.join(timeout)
        if iterations.failure is not None:
            raise iterations.failure
        result.vcpu_run_ns = [[t.run_ns.get(i, 0) for i in range(options.iterations + 1)] for t in threads]
        ktap.diag(total_line("Get", result.get_dirty_log_ns))
        if test_vm.clear:
            ktap.diag(total_line("Clear", result.clear_dirty_log_ns))
        return result
    finally:
        iterations.stop()
        for thread in threads:
            if thread.is_alive():
                thread.join(1)
        if not any(thread.is_alive() for thread in threads):
            test_vm.close()  # else a vCPU is stuck in KVM_RUN, on memory that must stay mapped


def total_line(name: str, figures: list[int]) -> str:
    """Upstream's summary of the get (or clear) times over all iterations."""
    total = sum(figures)
    return (f"{name} dirty log over {len(figures)} iterations took {seconds(total)}. "
            f"(Avg {seconds(total // len(figures))}/iteration)")


# -- the command line -------------------------------------------------------------------
def _cpu_list(text: str) -> list[int]:
    try:
        return [int(cpu) for cpu in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of CPU numbers: {text!r}") from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m kselftest_py.dirty_log_perf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", dest="iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"iterations, one get dirty log each (default {DEFAULT_ITERATIONS}, at least 2)")
    parser.add_argument("-b", dest="bytes_per_vcpu", type=_size, default=DEFAULT_BYTES_PER_VCPU,
                        help="memory each vCPU dirties, e.g. 10M or 1G (default 64M; upstream: 1G)")
    parser.add_argument("-v", dest="vcpus", type=int, default=1, help="vCPUs (default 1)")
    parser.add_argument("-x", dest="slots", type=int, default=1,
                        help="memslots to split the test memory into (default 1)")
    parser.add_argument("-g", dest="no_manual_protect", action="store_true",
                        help="do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG clears "
                             "the log, and writes are tracked from the moment logging is enabled")
    parser.add_argument("-e", dest="run_while_disabling", action="store_true",
                        help="keep the vCPUs running while dirty logging is being disabled")
    parser.add_argument("-o", dest="overlap", action="store_true",
                        help="every vCPU writes all the test memory instead of its own part")
    parser.add_argument("-p", dest="gpa", type=lambda text: int(text, 0), default=MEM_GPA,
                        help=f"guest physical address of the test memory (default {MEM_GPA:#x})")
    parser.add_argument("-c", dest="cpus", type=_cpu_list,
                        help="pin vCPU threads to these CPUs (one each, in order), then optionally the "
                             "main thread")
    parser.add_argument("--busy-wait", action="store_true",
                        help="threads spin while they wait, as upstream's do, instead of sleeping")
    parser.add_argument("--json", help="write the parameters and every figure as JSON to this file")
    parser.add_argument("--sync-timeout", type=float, default=300.0,
                        help="seconds to wait for the vCPUs to finish a pass (300)")
    parser.add_argument("--inject-missing-page", action="store_true",
                        help="make vCPU 0's guest skip its last page (proves that the bitmap check "
                             "catches it)")
    parser.add_argument("--device", default=KVM_DEVICE, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.iterations < 2:
        parser.error("-i: the test should have at least two iterations")
    if options.vcpus < 1 or options.slots < 1:
        parser.error("-v and -x have to be positive")
    if options.bytes_per_vcpu < PAGE_SIZE or options.bytes_per_vcpu % PAGE_SIZE:
        parser.error(f"-b: guest memory size {options.bytes_per_vcpu} is not a positive multiple of the "
                     f"page size ({PAGE_SIZE})")
    if options.gpa % PAGE_SIZE or options.gpa < 1 << 20:
        parser.error(f"-p: {options.gpa:#x} has to be page aligned and above the system slot (1 MiB)")
    end = options.gpa + options.vcpus * options.bytes_per_vcpu
    if end > IDENTITY_MAP_GB << 30:
        parser.error(f"test memory [{options.gpa:#x}, {end:#x}) does not fit below the {IDENTITY_MAP_GB} GiB "
                     f"the guest maps: lower -b, -v or -p")
    try:
        split_slots(options.gpa, options.vcpus * options.bytes_per_vcpu // PAGE_SIZE, options.slots)
    except ValueError as err:
        parser.error(f"-x: {err}")
    if options.cpus is not None and not options.vcpus <= len(options.cpus) <= options.vcpus + 1:
        parser.error(f"-c: give {options.vcpus} CPUs (one per vCPU), or {options.vcpus + 1} with the "
                     f"main thread's")
    return options


def parameters(options: argparse.Namespace) -> dict:
    return {"test": "dirty-log-perf", "kernel_release": os.uname().release, "vcpus": options.vcpus,
            "slots": options.slots, "bytes_per_vcpu": options.bytes_per_vcpu,
            "default_bytes_per_vcpu": options.bytes_per_vcpu == DEFAULT_BYTES_PER_VCPU,
            "iterations": options.iterations, "overlap": options.overlap,
            "run_while_disabling": options.run_while_disabling, "busy_wait": options.busy_wait,
            "gpa": options.gpa,
            "pages": options.vcpus * options.bytes_per_vcpu // PAGE_SIZE}


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    ktap = KtapWriter()
    ktap.header()
    ktap.plan(1)
    record = parameters(options)
    if options.bytes_per_vcpu != UPSTREAM_BYTES_PER_VCPU:
        ktap.diag(f"memory per vCPU: {options.bytes_per_vcpu // MIB} MiB (upstream's default: 1024 MiB)")
    ktap.diag(f"Test iterations: {options.iterations}")
    try:
        kvm = KvmSystem(options.device)
    except OSError as err:
        return _finish(ktap, record, options, "skip", f"{options.device} unavailable: {err.strerror}")
    with kvm:
        limit, max_vcpus = kvm.check_extension(KVM_CAP_NR_MEMSLOTS), kvm.check_extension(KVM_CAP_MAX_VCPUS)
        if options.slots + FIRST_SLOT > limit:
            reason = (f"{options.slots} test memslots and the system slot are above this kernel's "
                      f"limit of {limit}")
            return _finish(ktap, record, options, "skip", reason)
        if options.vcpus > max_vcpus:
            reason = f"{options.vcpus} vCPUs: KVM allows at most {max_vcpus}"
            return _finish(ktap, record, options, "skip", reason)
        manual_caps = kvm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & (
            KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET)
        if options.no_manual_protect:
            manual_caps = 0
        record.update(manual_protect=bool(manual_caps), manual_protect_caps=manual_caps)
        ktap.diag(f"{options.vcpus} vCPU(s), {options.slots} memslot(s), "
                  f"{options.bytes_per_vcpu // PAGE_SIZE} pages per vCPU; manual protect: "
                  f"{'on' if manual_caps else 'off'} (caps {manual_caps:#x})")
        limit_s = options.sync_timeout * (options.iterations + 3) + 60
        try:
            with Watchdog(limit_s, TEST_NAME):
                result = run_test(kvm, options, manual_caps, ktap)
        except (GuestFailure, DirtyPagesMissing, KvmError) as err:
            ktap.diag(str(err))
            return _finish(ktap, record, options, "fail", str(err))
    record.update(asdict(result))
    return _finish(ktap, record, options, "pass")


def _finish(ktap: KtapWriter, record: dict, options: argparse.Namespace, outcome: str,
            reason: str = "") -> int:
    if outcome == "pass":
        ktap.ok(TEST_NAME)
    elif outcome == "skip":
        ktap.skip(TEST_NAME, reason)
    else:
        ktap.not_ok(TEST_NAME)
    code = ktap.finish()
    record.update(result=outcome, exit_code=code)
    if reason:
        record["reason"] = reason
    # What every workload's result holds (kselftest_py.workload): the test's outcome, and
    # the run's figures as a qualification compares them, per iteration where upstream's are.
    record["tests"] = [{"test": WORKLOAD.tests[0], "result": outcome, "reason": reason}]
    if outcome == "pass":
        record["runs"] = [per_run(record)]
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(record, handle, indent=2)
    return code



# -- as kvmlab qualify runs it --------------------------------------------------------
#: Iterations of a qualified run: upstream's default.
QUALIFY_ITERATIONS = DEFAULT_ITERATIONS
#: Per-iteration figures, as a run's mean per iteration.
PER_ITERATION_FIGURES = ("dirty_memory_ns", "get_dirty_log_ns", "clear_dirty_log_ns")
#: Metric key → the report's row, in upstream's order.
FIGURES = {
    "populate_ns": "populate memory",
    "enable_dirty_logging_ns": "enable dirty logging",
    "dirty_memory_ns": "dirty memory",
    "get_dirty_log_ns": "get dirty log",
    "clear_dirty_log_ns": "clear dirty log",
    "disable_dirty_logging_ns": "disable dirty logging",
}


def per_run(record: dict) -> dict:
    """One passed run's figures: each in ns, the per-iteration ones as their mean (the
    clear is None without manual protection, which has none)."""
    figures = {}
    for key in FIGURES:
        value = record[key]
        if key in PER_ITERATION_FIGURES:
            value = sum(value) / len(value) if value else None
        figures[key] = value
    return {**figures, "iterations": record["iterations"], "manual_protect": record.get("manual_protect")}


class DirtyLogPerf(Workload):
    """One run: ``-x POINT -i 2``, upstream's figures as rows of their own."""

    def measures(self, tests: tuple[str, ...]) -> list[Measure]:
        return [Measure(row, key, tests) for key, row in FIGURES.items()]

    def argv(self, test: str, point: int, seconds: float, result_file: str,
             setup_budget: float | None = None) -> list[str]:
        return ["python3", "-m", self.module, "-x", str(point), "-i", str(QUALIFY_ITERATIONS),
                "--json", result_file]

    def run_length(self, seconds: float) -> str:
        return f"{QUALIFY_ITERATIONS} iterations over {DEFAULT_BYTES_PER_VCPU // MIB} MiB"


WORKLOAD = DirtyLogPerf(
    name="dirty-log-perf",
    module="kselftest_py.dirty_log_perf",
    tests=("dirty log",),
    axis=Axis("slots", "memslots", "memslot", "{} memslot(s)", (1, 64), 1),
    metrics=tuple(Metric(key, "per iteration" if key in PER_ITERATION_FIGURES else "per run")
                  for key in FIGURES),
    summary="upstream's figures of dirty logging, each its own row (dirty memory, get and clear dirty log: "
    "per iteration)",
    complexity="time against memslot count, fitted as a + b·f(n), best by AIC; R² of the best",
    suite="dirty-log",
    kept=("iterations", "manual_protect"),
)

if __name__ == "__main__":
    sys.exit(main())
