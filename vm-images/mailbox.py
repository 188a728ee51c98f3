"""The first request's mailbox: memory the host writes while the guest is paused.

A restored guest repeats its template's run to the instruction only if its first request
reaches it at the same instruction in every restore. A virtio-serial port cannot give
that: QEMU takes nothing from the host's end of a port while the guest is paused, and
passes on what waits there once the guest runs, at a moment host timing picks (one
restore in ten then took its request a context switch later; docs/benchmarks.md,
determinism). So the host writes the first request into a shared-memory PCI device
(QEMU's ``ivshmem-plain``, ``protocol.MAILBOX_*``) while the guest is paused, and the
agent, until its first request, looks into the mailbox every ``LOOK_S`` of guest time
and listens on the port in between: in a restore, its first look finds the request.

Layout: a little-endian 8-byte length, then that many bytes, one request line (JSON).
A length of 0, or one larger than the device, is an empty mailbox.
"""

import mmap

from kvmlab_guest import pci, protocol

LOOK_S = 0.005
HEADER = 8


def open_mailbox() -> mmap.mmap | None:
    """The mailbox device's memory, read-only; None where there is none."""
    path = pci.find(protocol.MAILBOX_VENDOR, protocol.MAILBOX_DEVICE)
    return None if path is None else pci.map_bar(path, 2)


def post(path, data: bytes) -> int:
    """The host's end: write the message ``data`` into the mailbox file at ``path`` of a
    paused guest; how much of ``data`` that was (0: too big for the mailbox)."""
    line = data.rstrip(b"\n")
    if HEADER + len(line) > protocol.MAILBOX_BYTES:
        return 0
    with open(path, "r+b") as handle:
        handle.seek(HEADER)
        handle.write(line)
        handle.seek(0)
        handle.write(len(line).to_bytes(HEADER, "little"))
    return len(data)


def take(box: mmap.mmap) -> bytes | None:
    """The request line in ``box``, if the host has written one."""
    length = int.from_bytes(box[:HEADER], "little")
    if not 0 < length <= len(box) - HEADER:
        return None
    return box[HEADER : HEADER + length]
