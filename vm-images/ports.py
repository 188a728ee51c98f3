"""The guest's end of the virtio-serial ports: found by the name the host gave each one."""

import os
import time

SYSFS = "/sys/class/virtio-ports"


def find(names: tuple[str, ...], timeout_s: float = 20.0) -> dict[str, str]:
    """``/dev`` paths of the named ports, waiting for them to appear (they come a little
    after virtio_console loads); RuntimeError naming those still missing."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for dev in os.listdir(SYSFS) if os.path.isdir(SYSFS) else []:
            try:
                with open(f"{SYSFS}/{dev}/name") as handle:
                    name = handle.read().strip()
            except OSError:
                continue
            if name in names and os.path.exists(f"/dev/{dev}"):
                found[name] = f"/dev/{dev}"
        if len(found) == len(names):
            return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"virtio-serial ports missing: {sorted(set(names) - set(found))}")
        time.sleep(0.02)
