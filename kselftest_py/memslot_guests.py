"""The guest programs of the memslot performance tests, in kselftest_py's assembler.

Each program starts the same way — tell the host it is up (ucall sync), spin until
the host sets the start flag — and then loops over the test memory like upstream's
guest_code_test_memslot_* functions. The sync area is the first page of the test
area (in slot 1); ``perform_sync`` is the guest half of the host↔guest handshake:
it waits for the host to raise the sync flag and lowers it with a locked cmpxchg,
unless the host has raised the exit flag.

Registers the programs keep for their whole life: r8 → start flag, r9 → exit flag,
r10 → sync flag, r14 = 0. ucalls clobber rax, rbx and rdx; perform_sync clobbers
rax and rcx.
"""

from __future__ import annotations

from dataclasses import dataclass

from kselftest_py.memslot_layout import PAGE_SIZE
from kselftest_py.x86_asm import R8, R9, R10, R11, R14, RAX, RBX, RCX, RDX, Assembler, Code
from kselftest_py.x86_guest import CODE_GPA, UCALL_ABORT, UCALL_DONE, UCALL_SYNC, emit_ucall

MEM_GPA = 0x10000000
SYNC_GPA = MEM_GPA
TEST_GPA = MEM_GPA + PAGE_SIZE
START_FLAG, EXIT_FLAG, SYNC_FLAG, MOVE_AREA_PTR = 0, 1, 2, 8
VAL_1 = 0x1122334455667788
VAL_2 = 0x99AABBCCDDEEFF00


@dataclass(frozen=True)
class GuestParams:
    """What a guest program needs to know about the test; ``val_1`` is what it writes
    where upstream writes VAL_1 (tests of the -d verification change it), and ``hang``
    makes it spin for ever once started (tests of a guest that stops answering)."""

    map_size: int = 0
    unmap_size: int = 0
    test_size: int = 0
    move_size: int = 0
    val_1: int = VAL_1
    hang: bool = False


def _prologue(asm: Assembler, p: GuestParams) -> None:
    asm.mov_imm(R8, SYNC_GPA + START_FLAG)
    asm.mov_imm(R9, SYNC_GPA + EXIT_FLAG)
    asm.mov_imm(R10, SYNC_GPA + SYNC_FLAG)
    asm.xor32(R14, R14)
    asm.mov_imm(RBX, 0)
    emit_ucall(asm, UCALL_SYNC, RBX)
    asm.label("wait_for_start")
    asm.pause()
    asm.cmp_byte_imm(R8, 0)
    asm.jcc("e", "wait_for_start")
    if p.hang:
        asm.label("hang")
        asm.pause()
        asm.jmp("hang")


def _perform_sync(asm: Assembler) -> None:
    """Subroutine: eax = 1 once the host's sync flag was taken, 0 if told to exit."""
    asm.label("perform_sync")
    asm.cmp_byte_imm(R9, 0)
    asm.jcc("ne", "perform_sync_exit")
    asm.mov_imm(RAX, 1)  # expected flag value in al
    asm.mov_imm(RCX, 0)  # new flag value in cl
    asm.lock_cmpxchg_byte(R10, RCX)
    asm.jcc("ne", "perform_sync")
    asm.mov_imm(RAX, 1)
    asm.ret()
    asm.label("perform_sync_exit")
    asm.xor32(RAX, RAX)
    asm.ret()


def _sync_or_finish(asm: Assembler) -> None:
    asm.call("perform_sync")
    asm.test32(RAX, RAX)
    asm.jcc("z", "done")


def emit_page_loop(asm: Assembler, name: str, cursor: int, end: int, value: int) -> None:
    """Store register ``value`` in the first qword of every page from ``cursor`` (a
    register, advanced) up to register ``end``."""
    asm.label(name)
    asm.store(cursor, value)
    asm.add_imm(cursor, PAGE_SIZE)
    asm.cmp(cursor, end)
    asm.jcc("b", name)


def _write_pages(asm: Assembler, name: str, start: int, end: int, value: int) -> None:
    """Write ``value`` to the first qword of every page in [start, end)."""
    asm.mov_imm(RAX, start)
    asm.mov_imm(RCX, end)
    asm.mov_imm(RDX, value)
    emit_page_loop(asm, name, RAX, RCX, RDX)


def _epilogue(asm: Assembler) -> Code:
    asm.label("done")
    emit_ucall(asm, UCALL_DONE)
    asm.hlt()
    _perform_sync(asm)
    return asm.assemble()


def map_guest(p: GuestParams) -> Code:
    """Write every page of one half of the map area, sync, then the other half."""
    asm = Assembler(CODE_GPA)
    _prologue(asm, p)
    half = TEST_GPA + p.map_size // 2
    asm.label("loop")
    _write_pages(asm, "first_half", TEST_GPA, half, p.val_1)
    _sync_or_finish(asm)
    _write_pages(asm, "second_half", half, TEST_GPA + p.map_size, VAL_2)
    _sync_or_finish(asm)
    asm.jmp("loop")
    return _epilogue(asm)


def unmap_guest(p: GuestParams) -> Code:
    """Touch one page in each half of the unmap area per sync, so the host's time goes
    to unmapping, not to waiting for the guest."""
    asm = Assembler(CODE_GPA)
    _prologue(asm, p)
    asm.label("loop")
    for target, value in ((TEST_GPA, p.val_1), (TEST_GPA + p.unmap_size // 2, VAL_2)):
        asm.mov_imm(RAX, target)
        asm.mov_imm(RDX, value)
        asm.store(RAX, RDX)
        _sync_or_finish(asm)
    asm.jmp("loop")
    return _epilogue(asm)


def move_guest(p: GuestParams) -> Code:
    """Keep writing the move area (whose address the host left in the sync area) until
    told to exit; no syncs, as MMIO exits would dominate the measurement."""
    asm = Assembler(CODE_GPA)
    asm.mov_imm(RAX, SYNC_GPA + MOVE_AREA_PTR)
    asm.load(R11, RAX)
    _prologue(asm, p)
    asm.label("loop")
    asm.cmp_byte_imm(R9, 0)
    asm.jcc("ne", "done")
    asm.mov(RAX, R11)
    asm.mov(RCX, R11)
    asm.add_imm(RCX, p.move_size)
    asm.mov_imm(RDX, VAL_1)
    emit_page_loop(asm, "write", RAX, RCX, RDX)
    asm.jmp("loop")
    return _epilogue(asm)


def rw_guest(p: GuestParams) -> Code:
    """Write VAL_1 to every page; after a sync check the host's VAL_2 at mid-page and
    clear it, aborting with the wrong value if it differs."""
    asm = Assembler(CODE_GPA)
    _prologue(asm, p)
    end = TEST_GPA + p.test_size
    asm.label("loop")
    _write_pages(asm, "write", TEST_GPA, end, p.val_1)
    _sync_or_finish(asm)
    asm.mov_imm(RAX, TEST_GPA + PAGE_SIZE // 2)
    asm.mov_imm(RCX, end)
    asm.mov_imm(RDX, VAL_2)
    asm.label("check")
    asm.load(RBX, RAX)
    asm.cmp(RBX, RDX)
    asm.jcc("ne", "abort")
    asm.store(RAX, R14)
    asm.add_imm(RAX, PAGE_SIZE)
    asm.cmp(RAX, RCX)
    asm.jcc("b", "check")
    _sync_or_finish(asm)
    asm.jmp("loop")
    asm.label("abort")
    emit_ucall(asm, UCALL_ABORT, RBX)
    asm.hlt()
    return _epilogue(asm)
