"""The words a KVM test is written in: the KVM system, a VM, its memslots, a vCPU.

Modelled on the upstream selftests' kvm_util, so a test reads as the experiment::

    with KvmSystem() as kvm, kvm.create_vm() as vm:
        memory = vm.add_memslot(0, gpa=0, size=0x10000)
        memory.write(0x1000, program)
        vcpu = vm.create_vcpu(0)
        ...
        vcpu.run()

Every failed ioctl raises :class:`KvmError`, whose message names the ioctl, the errno
and the arguments, because "Invalid argument" alone says nothing about which of a
thousand memslot updates was refused. File descriptors are closed by context
managers; a VM closes the vCPUs and guest memory it created.

Only the standard library is used: this runs on the guest image's python3.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
from collections import namedtuple

from kselftest_py.ioctls import (
    IOCTL_NAMES,
    KVM_CHECK_EXTENSION,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_VCPU,
    KVM_CREATE_VM,
    KVM_ENABLE_CAP,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_MMIO,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_SUPPORTED_CPUID,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_USER_MEMORY_REGION,
    KvmClearDirtyLog,
    KvmDirtyLog,
    KvmEnableCap,
    KvmRegs,
    KvmSregs,
    KvmUserspaceMemoryRegion,
    exit_reason_name,
    kvm_cpuid2,
)

__all__ = [
    "DirtyBitmap", "DirtyLogCall", "GuestMemory", "IoExit", "KvmError", "KvmSystem", "MemslotUpdate",
    "MmioExit", "Vcpu", "Vm", "allow_vcpu_stops",
]

KVM_DEVICE = "/dev/kvm"

# struct kvm_run offsets (include/uapi/linux/kvm.h): exit_reason follows
# request_interrupt_window, immediate_exit and 6 bytes of padding; the exit union
# starts after flags, cr8 and apic_base.
_RUN_EXIT_REASON = struct.Struct("<I")
_RUN_EXIT_REASON_OFFSET = 8
_RUN_IMMEDIATE_EXIT_OFFSET = 1
_RUN_EXIT_UNION_OFFSET = 32
# union member io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset
_RUN_IO = struct.Struct("<BBHIQ")


class KvmError(Exception):
    """An ioctl on a KVM file descriptor failed.

    ``ioctl`` is the C name of the request, ``arguments`` the readable argument
    list and ``errno`` the error number, so callers can branch on EINVAL, EEXIST, ...
    """

    def __init__(self, ioctl: str, arguments: str, err: int):
        self.ioctl = ioctl
        self.arguments = arguments
        self.errno = err
        name = errno.errorcode.get(err, f"errno {err}")
        super().__init__(f"{ioctl}({arguments}) failed: {name}")


def _ioctl(fd: int, request: int, arg=0, arguments: str = "") -> int:
    """Issue one ioctl; ``arg`` is an int or a mutable buffer (ctypes struct, bytearray).

    A mutable buffer is passed by address and updated in place, which is how the
    kernel writes _IOR structs back. fcntl.ioctl releases the GIL around the call.
    ``arguments`` describes the call for the error message.
    """
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as err:
        name = IOCTL_NAMES.get(request, f"ioctl {request:#x}")
        raise KvmError(name, arguments, err.errno) from err


class _FdOwner:
    """Owns one file descriptor; closing twice is harmless."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class KvmSystem(_FdOwner):
    """``/dev/kvm``: the system-wide KVM API (versions, capabilities, VM creation).

    Opening raises the plain OSError of ``os.open`` (FileNotFoundError when the
    module is not loaded, PermissionError without access) so a test can turn it
    into a skip.
    """

    def __init__(self, path: str = KVM_DEVICE):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self._supported_cpuid: ctypes.Structure | None = None

    def api_version(self) -> int:
        """KVM_GET_API_VERSION; 12 on every kernel since 2.6.22."""
        return _ioctl(self.fd, KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else 1 or a capability-specific value."""
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, f"cap={cap}")

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (struct kvm_run and more)."""
        return _ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> ctypes.Structure:
        """KVM_GET_SUPPORTED_CPUID: every CPUID leaf KVM can give a vCPU, as it would set them.

        The kernel answers E2BIG while the buffer is too small, so it grows until it fits.
        """
        if self._supported_cpuid is None:
            room = 64
            while True:
                cpuid = kvm_cpuid2(room)
                try:
                    _ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, cpuid, f"nent={room}")
                    break
                except KvmError as err:
                    if err.errno != errno.E2BIG or room >= 4096:
                        raise
                    room *= 2
            self._supported_cpuid = cpuid
        return self._supported_cpuid

    def create_vm(self, machine_type: int = 0) -> Vm:
        """KVM_CREATE_VM. The VM lives on after this ``KvmSystem`` is closed.

        Its vCPUs get KVM's supported CPUID, as upstream's selftests give theirs: since
        "KVM: x86: Check EFER validity on KVM_SET_SREGS*" (in 7.x and stable 6.12.117)
        KVM_SET_SREGS refuses long mode to a vCPU whose CPUID lacks LM.
        """
        cpuid = self.supported_cpuid()
        fd = _ioctl(self.fd, KVM_CREATE_VM, machine_type, f"type={machine_type}")
        try:
            return Vm(fd, self.vcpu_mmap_size(), cpuid)
        except BaseException:
            os.close(fd)
            raise


