"""The KVM user API as Python sees it: ioctl numbers, the structs they carry, constants.

Everything here mirrors include/uapi/linux/kvm.h and the x86 asm/kvm.h for x86-64.
The ioctl numbers are computed with the kernel's own _IOC encoding from the struct
sizes, so a wrong struct layout shows up as a wrong ioctl number (the unit tests pin
both against the values the kernel headers produce).
"""

from __future__ import annotations

import ctypes

# _IOC encoding (asm-generic/ioctl.h, used by x86): nr bits 0-7, type 8-15,
# size 16-29, direction 30-31.
IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Encode an ioctl request number the way the kernel's ``_IOC()`` macro does."""
    if not 0 <= size < (1 << IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {IOC_SIZEBITS} bits")
    if not 0 <= nr < (1 << IOC_NRBITS) or not 0 <= type_ < (1 << IOC_TYPEBITS):
        raise ValueError(f"ioctl type {type_:#x} / nr {nr:#x} out of range")
    return (
        (direction << IOC_DIRSHIFT)
        | (type_ << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )


def IO(type_: int, nr: int) -> int:
    """``_IO``: no argument struct (an int argument, or none)."""
    return IOC(IOC_NONE, type_, nr, 0)


def IOR(type_: int, nr: int, size: int) -> int:
    """``_IOR``: the kernel writes a struct of ``size`` bytes back to user space."""
    return IOC(IOC_READ, type_, nr, size)


def IOW(type_: int, nr: int, size: int) -> int:
    """``_IOW``: user space passes a struct of ``size`` bytes to the kernel."""
    return IOC(IOC_WRITE, type_, nr, size)


def IOWR(type_: int, nr: int, size: int) -> int:
    """``_IOWR``: a struct of ``size`` bytes goes in and comes back modified."""
    return IOC(IOC_READ | IOC_WRITE, type_, nr, size)


# --- structs (x86-64 layouts) ---------------------------------------------------


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``: one memslot, as KVM_SET_USER_MEMORY_REGION
    takes it. A ``memory_size`` of 0 deletes the slot."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (x86): the general-purpose registers, rip and rflags."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``: a segment register with its hidden descriptor cache."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``: a descriptor table register (GDTR, IDTR)."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    ]


KVM_NR_INTERRUPTS = 256


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (x86): segments, descriptor tables, control registers."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``: what CPUID returns for one leaf (``function``) and
    subleaf (``index``)."""

    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    ] + [("padding", ctypes.c_uint32 * 3)]  # fmt: skip


class KvmCpuid2Header(ctypes.Structure):
    """``struct kvm_cpuid2`` less its flexible array of entries: the ioctls' size."""

    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class KvmDirtyLog(ctypes.Structure):
    """``struct kvm_dirty_log``: KVM_GET_DIRTY_LOG's slot and the address of the bitmap
    KVM fills, one bit per page of the slot, in 64-bit words."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("padding1", ctypes.c_uint32),
        ("dirty_bitmap", ctypes.c_uint64),
    ]


class KvmClearDirtyLog(ctypes.Structure):
    """``struct kvm_clear_dirty_log``: KVM_CLEAR_DIRTY_LOG re-protects the pages whose bits
    are set in the bitmap, over ``num_pages`` pages from ``first_page`` of ``slot``."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("num_pages", ctypes.c_uint32),
        ("first_page", ctypes.c_uint64),
        ("dirty_bitmap", ctypes.c_uint64),
    ]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap``: a capability to enable on a VM (or vCPU) and its arguments."""

    _fields_ = [
        ("cap", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("args", ctypes.c_uint64 * 4),
        ("pad", ctypes.c_uint8 * 64),
    ]


def kvm_cpuid2(entries: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``entries`` entries, ``nent`` set to that."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", KvmCpuidEntry2 * entries)]

    cpuid = KvmCpuid2()
    cpuid.nent = entries
    return cpuid


# --- ioctl numbers ---------------------------------------------------------------

KVMIO = 0xAE
KVM_API_VERSION = 12

# on /dev/kvm
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, ctypes.sizeof(KvmCpuid2Header))
# on a VM fd
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = IOW(KVMIO, 0x42, ctypes.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, ctypes.sizeof(KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = IOWR(KVMIO, 0xC0, ctypes.sizeof(KvmClearDirtyLog))
# on a vCPU fd
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = IOW(KVMIO, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = IOR(KVMIO, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = IOW(KVMIO, 0x84, ctypes.sizeof(KvmSregs))
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, ctypes.sizeof(KvmCpuid2Header))

IOCTL_NAMES = {
    KVM_GET_API_VERSION: "KVM_GET_API_VERSION",
    KVM_CREATE_VM: "KVM_CREATE_VM",
    KVM_CHECK_EXTENSION: "KVM_CHECK_EXTENSION",
    KVM_GET_VCPU_MMAP_SIZE: "KVM_GET_VCPU_MMAP_SIZE",
    KVM_GET_SUPPORTED_CPUID: "KVM_GET_SUPPORTED_CPUID",
    KVM_CREATE_VCPU: "KVM_CREATE_VCPU",
    KVM_GET_DIRTY_LOG: "KVM_GET_DIRTY_LOG",
    KVM_SET_USER_MEMORY_REGION: "KVM_SET_USER_MEMORY_REGION",
    KVM_ENABLE_CAP: "KVM_ENABLE_CAP",
    KVM_CLEAR_DIRTY_LOG: "KVM_CLEAR_DIRTY_LOG",
    KVM_RUN: "KVM_RUN",
    KVM_GET_REGS: "KVM_GET_REGS",
    KVM_SET_REGS: "KVM_SET_REGS",
    KVM_GET_SREGS: "KVM_GET_SREGS",
    KVM_SET_SREGS: "KVM_SET_SREGS",
    KVM_SET_CPUID2: "KVM_SET_CPUID2",
}
"""Request number -> C name, so errors can say which ioctl failed."""

# --- capabilities (KVM_CHECK_EXTENSION) -------------------------------------------

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's flags (what KVM_CHECK_EXTENSION answers, and args[0])
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# --- memslot flags -------------------------------------------------------------------

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# --- exits (struct kvm_run.exit_reason) ---------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    KVM_EXIT_UNKNOWN: "KVM_EXIT_UNKNOWN",
    KVM_EXIT_EXCEPTION: "KVM_EXIT_EXCEPTION",
    KVM_EXIT_IO: "KVM_EXIT_IO",
    KVM_EXIT_HYPERCALL: "KVM_EXIT_HYPERCALL",
    KVM_EXIT_DEBUG: "KVM_EXIT_DEBUG",
    KVM_EXIT_HLT: "KVM_EXIT_HLT",
    KVM_EXIT_MMIO: "KVM_EXIT_MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "KVM_EXIT_IRQ_WINDOW_OPEN",
    KVM_EXIT_SHUTDOWN: "KVM_EXIT_SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "KVM_EXIT_FAIL_ENTRY",
    KVM_EXIT_INTR: "KVM_EXIT_INTR",
    KVM_EXIT_INTERNAL_ERROR: "KVM_EXIT_INTERNAL_ERROR",
    KVM_EXIT_SYSTEM_EVENT: "KVM_EXIT_SYSTEM_EVENT",
}

# struct kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


def exit_reason_name(reason: int) -> str:
    """``KVM_EXIT_IO`` for 2, and a readable fallback for reasons not listed here."""
    return EXIT_REASON_NAMES.get(reason, f"KVM_EXIT_{reason} (unknown)")
