"""A vmcore from a guest kernel that panicked, for drgn (``drgn -c RUN/vmcore``).

QEMU gets a pvpanic device and ``-action panic=pause``: a guest kernel with the pvpanic
driver loaded tells QEMU when it panics, and QEMU stops it there (QMP status
``guest-panicked``) instead of letting ``panic=-1`` reboot it, which ``-no-reboot``
would turn into QEMU's exit. The host sees the panic line on the console
(``Liveness``), waits for that status, saves the guest's memory with QMP
``dump-guest-memory`` as an ELF core, whose zero blocks are then punched out (a sparse
file: it takes on disk what the guest had touched), and only then ends QEMU.

A kernel without the driver still panics and ends QEMU as before, without a vmcore,
and the run says so. A dump never fills the disk: it is skipped, in one line, unless
the run directory's file system has room for the guest's whole memory.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlab.errors import KvmlabError
from kvmlab.vm import qmp, runs

FILE = "vmcore"
#: An ELF core, which drgn reads itself. (QEMU's kdump formats carry no architecture in
#: their header, and libkdumpfile, through which drgn reads them, refuses them for it.)
FORMAT = "elf"
#: The guest driver that reports a panic to QEMU's ISA pvpanic device (ACPI QEMU0001):
#: pvpanic-mmio on Linux >= 5.14, pvpanic itself before.
GUEST_MODULES = ("pvpanic_mmio", "pvpanic")
#: How long a panicking guest may take from the panic line to QEMU's pause.
PAUSE_WAIT_S = 10.0
#: Room kept free beyond the dump's worst case (the guest's whole memory).
MARGIN_MB = 256
DUMP_TIMEOUT_S = 600.0


def qemu_args() -> list[str]:
    return ["-device", "pvpanic", "-action", "panic=pause"]


@dataclass
class Dump:
    """What became of a panicked guest's memory: ``path`` when saved, else ``skipped``."""

    path: Path | None = None
    bytes: int = 0
    seconds: float = 0.0
    skipped: str | None = None
    disk_bytes: int = 0
    """What the file takes on disk: the memory the guest had touched (zero blocks are holes)."""

    def to_json(self) -> dict:
        if self.path is None:
            return {"vmcore_skipped": self.skipped}
        return {"vmcore": str(self.path), "vmcore_bytes": self.bytes, "vmcore_disk_bytes": self.disk_bytes,
                "vmcore_s": round(self.seconds, 2), "vmcore_format": FORMAT}

    def describe(self) -> str:
        if self.path is None:
            return f"no vmcore: {self.skipped}"
        mib = 2**20
        size = f"{self.bytes / mib:.0f} MiB, {self.disk_bytes / mib:.0f} MiB on disk, {self.seconds:.1f} s"
        return f"vmcore: {self.path} ({size}; kvmlab inspect {self.path.parent.name}, or drgn -c {self.path})"


def room_problem(directory: Path, memory_mb: int) -> str | None:
    """Why ``directory`` cannot take a dump of a ``memory_mb`` guest, or None."""
    free_mb = shutil.disk_usage(directory).free // 2**20
    needed = memory_mb + MARGIN_MB
    if free_mb < needed:
        return (f"{directory} has {free_mb} MiB free; a {memory_mb} MiB guest's dump may need up to "
                f"{needed} MiB (with {MARGIN_MB} MiB kept free)")
    return None


def save(run_dir: Path, qmp_socket: Path, process: subprocess.Popen, memory_mb: int) -> Dump:
    """Dump a guest that panicked, once QEMU has paused it, and record it in run.json;
    ``Dump.skipped`` says why not."""
    dump = _save(run_dir, qmp_socket, process, memory_mb)
    runs.record(run_dir, **dump.to_json())
    return dump


def _save(run_dir: Path, qmp_socket: Path, process: subprocess.Popen, memory_mb: int) -> Dump:
    if not _paused_by_panic(qmp_socket, process):
        return Dump(skipped="QEMU did not stop the guest at its panic (is the guest's pvpanic "
                            f"driver loaded? modules {', '.join(GUEST_MODULES)})")
    problem = room_problem(run_dir, memory_mb)
    if problem:
        return Dump(skipped=problem)
    target = run_dir / FILE
    started = time.monotonic()
    try:
        qmp.execute(qmp_socket, "dump-guest-memory",
                    {"paging": False, "protocol": f"file:{target}", "format": FORMAT},
                    timeout_s=DUMP_TIMEOUT_S)
    except KvmlabError as err:
        target.unlink(missing_ok=True)
        return Dump(skipped=str(err))
    # The guest's untouched memory is zeros: give those blocks back to the file system.
    subprocess.run(["fallocate", "--dig-holes", str(target)], capture_output=True, check=False)
    stat = target.stat()
    return Dump(target, stat.st_size, time.monotonic() - started, disk_bytes=stat.st_blocks * 512)


def _paused_by_panic(qmp_socket: Path, process: subprocess.Popen) -> bool:
    deadline = time.monotonic() + PAUSE_WAIT_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if qmp.execute(qmp_socket, "query-status").get("status") == "guest-panicked":
                return True
        except KvmlabError:
            return False
        time.sleep(0.1)
    return False