class GuestMemory:
    """Anonymous host memory to back a memslot, with the host address KVM needs.

    Private anonymous memory with transparent huge pages off, as upstream's
    VM_MEM_SRC_ANONYMOUS: shared (shmem) memory or THP would change what unmapping
    and faulting cost, and so what the memslot tests measure. The address is read
    through ctypes and the ctypes view dropped at once, because an exported buffer
    would stop the mapping from ever being closed.
    """

    def __init__(self, size: int):
        self.size = size
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError as err:
            if err.errno != errno.EINVAL:  # EINVAL: a kernel without THP, where it is off anyway
                raise
        view = ctypes.c_char.from_buffer(self._map)
        self.hva = ctypes.addressof(view)
        del view

    def zero(self) -> None:
        """Write zeroes over all of it, which makes the kernel allocate every page now
        (as upstream's prepare_vm does with memset) rather than at the first touch."""
        ctypes.memset(self.hva, 0, self.size)

    @property
    def buffer(self) -> mmap.mmap:
        """The mapping itself, for tests that poll or patch guest memory in place."""
        return self._map

    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the memory at ``offset`` (the guest sees it at gpa + offset)."""
        self._map[offset : offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        return self._map[offset : offset + size]

    def close(self) -> None:
        self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


#: struct kvm_userspace_memory_region, packed: cheaper than building the ctypes struct.
MEMORY_REGION = struct.Struct("<IIQQQ")
assert MEMORY_REGION.size == ctypes.sizeof(KvmUserspaceMemoryRegion)


class MemslotUpdate:
    """One prepared KVM_SET_USER_MEMORY_REGION: the packed region and nothing else to build."""

    __slots__ = ("fd", "slot", "gpa", "size", "hva", "flags", "_region")

    def __init__(self, fd: int, slot: int, gpa: int, size: int, hva: int, flags: int = 0):
        self.fd, self.slot, self.gpa, self.size, self.hva, self.flags = fd, slot, gpa, size, hva, flags
        self._region = MEMORY_REGION.pack(slot, flags, gpa, size, hva)

    def apply(self) -> None:
        try:
            fcntl.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, self._region)
        except OSError as err:
            text = f"slot={self.slot}, gpa={self.gpa:#x}, size={self.size:#x}"
            text += f", flags={self.flags:#x}" if self.flags else ""
            raise KvmError("KVM_SET_USER_MEMORY_REGION", text, err.errno) from err


class DirtyBitmap:
    """One memslot's dirty bitmap: bit ``page`` (LSB first within each byte, as an x86
    ``unsigned long`` array reads) says whether that page of the slot was written.

    Sized in whole 64-bit words, because KVM copies whole longs to and from it. The
    memory is ctypes', so its address can go into the ioctl structs once and for all.
    """

    def __init__(self, npages: int):
        self.npages = npages
        self.nbytes = (npages + 63) // 64 * 8
        self._buffer = ctypes.create_string_buffer(self.nbytes)
        self.address = ctypes.addressof(self._buffer)

    @property
    def raw(self) -> bytes:
        return self._buffer.raw

    def fill(self, data: bytes) -> None:
        """Overwrite the bitmap (tests, and callers that build the bits themselves)."""
        if len(data) > self.nbytes:
            raise ValueError(f"{len(data)} bytes for a bitmap of {self.nbytes}")
        ctypes.memmove(self.address, data.ljust(self.nbytes, b"\0"), self.nbytes)

    def is_set(self, page: int) -> bool:
        return bool(self._buffer.raw[page >> 3] >> (page & 7) & 1)

    def count(self) -> int:
        """How many pages have their bit set."""
        return bin(int.from_bytes(self._buffer.raw, "little")).count("1")

    def missing(self, first: int, count: int, limit: int = 8) -> tuple[int, list[int]]:
        """Pages of ``[first, first + count)`` whose bit is clear: (how many, the first
        ``limit`` of them). One big-integer AND, so checking a whole slot is cheap."""
        if first < 0 or count < 0 or first + count > self.npages:
            raise ValueError(f"pages {first}..{first + count} outside a bitmap of {self.npages}")
        bits = int.from_bytes(self._buffer.raw, "little")
        clear = ~bits & ((1 << count) - 1) << first
        total = bin(clear).count("1")
        pages = []
        while clear and len(pages) < limit:
            lowest = clear & -clear
            pages.append(lowest.bit_length() - 1)
            clear ^= lowest
        return total, pages


#: struct kvm_dirty_log and struct kvm_clear_dirty_log, packed once per slot.
DIRTY_LOG = struct.Struct("<IIQ")
CLEAR_DIRTY_LOG = struct.Struct("<IIQQ")
assert DIRTY_LOG.size == ctypes.sizeof(KvmDirtyLog)
assert CLEAR_DIRTY_LOG.size == ctypes.sizeof(KvmClearDirtyLog)


class DirtyLogCall:
    """One prepared KVM_GET_DIRTY_LOG or KVM_CLEAR_DIRTY_LOG of one slot's bitmap.

    As :class:`MemslotUpdate`: the dirty-log tests call these for every slot on every
    iteration and time them, so the struct is packed once and a call is one ioctl. The
    kernel reads the struct and writes (get) or reads (clear) the bitmap at its address.
    """

    __slots__ = ("fd", "request", "slot", "bitmap", "_arg", "_text")

    def __init__(self, fd: int, request: int, slot: int, bitmap: DirtyBitmap, arg: bytes, text: str):
        self.fd, self.request, self.slot, self.bitmap = fd, request, slot, bitmap
        self._arg, self._text = arg, text

    def apply(self) -> None:
        try:
            fcntl.ioctl(self.fd, self.request, self._arg)
        except OSError as err:
            raise KvmError(IOCTL_NAMES[self.request], self._text, err.errno) from err


class Vm(_FdOwner):
    """A VM file descriptor: memslots and vCPUs.

    ``set_memslot``/``delete_memslot`` are the raw KVM_SET_USER_MEMORY_REGION calls
    the memslot tests time; ``add_memslot`` also allocates the backing memory and
    keeps it alive for as long as the VM, as upstream's vm_userspace_mem_region_add.
    """

    def __init__(self, fd: int, vcpu_mmap_size: int, cpuid: ctypes.Structure | None = None):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size
        self.cpuid = cpuid
        """The CPUID each new vCPU gets (None: KVM's default, an empty one)."""
        self.memory: dict[int, GuestMemory] = {}
        self.vcpus: list[Vcpu] = []

    def set_memslot(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, move or resize ``slot``, or delete it (size 0)."""
        self.memslot_update(slot, gpa, size, hva, flags).apply()

    def memslot_update(self, slot: int, gpa: int, size: int, hva: int, flags: int = 0) -> MemslotUpdate:
        """A KVM_SET_USER_MEMORY_REGION call prepared once, to be applied many times.

        The tests that time memslot updates apply the same few updates thousands of
        times; preparing them keeps Python's own cost out of what they measure.
        """
        return MemslotUpdate(self.fd, slot, gpa, size, hva, flags)

    def delete_memslot(self, slot: int) -> None:
        """Delete ``slot`` (size 0) and free the memory ``add_memslot`` gave it, if any."""
        self.set_memslot(slot, 0, 0, 0)
        memory = self.memory.pop(slot, None)
        if memory is not None:
            memory.close()

    def add_memslot(self, slot: int, gpa: int, size: int, flags: int = 0) -> GuestMemory:
        """Allocate ``size`` bytes of anonymous memory and map them at ``gpa`` as ``slot``."""
        memory = GuestMemory(size)
        try:
            self.set_memslot(slot, gpa, size, memory.hva, flags)
        except BaseException:
            memory.close()
            raise
        previous = self.memory.pop(slot, None)
        if previous is not None:
            previous.close()
        self.memory[slot] = memory
        return memory

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM: turn on capability ``cap`` with up to four arguments."""
        request = KvmEnableCap(cap=cap)
        for index, value in enumerate(args):
            request.args[index] = value
        _ioctl(self.fd, KVM_ENABLE_CAP, request, f"cap={cap}, args={list(args)}")

    def get_dirty_log_call(self, slot: int, bitmap: DirtyBitmap) -> DirtyLogCall:
        """A prepared KVM_GET_DIRTY_LOG: copy ``slot``'s dirty bits into ``bitmap``.

        Without manual protection this also clears them and write-protects the pages
        again; with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 that is left to
        :meth:`clear_dirty_log_call`.
        """
        return DirtyLogCall(self.fd, KVM_GET_DIRTY_LOG, slot, bitmap,
                            DIRTY_LOG.pack(slot, 0, bitmap.address), f"slot={slot}")

    def clear_dirty_log_call(self, slot: int, bitmap: DirtyBitmap, first_page: int = 0,
                             num_pages: int | None = None) -> DirtyLogCall:
        """A prepared KVM_CLEAR_DIRTY_LOG: clear (and write-protect again) the pages of
        ``slot`` whose bits ``bitmap`` has set, over ``num_pages`` from ``first_page``
        (the whole bitmap by default; KVM wants both multiples of 64 unless the range
        ends at the end of the slot)."""
        num_pages = bitmap.npages - first_page if num_pages is None else num_pages
        return DirtyLogCall(self.fd, KVM_CLEAR_DIRTY_LOG, slot, bitmap,
                            CLEAR_DIRTY_LOG.pack(slot, num_pages, first_page, bitmap.address),
                            f"slot={slot}, first_page={first_page}, num_pages={num_pages}")

    def get_dirty_log(self, slot: int, bitmap: DirtyBitmap) -> None:
        self.get_dirty_log_call(slot, bitmap).apply()

    def clear_dirty_log(self, slot: int, bitmap: DirtyBitmap, first_page: int = 0,
                        num_pages: int | None = None) -> None:
        self.clear_dirty_log_call(slot, bitmap, first_page, num_pages).apply()

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU, then KVM_SET_CPUID2 with the VM's CPUID, before any other
        vCPU ioctl (as upstream's vm_vcpu_add); the vCPU is closed with the VM."""
        fd = _ioctl(self.fd, KVM_CREATE_VCPU, vcpu_id, f"id={vcpu_id}")
        try:
            vcpu = Vcpu(fd, vcpu_id, self.vcpu_mmap_size)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        if self.cpuid is not None:
            vcpu.set_cpuid(self.cpuid)
        return vcpu

    def close(self) -> None:
        """Close vCPUs first, then the VM fd, then unmap guest memory."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        super().close()
        for memory in self.memory.values():
            memory.close()
        self.memory.clear()


IoExit = namedtuple("IoExit", "direction size port count data")
MmioExit = namedtuple("MmioExit", "phys_addr data length is_write")
MmioExit.__doc__ = """A KVM_EXIT_MMIO: a guest access to a gpa no memslot backs."""
# union member mmio: u64 phys_addr, u8 data[8], u32 len, u8 is_write
_RUN_MMIO = struct.Struct("<Q8sIB")
# exit_reason and, from the union, mmio's phys_addr, len and is_write: one unpack per exit
_RUN_REASON_AND_MMIO = struct.Struct("<I20xQ8xIB")
IoExit.__doc__ = """A KVM_EXIT_IO: ``data`` is the ``size * count`` bytes in kvm_run."""


#: Sent to a vCPU's thread by :meth:`Vcpu.stop`.
STOP_SIGNAL = signal.SIGUSR1


def allow_vcpu_stops() -> None:
    """Give STOP_SIGNAL a handler that does nothing (main thread only: Python sets
    handlers there). Sent to a thread in KVM_RUN, the signal then makes the ioctl
    return EINTR; left at its default it would end the process, and ignored it
    would never arrive."""
    if signal.getsignal(STOP_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(STOP_SIGNAL, lambda signum, frame: None)


class Vcpu(_FdOwner):
    """A vCPU file descriptor with its mmapped ``struct kvm_run``.

    :meth:`run` is KVM_RUN through ``fcntl.ioctl``, which releases the GIL for the
    duration of the call: a vCPU thread can sit in the guest while another Python
    thread changes memslots, which is what the memslot tests measure.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int):
        self.fd = fd
        self.id = vcpu_id
        self.kvm_run = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.stopped = False

    def stop(self, thread_id: int) -> None:
        """Make KVM_RUN in thread ``thread_id`` return KVM_EXIT_INTR, now and from now on,
        even if the guest never exits by itself (a guest spinning on memory it will never
        see change). KVM's documented way: ``immediate_exit`` catches a thread about to
        enter KVM_RUN, the signal (see :func:`allow_vcpu_stops`) one already inside.
        The thread must not have ended: a signal to an ended thread's id is undefined."""
        self.stopped = True
        self.kvm_run[_RUN_IMMEDIATE_EXIT_OFFSET] = 1
        signal.pthread_kill(thread_id, STOP_SIGNAL)

    def run(self) -> int:
        """KVM_RUN until the guest exits to user space; returns ``exit_reason``.

        Retried on EINTR, as upstream's vcpu_run does: a signal that interrupts the
        ioctl is not an exit of the guest, unless :meth:`stop` sent it.
        """
        while True:
            try:
                _ioctl(self.fd, KVM_RUN, 0, f"vcpu={self.id}")
            except KvmError as err:
                if err.errno == errno.EINTR:
                    if self.stopped:
                        return KVM_EXIT_INTR
                    continue
                raise
            return self.exit_reason

    def run_through_mmio_writes(self, low: int, high: int) -> int:
        """KVM_RUN again after every 8-byte MMIO write to [low, high]; returns the first
        other exit's reason.

        The move tests' guest writes into an area that is unbacked while its slot is
        away, thousands of times a second; C spends nothing on those exits, and every
        microsecond Python spends holds the GIL that the main thread needs when its
        memslot ioctl returns. So this path is one ioctl, one unpack and three compares.
        """
        fd, kvm_run, ioctl, unpack_from = self.fd, self.kvm_run, fcntl.ioctl, _RUN_REASON_AND_MMIO.unpack_from
        while True:
            try:
                ioctl(fd, KVM_RUN, 0)
            except OSError as err:
                if err.errno == errno.EINTR:
                    if self.stopped:
                        return KVM_EXIT_INTR
                    continue
                raise KvmError("KVM_RUN", f"vcpu={self.id}", err.errno) from err
            reason, phys_addr, length, is_write = unpack_from(kvm_run, _RUN_EXIT_REASON_OFFSET)
            if reason != KVM_EXIT_MMIO or not is_write or length != 8 or not low <= phys_addr <= high:
                return reason

    @property
    def exit_reason(self) -> int:
        return _RUN_EXIT_REASON.unpack_from(self.kvm_run, _RUN_EXIT_REASON_OFFSET)[0]

    @property
    def exit_reason_name(self) -> str:
        return exit_reason_name(self.exit_reason)

    def io(self) -> IoExit:
        """The ``io`` member of the last exit; only meaningful after KVM_EXIT_IO."""
        if self.exit_reason != KVM_EXIT_IO:
            raise ValueError(f"vCPU {self.id} last exit was {self.exit_reason_name}, not an I/O")
        direction, size, port, count, data_offset = _RUN_IO.unpack_from(
            self.kvm_run, _RUN_EXIT_UNION_OFFSET
        )
        data = self.kvm_run[data_offset : data_offset + size * count]
        return IoExit(direction, size, port, count, data)

    def mmio(self) -> MmioExit:
        """The ``mmio`` member of the last exit; only meaningful after KVM_EXIT_MMIO."""
        phys_addr, data, length, is_write = _RUN_MMIO.unpack_from(self.kvm_run, _RUN_EXIT_UNION_OFFSET)
        return MmioExit(phys_addr, data[:length], length, bool(is_write))

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        _ioctl(self.fd, KVM_GET_REGS, regs, f"vcpu={self.id}")
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, regs, f"vcpu={self.id}, rip={regs.rip:#x}")

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _ioctl(self.fd, KVM_GET_SREGS, sregs, f"vcpu={self.id}")
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, sregs,
               f"vcpu={self.id}, cr0={sregs.cr0:#x}, cr4={sregs.cr4:#x}, efer={sregs.efer:#x}")

    def set_cpuid(self, cpuid: ctypes.Structure) -> None:
        """KVM_SET_CPUID2: what CPUID tells the guest, and what KVM lets the vCPU set."""
        _ioctl(self.fd, KVM_SET_CPUID2, cpuid, f"vcpu={self.id}, nent={cpuid.nent}")

    def close(self) -> None:
        if not self.kvm_run.closed:
            self.kvm_run.close()
        super().close()
