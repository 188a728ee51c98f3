"""The VM a memslot test runs: system slot, test area over many slots, a vCPU thread.

The host side of upstream's vm_data/prepare_vm/launch_vm: ``TestVm`` creates the
slots (and times it: that is the "slot setup time"), runs the vCPU in its own thread
(KVM_RUN releases the GIL, so the main thread changes memslots meanwhile), answers
ucalls, and gives the host loops the words they need: read or write a guest qword,
unmap a range of guest pages, move a slot, sync with the guest.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time

from kselftest_py.ioctls import KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_MMIO, KvmRegs
from kselftest_py.kvm import GuestMemory, KvmSystem, allow_vcpu_stops
from kselftest_py.memslot_guests import EXIT_FLAG, MEM_GPA, MOVE_AREA_PTR, START_FLAG, SYNC_FLAG
from kselftest_py.memslot_layout import PAGE_SIZE, SlotLayout
from kselftest_py.x86_asm import Code
from kselftest_py.x86_guest import UCALL_ABORT, UCALL_DONE, UCALL_SYNC, install_system, read_ucall, start_vcpu

QWORD = struct.Struct("<Q")
#: How long a stopped vCPU may take to leave KVM_RUN.
STOP_WAIT_S = 5.0


class GuestFailure(Exception):
    """The guest or the vCPU did something the test does not allow."""


class SetupOverBudget(Exception):
    """Slot setup ran past its budget: how far it got, and how fast it went at the end."""

    def __init__(self, done: int, total: int, elapsed_ns: int, recent_rate: float, budget_s: float):
        self.done, self.total, self.elapsed_ns, self.recent_rate = done, total, elapsed_ns, recent_rate
        left_s = (total - done) / recent_rate if recent_rate else float("inf")
        super().__init__(
            f"slot setup stopped at its budget of {budget_s:g} s: {done} of {total} slots in "
            f"{elapsed_ns / 1e9:.1f} s, the last ones at {recent_rate:.1f} slots/s; at that rate the "
            f"rest would take at least {left_s:.0f} s more")


class TestVm:
    """A VM with ``nslots`` test slots over ``npages`` pages at MEM_GPA."""

    def __init__(self, kvm: KvmSystem, code: Code, npages: int, nslots: int, sync_timeout_s: float,
                 setup_budget_s: float | None = None):
        self.layout = SlotLayout(MEM_GPA, npages, nslots)  # raises TooManySlots first
        self.code = code
        self.sync_timeout_s = sync_timeout_s
        self.vm = kvm.create_vm()
        install_system(self.vm, code)
        self.vcpu = start_vcpu(self.vm)
        self.slots: list[GuestMemory] = []
        try:
            self.slot_setup_ns = self._add_slots(setup_budget_s)
        except SetupOverBudget:
            self.vm.close()
            raise
        for memory in self.slots:  # untimed, as upstream's memset after its slot setup
            memory.zero()
        self.sync = self.slots[0].buffer
        self.mmio_window: tuple[int, int] | None = None
        self.failure: Exception | None = None
        self.stopped_at: KvmRegs | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._vcpu_loop, name="vcpu0", daemon=True)
        # A signal may only go to a thread that has not ended: the thread says it is
        # ending, and stop_vcpu signals it, each under this lock.
        self._ending = threading.Lock()
        self._ended = False

    def _add_slots(self, budget_s: float | None) -> int:
        """Add every test slot, returning the time it took in ns (upstream's slot setup).

        With a budget, slot setup that would take too long (the memslot array at tens of
        thousands of slots under an emulator) stops once past it, with its rate."""
        started = last_check = time.monotonic_ns()
        checked_at = 0
        for index in range(self.layout.nslots):
            size = self.layout.slot_pages(index) * PAGE_SIZE
            gpa = self.layout.slot_gpa(index)
            self.slots.append(self.vm.add_memslot(self.layout.slot_id(index), gpa, size))
            if budget_s is not None and (index + 1) % 256 == 0:
                now = time.monotonic_ns()
                if now - started > budget_s * 1e9:
                    rate = (index + 1 - checked_at) / ((now - last_check) / 1e9)
                    raise SetupOverBudget(index + 1, self.layout.nslots, now - started, rate, budget_s)
                last_check, checked_at = now, index + 1
        elapsed = time.monotonic_ns() - started
        self.layout.set_hvas([memory.hva for memory in self.slots])
        return elapsed

    # -- the vCPU thread ---------------------------------------------------------
    def launch(self) -> None:
        """Start the vCPU and wait for the guest's first sync (it is then spinning)."""
        allow_vcpu_stops()
        self._thread.start()
        if not self._ready.wait(self.sync_timeout_s) or self.failure:
            raise self.failure or GuestFailure(
                f"guest did not start within {self.sync_timeout_s} s; {self.stop_vcpu()}")

    def _vcpu_loop(self) -> None:
        try:
            while self._handle(self._run()):
                pass
        except Exception as err:  # reported to the main thread, which raises it
            self.failure = err
        finally:
            with self._ending:
                self._ended = True
            self._ready.set()

    def _run(self) -> int:
        window = self.mmio_window
        return self.vcpu.run_through_mmio_writes(*window) if window else self.vcpu.run()

    def _handle(self, reason: int) -> bool:
        """React to one exit; False once the guest is done."""
        if reason == KVM_EXIT_INTR and self.vcpu.stopped:
            self.stopped_at = self.vcpu.get_regs()
            return False
        if reason == KVM_EXIT_IO:
            ucall = read_ucall(self.vcpu)
            if ucall is None:
                raise GuestFailure(f"unexpected port I/O {self.vcpu.io()}")
            command, argument = ucall
            if command == UCALL_SYNC:
                self._ready.set()
                return True
            if command == UCALL_DONE:
                return False
            if command == UCALL_ABORT:
                raise GuestFailure(f"guest found a wrong value: {argument:#x}")
            raise GuestFailure(f"unknown ucall {command}")
        if reason == KVM_EXIT_MMIO:
            self._check_mmio()
            return True
        raise GuestFailure(f"unexpected exit {self.vcpu.exit_reason_name}")

    def _check_mmio(self) -> None:
        access = self.vcpu.mmio()
        window = self.mmio_window
        if window is None or not access.is_write or access.length != 8:
            raise GuestFailure(f"unexpected MMIO {access}")
        if not window[0] <= access.phys_addr <= window[1]:
            raise GuestFailure(f"MMIO at {access.phys_addr:#x} outside {window[0]:#x}-{window[1]:#x}")

    def check(self) -> None:
        """Raise in the main thread what went wrong in the vCPU thread."""
        if self.failure is not None:
            raise self.failure

    # -- host side of the handshake ---------------------------------------------
    def let_guest_run(self) -> None:
        self.sync[START_FLAG] = 1

    def host_sync(self) -> None:
        """Raise the sync flag and spin until the guest takes it (upstream's host_perform_sync,
        with a deadline that is an option instead of a hard-coded 2 s alarm)."""
        sync = self.sync
        sync[SYNC_FLAG] = 1
        deadline = time.monotonic() + self.sync_timeout_s
        while sync[SYNC_FLAG]:
            if self.failure is not None:
                raise self.failure
            if time.monotonic() > deadline:
                raise GuestFailure(f"guest did not sync within {self.sync_timeout_s} s; {self.stop_vcpu()}")

    def stop(self) -> None:
        """Tell the guest to exit and wait for its vCPU thread."""
        self.sync[EXIT_FLAG] = 1
        if self._thread.is_alive():
            self._thread.join(self.sync_timeout_s)
            if self._thread.is_alive():
                raise GuestFailure(f"guest did not exit within {self.sync_timeout_s} s; {self.stop_vcpu()}")
        self.check()

    def stop_vcpu(self) -> str:
        """Take the vCPU out of a guest that did not do its part in time, and say where
        that guest was. A guest waiting for a flag the host has raised, or stuck at one
        page, points at KVM or the emulator; one still looping, at a too short timeout.
        Stopped, it also no longer burns a CPU under the tests that follow it."""
        with self._ending:
            if self._ended or not self._thread.is_alive():
                return "its vCPU thread had ended"
            self.vcpu.stop(self._thread.ident)
        self._thread.join(STOP_WAIT_S)
        if self._thread.is_alive():
            return f"its vCPU did not leave KVM_RUN within {STOP_WAIT_S:g} s of a stop"
        regs = self.stopped_at
        if regs is None:
            return f"its vCPU thread ended on: {self.failure}"
        return (f"its vCPU was stopped in {self.code.where(regs.rip)} (rip {regs.rip:#x}, rax {regs.rax:#x}, "
                f"rcx {regs.rcx:#x}, rdx {regs.rdx:#x})")

    def close(self) -> None:
        """End the guest, stopping a vCPU that does not exit when told, then free the VM."""
        if self._thread.is_alive():
            self.sync[EXIT_FLAG] = 1
            self._thread.join(self.sync_timeout_s)
        if self._thread.is_alive():
            self.stop_vcpu()
        self.vm.close()

    # -- guest memory, by guest physical address ----------------------------------
    def _where(self, gpa: int) -> tuple[mmap.mmap, int]:
        index, offset = self.layout.locate(gpa)
        return self.slots[index].buffer, offset

    def read_qword(self, gpa: int) -> int:
        buffer, offset = self._where(gpa)
        return QWORD.unpack_from(buffer, offset)[0]

    def write_qword(self, gpa: int, value: int) -> None:
        buffer, offset = self._where(gpa)
        QWORD.pack_into(buffer, offset, value)

    def set_move_area(self, gpa: int) -> None:
        QWORD.pack_into(self.sync, MOVE_AREA_PTR, gpa)

    def unmap_plan(self, gpa: int, npages: int, chunk: int) -> list[tuple]:
        """The madvise(MADV_DONTNEED) calls that unmap ``npages`` from ``gpa`` ``chunk``
        pages at a time (split where a chunk crosses a slot), as (method, offset, length).

        Upstream works out each hva as it goes, which costs C nothing; in Python the
        arithmetic would cost more than the unmap, so the plan is made once per test.
        """
        plan = []
        for first in range(0, npages, chunk):
            page, end = first, min(first + chunk, npages)
            while page < end:
                at = gpa + page * PAGE_SIZE
                count = min(self.layout.pages_left_in_slot(at), end - page)
                buffer, offset = self._where(at)
                plan.append((buffer.madvise, offset, count * PAGE_SIZE))
                page += count
        return plan

    def move_updates(self, index: int, gpa: int) -> tuple:
        """Prepared updates moving test slot ``index`` to ``gpa`` and back (same memory)."""
        memory, slot = self.slots[index], self.layout.slot_id(index)
        home = self.layout.slot_gpa(index)
        return (self.vm.memslot_update(slot, gpa, memory.size, memory.hva),
                self.vm.memslot_update(slot, home, memory.size, memory.hva))


def run_unmap_plan(plan: list[tuple]) -> None:
    dontneed = mmap.MADV_DONTNEED
    for madvise, offset, length in plan:
        madvise(dontneed, offset, length)
