"""KVM smoke check: is the KVM in this kernel usable for the memslot tests at all?

    python3 -m kselftest_py.smoke [--json FILE] [--device /dev/kvm]

Five KTAP test points, each independent so one failure does not hide the others:
/dev/kvm answers with API version 12; KVM_CAP_NR_MEMSLOTS is readable; a VM takes a
64 KiB memslot and lets it go again; a real-mode vCPU runs a five-byte program that
writes 0x2a to port 0x10 and halts; a vCPU set up in 64-bit long mode, as the memslot
tests set theirs up, makes a ucall. Without a usable /dev/kvm every test point is
skipped with the reason and the exit code is KSFT_SKIP (4).

``--json FILE`` records api_version, nr_memslots, kernel_release and the per-test
results for the host side, which must not have to parse the console.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kselftest_py.ioctls import (
    KVM_API_VERSION,
    KVM_CAP_NR_MEMSLOTS,
    KVM_EXIT_HLT,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    exit_reason_name,
)
from kselftest_py.ktap import KtapWriter
from kselftest_py.kvm import KVM_DEVICE, KvmError, KvmSystem
from kselftest_py.x86_asm import Assembler
from kselftest_py.x86_guest import CODE_GPA, UCALL_DONE, emit_ucall, install_system, read_ucall, start_vcpu

PROGRAM_GPA = 0x1000
OUT_PORT = 0x10
OUT_VALUE = 0x2A
# mov al, 0x2a ; out 0x10, al ; hlt
PROGRAM = bytes([0xB0, OUT_VALUE, 0xE6, OUT_PORT, 0xF4])
MEMSLOT_SIZE = 64 * 1024


class CheckFailed(Exception):
    """A smoke check saw KVM answer, but not as expected."""


def expect(condition: bool, message: str) -> None:
    """Like assert, but survives ``python3 -O``."""
    if not condition:
        raise CheckFailed(message)


def check_api_version(kvm: KvmSystem) -> dict:
    version = kvm.api_version()
    expect(version == KVM_API_VERSION, f"API version {version}, expected {KVM_API_VERSION}")
    return {"api_version": version}


def check_nr_memslots(kvm: KvmSystem) -> dict:
    nr_memslots = kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
    expect(nr_memslots > 0, f"KVM_CAP_NR_MEMSLOTS is {nr_memslots}")
    return {"nr_memslots": nr_memslots}


def check_memslot_add_delete(kvm: KvmSystem) -> dict:
    with kvm.create_vm() as vm:
        vm.add_memslot(0, gpa=0x100000, size=MEMSLOT_SIZE)
        vm.delete_memslot(0)
        expect(not vm.memory, "memory of the deleted memslot is still held")
    return {}


def check_vcpu_real_mode(kvm: KvmSystem) -> dict:
    """Run ``PROGRAM`` at PROGRAM_GPA in real mode: one OUT exit, then a HLT exit."""
    with kvm.create_vm() as vm:
        memory = vm.add_memslot(0, gpa=0, size=MEMSLOT_SIZE)
        memory.write(PROGRAM_GPA, PROGRAM)
        vcpu = vm.create_vcpu(0)

        sregs = vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip = PROGRAM_GPA
        regs.rflags = 0x2  # bit 1 is reserved and must be set
        vcpu.set_regs(regs)

        reason = vcpu.run()
        expect(
            reason == KVM_EXIT_IO, f"first exit {exit_reason_name(reason)}, expected KVM_EXIT_IO"
        )
        io = vcpu.io()
        expect(
            (io.direction, io.port, io.size, io.count) == (KVM_EXIT_IO_OUT, OUT_PORT, 1, 1),
            f"I/O exit direction={io.direction} port={io.port:#x} size={io.size} "
            f"count={io.count}, expected a one-byte OUT to port {OUT_PORT:#x}",
        )
        expect(
            io.data == bytes([OUT_VALUE]), f"OUT wrote {io.data.hex()}, expected {OUT_VALUE:02x}"
        )

        reason = vcpu.run()
        expect(reason == KVM_EXIT_HLT, f"second exit {exit_reason_name(reason)}, expected HLT")
        rip = vcpu.get_regs().rip
        expect(rip == PROGRAM_GPA + len(PROGRAM), f"halted with rip={rip:#x}")
    return {}


def check_vcpu_long_mode(kvm: KvmSystem) -> dict:
    """A vCPU in long mode (CPUID, sregs, page tables as the memslot tests have them)
    reports done through the ucall port."""
    asm = Assembler(origin=CODE_GPA)
    emit_ucall(asm, UCALL_DONE)
    with kvm.create_vm() as vm:
        install_system(vm, asm.assemble())
        vcpu = start_vcpu(vm)
        reason = vcpu.run()
        call = read_ucall(vcpu)
        expect(call is not None and call[0] == UCALL_DONE,
               f"exit {exit_reason_name(reason)} with ucall {call}, expected the done ucall")
    return {}


CHECKS = (
    ("api_version", check_api_version),
    ("nr_memslots", check_nr_memslots),
    ("memslot_add_delete", check_memslot_add_delete),
    ("vcpu_real_mode", check_vcpu_real_mode),
    ("vcpu_long_mode", check_vcpu_long_mode),
)


def run_checks(ktap: KtapWriter, device: str) -> dict:
    """Run every check against ``device``, writing KTAP; returns the facts collected."""
    facts: dict = {"api_version": None, "nr_memslots": None}
    ktap.header()
    ktap.plan(len(CHECKS))
    try:
        kvm = KvmSystem(device)
    except OSError as err:
        reason = f"{device} unavailable: {err.strerror or err}"
        ktap.diag(reason)
        for name, _ in CHECKS:
            ktap.skip(name, reason)
        return facts
    with kvm:
        for name, check in CHECKS:
            try:
                found = check(kvm)
            except (CheckFailed, KvmError, OSError) as err:
                ktap.diag(f"{name}: {err}")
                ktap.not_ok(name)
                continue
            for key, value in found.items():
                ktap.diag(f"{key}: {value}")
            facts.update(found)
            ktap.ok(name)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m kselftest_py.smoke", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument(
        "--device", default=KVM_DEVICE, help=f"KVM device node (default {KVM_DEVICE})"
    )
    args = parser.parse_args(argv)

    ktap = KtapWriter()
    facts = run_checks(ktap, args.device)
    code = ktap.finish()
    if args.json:
        record = {
            "api_version": facts["api_version"],
            "nr_memslots": facts["nr_memslots"],
            "kernel_release": os.uname().release,
            "results": [{"name": name, "result": result} for name, result in ktap.results],
        }
        with open(args.json, "w") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
