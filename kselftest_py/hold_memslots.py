"""hold_memslots: create a VM with a known memslot layout and hold it until killed.

    python3 -m kselftest_py.hold_memslots [-n SLOTS|max] [--detach]

For looking at memslots from outside the process (``kvmlab inspect``, drgn): it prints
one JSON line saying exactly what it created, ``{"pid", "slots": [{"id", "gpa", "size",
"hva", "flags"}, ...]}`` in gfn order, then keeps the VM open. ``--detach`` holds it in
a background child and returns once the VM is complete, so that a ``kvmlab run --keep``
job can end while the VM lives on.

The layout is built to catch a reader that gets one thing wrong: slot ids are shuffled
against gfn order, sizes vary (1 to 3 pages), some slots are followed by a hole, and
every seventh slot has dirty logging on. All slots share one anonymous mapping, so the
kernel's maximum (32764 slots on Linux >= 5.17) costs no memory until touched.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import sys

from kselftest_py.ioctls import KVM_CAP_NR_MEMSLOTS, KVM_MEM_LOG_DIRTY_PAGES
from kselftest_py.kvm import KvmSystem

PAGE_SIZE = 4096
BASE_GPA = 1 << 32
#: Knuth's multiplicative hash, to shuffle slot ids against gfn order.
_SHUFFLE = 2654435761


def layout(count: int) -> list[dict]:
    """The slots to create, in gfn order, each with an offset into the shared mapping."""
    ids = sorted(range(count), key=lambda k: (k * _SHUFFLE) % (1 << 32))
    slots, gpa, offset = [], BASE_GPA, 0
    for index, slot_id in enumerate(ids):
        size = (1 + index % 3) * PAGE_SIZE
        flags = KVM_MEM_LOG_DIRTY_PAGES if index % 7 == 0 else 0
        slots.append({"id": slot_id, "gpa": gpa, "size": size, "offset": offset, "flags": flags})
        gpa += size + (PAGE_SIZE if index % 5 == 4 else 0)
        offset += size
    return slots


def create(count: int) -> tuple:
    """Open /dev/kvm, create the VM and its slots; returns what must stay alive, and the report."""
    kvm = KvmSystem()
    limit = kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
    if count > limit:
        raise SystemExit(f"hold_memslots: {count} slots asked, the kernel allows {limit}")
    planned = layout(count)
    total = sum(slot["size"] for slot in planned) or PAGE_SIZE
    memory = mmap.mmap(-1, total, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = _address(memory)
    vm = kvm.create_vm()
    report = []
    for slot in planned:
        hva = base + slot["offset"]
        vm.set_memslot(slot["id"], slot["gpa"], slot["size"], hva, slot["flags"])
        report.append({"id": slot["id"], "gpa": slot["gpa"], "size": slot["size"], "hva": hva,
                       "flags": slot["flags"]})
    return (kvm, vm, memory), {"pid": os.getpid(), "limit": limit, "slots": report}


def _address(memory: mmap.mmap) -> int:
    import ctypes

    view = ctypes.c_char.from_buffer(memory)
    address = ctypes.addressof(view)
    del view  # an exported buffer would keep the mapping from ever closing
    return address


def hold_forever() -> None:
    while True:
        signal.pause()


def detach(count: int) -> int:
    """Hold the VM in a child in its own session; print its report once it is ready."""
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.close(read_end)
        os.setsid()
        try:
            alive, report = create(count)
            message = json.dumps(report)
        except BaseException as err:  # the parent reports it; nothing else sees this child
            os.write(write_end, f"error: {err}".encode())
            os._exit(1)
        with os.fdopen(write_end, "w") as pipe:
            pipe.write(message)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        hold_forever()
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    if not message.startswith("{"):
        print(f"hold_memslots: {message or 'the holder died before its VM was ready'}", file=sys.stderr)
        return 1
    print(message, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hold_memslots", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--slots", default="40", help="slot count, or 'max' for the kernel's limit")
    parser.add_argument("--detach", action="store_true", help="hold the VM in the background and return")
    args = parser.parse_args(argv)
    if args.slots == "max":
        with KvmSystem() as kvm:
            count = kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
    else:
        count = int(args.slots)
    if args.detach:
        return detach(count)
    alive, report = create(count)
    print(json.dumps(report), flush=True)
    hold_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
