"""A tiny x86-64 assembler: just the instructions the memslot guests need.

Guest programs are written as Python calls, one instruction each, so a test's guest
code reads like the assembly it is::

    asm = Assembler(origin=0x1000)
    asm.mov_imm(RAX, 0x10001000)
    asm.label("again")
    asm.store(RAX, RDX)          # mov [rax], rdx
    asm.add_imm(RAX, 4096)
    asm.cmp(RAX, RCX)
    asm.jcc("b", "again")        # jb again
    code = asm.assemble()

Labels may be used before they are defined; jumps and calls are always rel32 so
that their size never depends on the distance. Only the registers whose ModRM
encodings need no SIB byte or displacement are accepted as memory bases, which keeps
the encoder small and every encoding obvious; using another raises ValueError.
"""

from __future__ import annotations

import struct

__all__ = [
    "Assembler", "Code", "RAX", "RCX", "RDX", "RBX", "RSP", "RBP", "RSI", "RDI",
    "R8", "R9", "R10", "R11", "R12", "R13", "R14", "R15",
]

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9, R10, R11, R12, R13, R14, R15 = range(8, 16)

# ModRM mod=00 with r/m 100 (rsp, r12) needs a SIB byte and 101 (rbp, r13) means
# rip-relative: neither is a plain [reg] address.
_PLAIN_BASES = {RAX, RCX, RDX, RBX, RSI, RDI, R8, R9, R10, R11, R14, R15}

# Condition codes for Jcc (0F 80+cc): the suffixes the guests use.
CONDITIONS = {
    "o": 0x0, "no": 0x1, "b": 0x2, "ae": 0x3, "e": 0x4, "z": 0x4, "ne": 0x5, "nz": 0x5,
    "be": 0x6, "a": 0x7, "s": 0x8, "ns": 0x9, "l": 0xC, "ge": 0xD, "le": 0xE, "g": 0xF,
}


def _rex(w: bool, reg: int = 0, base: int = 0, force: bool = False) -> bytes:
    """The REX prefix for 64-bit operand size and the high halves of reg/base."""
    value = 0x40 | (w << 3) | ((reg >> 3) << 2) | (base >> 3)
    return bytes([value]) if value != 0x40 or force else b""


def _modrm(mod: int, reg: int, rm: int) -> bytes:
    return bytes([(mod << 6) | ((reg & 7) << 3) | (rm & 7)])


def _memory_base(base: int) -> int:
    if base not in _PLAIN_BASES:
        raise ValueError(f"register {base} cannot be a plain [reg] memory base here")
    return base


class Code(bytes):
    """Machine code that still knows its labels, so that a stopped guest's rip can be
    named ("first_half+0x3") in a failure instead of left as a number to look up."""

    origin: int
    labels: dict[str, int]

    def where(self, address: int) -> str:
        """The nearest label at or before ``address``, with the distance past it."""
        offset = address - self.origin
        if not 0 <= offset < len(self):
            return f"{address:#x}, outside the guest code"
        before = [(at, name) for name, at in self.labels.items() if at <= offset]
        if not before:
            return f"code+{offset:#x}"
        at, name = max(before)
        return name if at == offset else f"{name}+{offset - at:#x}"


