"""memslot_stress: vCPUs keep touching their memory while the host adds and deletes a slot.

    python3 -m kselftest_py.memslot_stress [-v VCPUS] [-b MIB] [-s SLOTS] [-i ITERATIONS]
                                           [-d DELAY_US] [-t SECONDS] [--json FILE]

In the spirit of upstream's memslot_modification_stress_test: each vCPU writes the
pass number to every page of its own part of the test memory and reports each pass
with a ucall; meanwhile the host adds a one-page dummy slot just below the test
memory and deletes it again, ``-i`` times (or for ``-t`` seconds), ``-d`` µs apart.
The test memory is spread over ``-s`` slots, so a drgn check that pauses the guest
in the middle sees a realistic set of memslots being rebuilt. At the end every page
must hold a pass number the guest reported: memory the guest wrote was not lost.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import threading
import time

from kselftest_py.ioctls import KVM_CAP_NR_MEMSLOTS, KVM_EXIT_IO
from kselftest_py.ktap import KtapWriter
from kselftest_py.kvm import KVM_DEVICE, KvmSystem
from kselftest_py.memslot_guests import MEM_GPA, emit_page_loop
from kselftest_py.memslot_layout import PAGE_SIZE, SlotLayout
from kselftest_py.x86_asm import RAX, RCX, RDI, RSI, Assembler
from kselftest_py.x86_guest import CODE_GPA, UCALL_SYNC, emit_ucall, install_system, read_ucall, start_vcpu

MIB = 1 << 20
QWORD = struct.Struct("<Q")


def guest_code() -> bytes:
    """rdi = first byte, rsi = end of this vCPU's memory; rcx counts passes from 1."""
    asm = Assembler(CODE_GPA)
    asm.mov_imm(RCX, 1)
    asm.label("pass")
    asm.mov(RAX, RDI)
    emit_page_loop(asm, "write", RAX, RSI, RCX)
    emit_ucall(asm, UCALL_SYNC, RCX)  # clobbers rax, rbx, rdx only
    asm.add_imm(RCX, 1)
    asm.jmp("pass")
    return asm.assemble()


class VcpuWorker(threading.Thread):
    """Runs one vCPU until told to stop, counting the passes its guest reports."""

    def __init__(self, vcpu, running: threading.Event):
        super().__init__(name=f"vcpu{vcpu.id}", daemon=True)
        self.vcpu, self.running = vcpu, running
        self.passes = 0
        self.failure: Exception | None = None

    def run(self) -> None:
        try:
            while self.running.is_set():
                reason = self.vcpu.run()
                ucall = read_ucall(self.vcpu) if reason == KVM_EXIT_IO else None
                if ucall is None or ucall[0] != UCALL_SYNC:
                    raise RuntimeError(f"vCPU {self.vcpu.id}: unexpected exit {self.vcpu.exit_reason_name}")
                self.passes = ucall[1]
        except Exception as err:  # reported by the main thread
            self.failure = err


def dummy_slot(limit: int, test_slots: int) -> int:
    """The highest slot id the kernel allows; it must lie past the test slots."""
    slot = limit - 1
    if slot <= test_slots:
        raise ValueError(f"no free slot id: {test_slots} test slots, limit {limit}")
    return slot


