"""The guest pauses its own VM, at an instruction of its choosing.

Under icount a guest's work repeats to the instruction only if nothing reaches it at a
moment host timing picks. The host pausing a guest it has booted is such a moment: the
guest idles at its agent until the host's ``stop`` (or its first request) arrives, and
under ``-icount sleep=off`` idle guest time races ahead of the host, so every boot was
stopped at another point of its timers and work queues.

So the agent, once it has said ``agent-ready``, pauses the VM itself: it writes
"panicked" into a pvpanic-pci device of its own (``protocol.HOLD_*``; no driver binds it),
and QEMU, started with ``-action panic=pause``, stops the guest right after that store
(status ``guest-panicked``; the guest kernel knows nothing of it). The host saves a
template there, or posts a fresh boot's first request into the mailbox, and continues it.
"""

import mmap

from kvmlab_guest import pci, protocol


def holder() -> tuple[mmap.mmap, int] | None:
    """The hold device's register (its page, and where in it), where there is one that
    pauses on "panicked"; else None."""
    path = pci.find(protocol.HOLD_VENDOR, protocol.HOLD_DEVICE)
    register = None if path is None else pci.map_register(path)
    if register is None:
        return None
    page, offset = register
    if not page[offset] & protocol.HOLD_EVENT:  # a pvpanic device reads as the events it takes
        page.close()
        return None
    return register


def hold(register: tuple[mmap.mmap, int]) -> None:
    """Pause the VM now (one byte stored); returns when the host continues it."""
    page, offset = register
    page[offset] = protocol.HOLD_EVENT
    page.close()
