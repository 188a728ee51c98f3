"""An x86-64 guest in long mode, and the ucall channel between guest and host.

The "system" memslot (slot 0 at gpa 0) holds what the guest needs to run at all:
identity page tables, a GDT, the code and a stack. Test memory lives in other slots;
the page tables identity-map the whole low ``IDENTITY_MAP_GB`` gigabytes with 2 MiB
pages whether or not a memslot backs a range, so that the guest touching an address
with no memslot is an MMIO exit, as the move-active test expects.

Layout of the system slot::

    0x1000  PML4          0x2000  PDPT        0x3000.. page directories (one per GiB)
    0x8000  GDT           0x9000  TSS         0x10000  code      SYSTEM_SIZE  stack top

ucalls are ``out dx, eax`` to ``UCALL_PORT`` with the command in eax and its
argument in rbx, as the upstream selftests' x86 ucall: the vCPU exits to the host on
the port write, and the host reads rbx with KVM_GET_REGS.
"""

from __future__ import annotations

import struct

from kselftest_py.ioctls import KvmSegment, KvmSregs
from kselftest_py.kvm import GuestMemory, Vcpu, Vm
from kselftest_py.x86_asm import RAX, RBX, RDX, Assembler

SYSTEM_SLOT = 0
SYSTEM_SIZE = 1 << 20
PML4_GPA, PDPT_GPA, PD_GPA = 0x1000, 0x2000, 0x3000
GDT_GPA, TSS_GPA, CODE_GPA = 0x8000, 0x9000, 0x10000
STACK_TOP = SYSTEM_SIZE
IDENTITY_MAP_GB = 4

PAGE_PRESENT, PAGE_WRITE, PAGE_HUGE = 0x1, 0x2, 0x80
CR0_PE, CR0_NE, CR0_PG = 0x1, 0x20, 0x80000000
CR4_PAE = 0x20
EFER_LME, EFER_LMA = 0x100, 0x400
CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR = 0x08, 0x10, 0x18

UCALL_PORT = 0x1000
UCALL_SYNC, UCALL_DONE, UCALL_ABORT = 1, 2, 3
UCALL_NAMES = {UCALL_SYNC: "sync", UCALL_DONE: "done", UCALL_ABORT: "abort"}


def page_tables(gigabytes: int = IDENTITY_MAP_GB) -> dict[int, bytes]:
    """Identity-map ``[0, gigabytes GiB)`` with 2 MiB pages: {gpa: 4 KiB table}."""
    flags = PAGE_PRESENT | PAGE_WRITE
    pml4 = struct.pack("<Q", PDPT_GPA | flags).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_GPA + i * 4096) | flags) for i in range(gigabytes))
    tables = {PML4_GPA: pml4, PDPT_GPA: pdpt.ljust(4096, b"\0")}
    for gib in range(gigabytes):
        entries = (((gib << 30) + (n << 21)) | flags | PAGE_HUGE for n in range(512))
        tables[PD_GPA + gib * 4096] = b"".join(struct.pack("<Q", e) for e in entries)
    return tables


def gdt() -> bytes:
    """Null, 64-bit code, data, and a 16-byte 64-bit TSS descriptor."""
    code = 0x00AF9B000000FFFF  # present, ring 0, execute/read, L=1, G=1
    data = 0x00CF93000000FFFF  # present, ring 0, read/write, D=1, G=1
    tss_limit = 0x67
    tss_low = tss_limit | (TSS_GPA & 0xFFFFFF) << 16 | 0x8B << 40 | (TSS_GPA >> 24 & 0xFF) << 56
    return struct.pack("<QQQQQ", 0, code, data, tss_low, TSS_GPA >> 32)


def _segment(selector: int, type_: int, *, code: bool = False, system: bool = False) -> KvmSegment:
    return KvmSegment(
        base=0, limit=0x67 if system else 0xFFFFFFFF, selector=selector, type=type_, present=1,
        dpl=0, db=0 if code or system else 1, s=0 if system else 1, l=1 if code else 0,
        g=0 if system else 1,
    )


def long_mode_sregs(sregs: KvmSregs) -> KvmSregs:
    """Turn the vCPU's reset sregs into 64-bit mode with our page tables and GDT."""
    sregs.cs = _segment(CODE_SELECTOR, 11, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(DATA_SELECTOR, 3))
    sregs.tr = _segment(TSS_SELECTOR, 11, system=True)
    sregs.tr.base = TSS_GPA
    sregs.gdt.base, sregs.gdt.limit = GDT_GPA, len(gdt()) - 1
    sregs.cr0 = CR0_PE | CR0_NE | CR0_PG
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def install_system(vm: Vm, code: bytes) -> GuestMemory:
    """Create the system memslot with page tables, GDT and ``code`` at CODE_GPA."""
    memory = vm.add_memslot(SYSTEM_SLOT, 0, SYSTEM_SIZE)
    for gpa, table in page_tables().items():
        memory.write(gpa, table)
    memory.write(GDT_GPA, gdt())
    if CODE_GPA + len(code) > STACK_TOP - 0x10000:
        raise ValueError(f"guest code of {len(code)} bytes does not fit the system slot")
    memory.write(CODE_GPA, code)
    return memory


def start_vcpu(vm: Vm, vcpu_id: int = 0, entry: int = CODE_GPA) -> Vcpu:
    """A vCPU in long mode about to execute ``entry`` with the stack at STACK_TOP."""
    vcpu = vm.create_vcpu(vcpu_id)
    vcpu.set_sregs(long_mode_sregs(vcpu.get_sregs()))
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = entry, STACK_TOP, 0x2
    vcpu.set_regs(regs)
    return vcpu


# -- guest side of the ucall ------------------------------------------------------
def emit_ucall(asm: Assembler, command: int, argument_reg: int | None = None) -> None:
    """Guest code for a ucall; clobbers rax, rdx (and takes the argument in rbx)."""
    if argument_reg is not None and argument_reg != RBX:
        asm.mov(RBX, argument_reg)
    asm.mov_imm(RAX, command)
    asm.mov_imm(RDX, UCALL_PORT)
    asm.out_dx_eax()


# -- host side of the ucall -------------------------------------------------------
def read_ucall(vcpu: Vcpu) -> tuple[int, int] | None:
    """(command, argument) if the last exit was a ucall, else None."""
    try:
        io = vcpu.io()
    except ValueError:
        return None
    if io.port != UCALL_PORT or io.size != 4:
        return None
    command = struct.unpack("<I", io.data[:4])[0]
    return command, vcpu.get_regs().rbx