class Assembler:
    """Collects instructions and labels, then resolves jumps in :meth:`assemble`."""

    def __init__(self, origin: int = 0):
        self.origin = origin
        self._code = bytearray()
        self._labels: dict[str, int] = {}
        self._fixups: list[tuple[int, str]] = []  # (offset of rel32, target label)

    # -- layout --------------------------------------------------------------
    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)

    def address(self, name: str) -> int:
        """The guest address of a defined label."""
        return self.origin + self._labels[name]

    def emit(self, data: bytes) -> None:
        self._code += data

    def _rel32(self, opcode: bytes, target: str) -> None:
        self.emit(opcode)
        self._fixups.append((len(self._code), target))
        self.emit(b"\0\0\0\0")

    def assemble(self) -> Code:
        """The machine code, with every jump and call pointed at its label."""
        code = bytearray(self._code)
        for offset, target in self._fixups:
            if target not in self._labels:
                raise ValueError(f"undefined label {target!r}")
            struct.pack_into("<i", code, offset, self._labels[target] - (offset + 4))
        program = Code(code)
        program.origin, program.labels = self.origin, dict(self._labels)
        return program

    # -- data movement ---------------------------------------------------------
    def mov_imm(self, reg: int, value: int) -> None:
        """mov reg, imm64 (REX.W B8+r): any 64-bit constant."""
        self.emit(_rex(True, base=reg) + bytes([0xB8 + (reg & 7)]) + struct.pack("<Q", value & (2**64 - 1)))

    def mov(self, dst: int, src: int) -> None:
        """mov dst, src (64-bit registers)."""
        self.emit(_rex(True, src, dst) + b"\x89" + _modrm(3, src, dst))

    def store(self, base: int, src: int) -> None:
        """mov qword [base], src."""
        self.emit(_rex(True, src, _memory_base(base)) + b"\x89" + _modrm(0, src, base))

    def load(self, dst: int, base: int) -> None:
        """mov dst, qword [base]."""
        self.emit(_rex(True, dst, _memory_base(base)) + b"\x8b" + _modrm(0, dst, base))

    def xor32(self, dst: int, src: int) -> None:
        """xor dst32, src32 (zeroes the whole 64-bit register when dst == src)."""
        self.emit(_rex(False, src, dst) + b"\x31" + _modrm(3, src, dst))

    # -- arithmetic and comparison ------------------------------------------
    def add_imm(self, reg: int, value: int) -> None:
        """add reg, imm32 (sign-extended to 64 bits)."""
        self.emit(_rex(True, base=reg) + b"\x81" + _modrm(3, 0, reg) + struct.pack("<i", value))

    def cmp(self, left: int, right: int) -> None:
        """cmp left, right (64-bit): flags of left - right."""
        self.emit(_rex(True, right, left) + b"\x39" + _modrm(3, right, left))

    def cmp_byte_imm(self, base: int, value: int) -> None:
        """cmp byte [base], imm8."""
        self.emit(_rex(False, base=_memory_base(base)) + b"\x80" + _modrm(0, 7, base) + bytes([value]))

    def test32(self, left: int, right: int) -> None:
        """test left32, right32."""
        self.emit(_rex(False, right, left) + b"\x85" + _modrm(3, right, left))

    def lock_cmpxchg_byte(self, base: int, src: int) -> None:
        """lock cmpxchg byte [base], src8: if [base] == al then [base] = src8, ZF=1."""
        if src >= 4:  # spl/bpl/sil/dil need REX, and ah/ch/dh/bh without it: keep it simple
            raise ValueError("cmpxchg source must be al, cl, dl or bl")
        self.emit(b"\xf0" + _rex(False, src, _memory_base(base)) + b"\x0f\xb0" + _modrm(0, src, base))

    # -- control flow --------------------------------------------------------
    def jmp(self, target: str) -> None:
        self._rel32(b"\xe9", target)

    def jcc(self, condition: str, target: str) -> None:
        """Conditional jump, e.g. ``jcc("ne", "loop")`` for jne loop."""
        self._rel32(bytes([0x0F, 0x80 + CONDITIONS[condition]]), target)

    def call(self, target: str) -> None:
        self._rel32(b"\xe8", target)

    def ret(self) -> None:
        self.emit(b"\xc3")

    # -- the rest ------------------------------------------------------------
    def out_dx_eax(self) -> None:
        """out dx, eax: a 4-byte port write, the guest side of a ucall."""
        self.emit(b"\xef")

    def pause(self) -> None:
        self.emit(b"\xf3\x90")

    def hlt(self) -> None:
        self.emit(b"\xf4")
