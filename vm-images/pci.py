"""QEMU's PCI devices as the guest agent sees them: found by their ids, their memory mapped."""

import glob
import mmap
import os


def find(vendor: int, device: int) -> str | None:
    """The sysfs directory of the first PCI device with these ids, or None."""
    for path in sorted(glob.glob("/sys/bus/pci/devices/*")):
        try:
            with open(f"{path}/vendor") as vendor_file, open(f"{path}/device") as device_file:
                if (int(vendor_file.read(), 16), int(device_file.read(), 16)) == (vendor, device):
                    return path
        except (OSError, ValueError):
            continue
    return None


def map_bar(path: str, bar: int) -> mmap.mmap | None:
    """BAR ``bar`` of the device at ``path``, read-only, through sysfs (a BAR that starts on
    a page: sysfs maps whole pages from the page the BAR starts in)."""
    try:
        fd = os.open(f"{path}/resource{bar}", os.O_RDONLY)
    except OSError:
        return None
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def map_register(path: str) -> tuple[mmap.mmap, int] | None:
    """The page holding BAR 0 of the device at ``path``, writable, and where in it the BAR
    starts; the device's memory decoding is switched on first (no driver did). Through
    /dev/mem, since sysfs would map the page from its start, not from a BAR within it."""
    try:
        with open(f"{path}/enable", "w") as enable:
            enable.write("1")
        with open(f"{path}/resource") as resources:
            start = int(resources.readline().split()[0], 16)
        fd = os.open("/dev/mem", os.O_RDWR | os.O_SYNC)
    except (OSError, ValueError, IndexError):
        return None
    page = start - start % mmap.PAGESIZE
    try:
        return mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=page), start - page
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