def stress(kvm: KvmSystem, options: argparse.Namespace, ktap: KtapWriter) -> dict:
    per_vcpu_pages = options.mib_per_vcpu * MIB // PAGE_SIZE
    layout = SlotLayout(MEM_GPA, per_vcpu_pages * options.vcpus, options.slots)
    with kvm.create_vm() as vm:
        install_system(vm, guest_code())
        slots = [vm.add_memslot(layout.slot_id(i), layout.slot_gpa(i), layout.slot_pages(i) * PAGE_SIZE)
                 for i in range(layout.nslots)]
        layout.set_hvas([memory.hva for memory in slots])
        running = threading.Event()
        running.set()
        workers = []
        for index in range(options.vcpus):
            vcpu = start_vcpu(vm, index)
            regs = vcpu.get_regs()
            regs.rdi = MEM_GPA + index * per_vcpu_pages * PAGE_SIZE
            regs.rsi = regs.rdi + per_vcpu_pages * PAGE_SIZE
            vcpu.set_regs(regs)
            workers.append(VcpuWorker(vcpu, running))
        dummy = dummy_slot(kvm.check_extension(KVM_CAP_NR_MEMSLOTS), layout.nslots)
        dummy_gpa = MEM_GPA - PAGE_SIZE
        for worker in workers:
            worker.start()
        ktap.diag(f"{options.vcpus} vCPUs over {layout.nslots} slots; dummy slot {dummy} at {dummy_gpa:#x}")
        modifications = 0
        deadline = time.monotonic() + options.seconds if options.seconds else None
        started = time.monotonic()
        while (modifications < options.iterations) if deadline is None else (time.monotonic() < deadline):
            time.sleep(options.delay_us / 1e6)
            vm.add_memslot(dummy, dummy_gpa, PAGE_SIZE)
            vm.delete_memslot(dummy)
            modifications += 1
            failures = [w.failure for w in workers if w.failure]
            if failures:
                raise failures[0]
        elapsed = time.monotonic() - started
        running.clear()
        for worker in workers:
            worker.join()
            if worker.failure:
                raise worker.failure
        checked = verify(layout, slots, workers, per_vcpu_pages)
    return {"modifications": modifications, "seconds": elapsed, "passes": [w.passes for w in workers],
            "slots": layout.nslots, "vcpus": options.vcpus, "pages_checked": checked}


def verify(layout: SlotLayout, slots, workers: list[VcpuWorker], per_vcpu_pages: int) -> int:
    """Every page of a vCPU that reported passes holds a pass number it could have written."""
    checked = 0
    for index, worker in enumerate(workers):
        if worker.passes == 0:
            continue
        for page in range(per_vcpu_pages):
            gpa = MEM_GPA + (index * per_vcpu_pages + page) * PAGE_SIZE
            slot, offset = layout.locate(gpa)
            value = QWORD.unpack_from(slots[slot].buffer, offset)[0]
            if not 1 <= value <= worker.passes + 1:
                raise RuntimeError(
                    f"page at gpa {gpa:#x} holds {value}, vCPU {index} reported {worker.passes} passes"
                )
            checked += 1
    return checked


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m kselftest_py.memslot_stress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", dest="vcpus", type=int, default=1, help="vCPUs (1)")
    parser.add_argument("-b", dest="mib_per_vcpu", type=int, default=64, help="MiB each vCPU touches (64)")
    parser.add_argument("-s", dest="slots", type=int, default=1, help="slots the test memory spans (1)")
    parser.add_argument("-i", dest="iterations", type=int, default=10, help="add/delete cycles (10)")
    parser.add_argument("-t", dest="seconds", type=float, default=0, help="run for this long instead of -i")
    parser.add_argument("-d", dest="delay_us", type=int, default=0, help="µs between cycles (0)")
    parser.add_argument("--json", help="write the result as JSON to this file")
    parser.add_argument("--device", default=KVM_DEVICE, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.vcpus < 1 or options.mib_per_vcpu < 1 or options.slots < 1 or options.iterations < 0:
        parser.error("-v, -b and -s must be positive and -i not negative")
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    ktap = KtapWriter()
    ktap.header()
    ktap.plan(1)
    record: dict = {"kernel_release": os.uname().release}
    try:
        kvm = KvmSystem(options.device)
    except OSError as err:
        ktap.skip("memslot_modification_stress", f"{options.device} unavailable: {err.strerror}")
    else:
        with kvm:
            try:
                record.update(stress(kvm, options, ktap))
            except (RuntimeError, ValueError, OSError) as err:
                ktap.diag(str(err))
                ktap.not_ok("memslot_modification_stress")
                record["error"] = str(err)
            else:
                ktap.diag(f"{record['modifications']} slot add/delete cycles in {record['seconds']:.2f} s; "
                          f"vCPU passes {record['passes']}; {record['pages_checked']} pages verified")
                ktap.ok("memslot_modification_stress")
    code = ktap.finish()
    if options.json:
        with open(options.json, "w") as handle:
            json.dump({**record, "exit_code": code}, handle, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
