"""The assembler, the page tables and the guest programs, checked without KVM.

Encodings are cross-checked against binutils' objdump: an independent disassembler
must read back exactly the instruction each method claims to emit.
"""

import shutil
import struct
import subprocess
import tempfile

import pytest

from kselftest_py import memslot_guests as guests
from kselftest_py.ioctls import KvmSregs
from kselftest_py.x86_asm import R8, R9, R10, R11, R14, RAX, RBP, RBX, RCX, RDX, RSI, RSP, Assembler
from kselftest_py.x86_guest import (
    CODE_GPA,
    GDT_GPA,
    PAGE_HUGE,
    PD_GPA,
    PDPT_GPA,
    PML4_GPA,
    gdt,
    long_mode_sregs,
    page_tables,
)

needs_objdump = pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils' objdump not installed")


def disassemble(code: bytes, origin: int = 0x1000) -> list[str]:
    """objdump's reading of ``code``: one normalised 'mnemonic operands' string per line."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as handle:
        handle.write(code)
        handle.flush()
        done = subprocess.run(
            ["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={origin:#x}", handle.name],
            capture_output=True, check=True,
        )
    lines = []
    for line in done.stdout.decode().splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].strip().endswith(":"):
            lines.append(" ".join(parts[2].split()))
    return lines


CASES = [
    (lambda a: a.mov_imm(RAX, 0x10001000), "movabs $0x10001000,%rax"),
    (lambda a: a.mov_imm(R9, 0x99AABBCCDDEEFF00), "movabs $0x99aabbccddeeff00,%r9"),
    (lambda a: a.mov(RBX, R11), "mov %r11,%rbx"),
    (lambda a: a.store(RAX, RDX), "mov %rdx,(%rax)"),
    (lambda a: a.store(R8, R14), "mov %r14,(%r8)"),
    (lambda a: a.load(R11, RSI), "mov (%rsi),%r11"),
    (lambda a: a.xor32(R14, R14), "xor %r14d,%r14d"),
    (lambda a: a.add_imm(RCX, 4096), "add $0x1000,%rcx"),
    (lambda a: a.cmp(RAX, RCX), "cmp %rcx,%rax"),
    (lambda a: a.cmp_byte_imm(R9, 0), "cmpb $0x0,(%r9)"),
    (lambda a: a.test32(RAX, RAX), "test %eax,%eax"),
    (lambda a: a.lock_cmpxchg_byte(R10, RCX), "lock cmpxchg %cl,(%r10)"),
    (lambda a: a.out_dx_eax(), "out %eax,(%dx)"),
    (lambda a: a.pause(), "pause"),
    (lambda a: a.hlt(), "hlt"),
    (lambda a: a.ret(), "ret"),
]


@needs_objdump
@pytest.mark.parametrize("emit,expected", CASES, ids=[c[1] for c in CASES])
def test_encoding_matches_objdump(emit, expected):
    asm = Assembler(0x1000)
    emit(asm)
    assert disassemble(asm.assemble()) == [expected]


@needs_objdump
def test_jumps_and_calls_resolve_forward_and_backward():
    asm = Assembler(0x1000)
    asm.label("top")          # 0x1000
    asm.jcc("b", "bottom")    # 0x1000, 6 bytes
    asm.call("top")           # 0x1006, 5 bytes
    asm.jmp("top")            # 0x100b, 5 bytes
    asm.label("bottom")       # 0x1010
    asm.hlt()
    assert disassemble(asm.assemble()) == ["jb 0x1010", "call 0x1000", "jmp 0x1000", "hlt"]
    assert asm.address("bottom") == 0x1010


def test_assembled_code_names_an_address_by_its_label():
    asm = Assembler(0x1000)
    asm.hlt()                 # 0x1000, before any label
    asm.label("loop")         # 0x1001
    asm.pause()               # 0x1001, 2 bytes
    asm.jmp("loop")           # 0x1003
    asm.label("done")         # 0x1008
    asm.hlt()
    code = asm.assemble()
    assert isinstance(code, bytes) and len(code) == 9
    assert code.where(0x1000) == "code+0x0"
    assert code.where(0x1001) == "loop"
    assert code.where(0x1003) == "loop+0x2"
    assert code.where(0x1008) == "done"
    assert code.where(0x1009) == "0x1009, outside the guest code"
    assert code.where(0xFFF) == "0xfff, outside the guest code"


@needs_objdump
def test_an_injected_hang_spins_right_after_the_start():
    normal = guests.map_guest(guests.GuestParams(map_size=1 << 20))
    hung = guests.map_guest(guests.GuestParams(map_size=1 << 20, hang=True))
    assert "hang" not in normal.labels
    at = hung.labels["hang"]
    assert hung.labels["wait_for_start"] < at < hung.labels["loop"]
    text = disassemble(hung[at:at + 7], CODE_GPA + at)
    assert text == ["pause", f"jmp {CODE_GPA + at:#x}"]


def test_bad_uses_are_refused():
    asm = Assembler()
    with pytest.raises(ValueError, match="memory base"):
        asm.store(RSP, RAX)
    with pytest.raises(ValueError, match="memory base"):
        asm.load(RAX, RBP)
    with pytest.raises(ValueError, match="cmpxchg source"):
        asm.lock_cmpxchg_byte(RAX, RSI)
    asm.jmp("nowhere")
    with pytest.raises(ValueError, match="undefined label 'nowhere'"):
        asm.assemble()
    asm.label("x")
    with pytest.raises(ValueError, match="defined twice"):
        asm.label("x")


def _entry(table: bytes, index: int) -> int:
    return struct.unpack_from("<Q", table, index * 8)[0]


def test_page_tables_identity_map_with_2mib_pages():
    tables = page_tables(gigabytes=4)
    assert set(tables) == {PML4_GPA, PDPT_GPA} | {PD_GPA + i * 4096 for i in range(4)}
    assert all(len(t) == 4096 for t in tables.values())
    assert _entry(tables[PML4_GPA], 0) & ~0xFFF == PDPT_GPA
    assert _entry(tables[PML4_GPA], 1) == 0
    for gpa in (0, guests.MEM_GPA, guests.MEM_GPA + (512 << 20) + 4096, (4 << 30) - 1):
        pd = _entry(tables[PDPT_GPA], gpa >> 30) & ~0xFFF
        pde = _entry(tables[pd], (gpa >> 21) & 511)
        assert pde & PAGE_HUGE and pde & 0x3 == 0x3
        assert (pde & ~0x1FFFFF) + (gpa & 0x1FFFFF) == gpa
    assert _entry(tables[PDPT_GPA], 4) == 0


def test_long_mode_sregs_and_gdt_agree():
    sregs = long_mode_sregs(KvmSregs())
    assert sregs.efer & 0x500 == 0x500 and sregs.cr0 & 0x80000001 == 0x80000001
    assert sregs.cr4 & 0x20 and sregs.cr3 == PML4_GPA
    assert (sregs.cs.l, sregs.cs.db, sregs.cs.selector) == (1, 0, 0x08)
    assert sregs.gdt.base == GDT_GPA and sregs.gdt.limit == len(gdt()) - 1
    descriptor = struct.unpack_from("<Q", gdt(), sregs.cs.selector)[0]
    assert descriptor >> 53 & 1 == 1  # the L bit of the code descriptor


@needs_objdump
def test_guest_programs_disassemble_cleanly():
    params = guests.GuestParams(map_size=32 << 20, unmap_size=128 << 20, test_size=512 << 20,
                                move_size=50 * 4096)
    for build in (guests.map_guest, guests.unmap_guest, guests.move_guest, guests.rw_guest):
        text = disassemble(build(params), CODE_GPA)
        assert not any("(bad)" in line for line in text), build.__name__
        assert "out %eax,(%dx)" in text and "lock cmpxchg %cl,(%r10)" in text


def test_injected_value_reaches_the_guest_code():
    normal = guests.map_guest(guests.GuestParams(map_size=1 << 20))
    wrong = guests.map_guest(guests.GuestParams(map_size=1 << 20, val_1=guests.VAL_1 ^ 0xFF))
    assert struct.pack("<Q", guests.VAL_1) in normal
    assert struct.pack("<Q", guests.VAL_1) not in wrong
