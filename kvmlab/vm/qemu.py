"""The QEMU command line for a lab VM, built from plain settings.

Fixed parts of the contract with the guest (``kvmlab_guest.protocol``): the serial
console goes to ``console.log``; four virtio-serial output ports, each written by QEMU
to a file in the run directory, and the control port for the guest agent, which QEMU
connects as it starts to a UNIX socket kvmlab listens on; the first request's mailbox
(``kvmlab_guest.mailbox``) and the device the agent pauses its VM with
(``kvmlab_guest.hold``); ``-device vmcoreinfo`` and a QMP socket so that drgn can
attach; ``oops=panic`` so that an Oops does not leave a half-dead guest; a pvpanic
device that pauses a panicked guest for its vmcore (``vmcore``), and for kernels without
its driver ``panic=-1`` with ``-no-reboot``, so that a crashed kernel ends QEMU instead
of rebooting.

A guest whose memory is to be saved as a template (``template``) or restored from one
keeps its RAM in a file (``memory-backend-file``): shared while the template boots, so
that the file is the memory, and private (copy-on-write) when restored, so that any
number of guests map one template. A restored QEMU waits for its device state
(``-incoming defer``) before it runs.
"""

from dataclasses import dataclass, field
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab.vm import vmcore
from kvmlab.vm.accel import Accel
from kvmlab.vm.clock import Clock
from kvmlab.vm.emulator import Emulator

#: Port name in the guest → file name in the run directory.
PORT_FILES = {
    protocol.PORT_STATUS: "status.jsonl",
    protocol.PORT_STDOUT: "stdout",
    protocol.PORT_STDERR: "stderr",
    protocol.PORT_RESULTS: "results.tar",
}
assert set(PORT_FILES) == set(protocol.OUTPUT_PORTS)
BASE_APPEND = f"console=ttyS0 loglevel=5 panic=-1 oops=panic rdinit={protocol.INIT}"


@dataclass
class Machine:
    vmlinuz: Path
    initrd: Path
    run_dir: Path
    accel: Accel
    emulator: Emulator
    clock: Clock
    cpus: int = 2
    memory_mb: int = 4096
    append: str = ""
    extra: list[str] = field(default_factory=list)
    ram_file: Path | None = None
    """Guest RAM in this file instead of anonymous memory (a template's, or one being made)."""
    ram_shared: bool = False
    """Writes reach ``ram_file`` (a template booting); else they stay private (a restore)."""
    incoming: bool = False
    """Start paused, waiting for a migration stream (``migrate-incoming``): a restore."""

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def debug_socket(self) -> Path:
        """A second QMP socket, for drgn: QEMU serves one client per QMP socket, and drgn
        keeps its connection open, so kvmlab's own commands (stop, cont, quit) need theirs."""
        return self.run_dir / "drgn.sock"

    @property
    def control_socket(self) -> Path:
        """The host end of the control port, for the guest agent (``kvmlab_guest.agent``)."""
        return self.run_dir / "control.sock"

    @property
    def mailbox(self) -> Path:
        """The memory of the guest's mailbox device, where a restored guest's first request
        waits for it (``kvmlab_guest.mailbox``)."""
        return self.run_dir / "mailbox"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"


def command(machine: Machine) -> list[str]:
    """The full argv that boots ``machine``."""
    run = machine.run_dir
    argv = [
        *machine.emulator.command(), "-name", f"kvmlab-{run.name}",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", machine.accel.name, "-cpu", machine.accel.cpu, *machine.clock.qemu_args(),
        "-smp", str(machine.cpus), "-m", f"{machine.memory_mb}M", *_memory_args(machine),
        "-kernel", str(machine.vmlinuz), "-initrd", str(machine.initrd),
        "-append", f"{BASE_APPEND} {machine.append}".strip(),
        "-chardev", f"file,id=console,path={machine.console_log}",
        "-serial", "chardev:console",
        # ioeventfd=off: the guest's kicks are handled as it makes them, not later in QEMU's
        # main loop, where the buffers it hands back (an interrupt) came at a moment host
        # timing picked, during the command being measured (docs/benchmarks.md, determinism).
        "-device", "virtio-serial-pci,id=vser,ioeventfd=off",
        "-device", "vmcoreinfo", *vmcore.qemu_args(),
        "-qmp", f"unix:{machine.qmp_socket},server=on,wait=off",
        "-qmp", f"unix:{machine.debug_socket},server=on,wait=off",
        "-pidfile", str(run / "qemu.pid"),
    ]
    argv += machine.emulator.firmware_args()
    for number, (port, filename) in enumerate(PORT_FILES.items()):
        chardev = f"port{number}"
        argv += [
            "-chardev", f"file,id={chardev},path={run / filename}",
            "-device", f"virtserialport,bus=vser.0,chardev={chardev},name={port}",
        ]
    # QEMU connects the control port itself, so that the port is open from the moment its
    # device exists. A port the host opens later costs the guest an event at a moment host
    # timing picks, in a boot and in a restore alike (where QEMU passes it on only once the
    # guest runs again): restores of one template then ran memslot_perf a 4 ms tick apart
    # about one time in eight (docs/benchmarks.md, determinism).
    argv += [
        "-chardev", f"socket,id=control,path={machine.control_socket},server=off",
        "-device", f"virtserialport,bus=vser.0,chardev=control,name={protocol.PORT_CONTROL}",
        # Shared while a template boots, as its RAM is, so that saving it leaves the mailbox
        # out; private in a restore, where the guest still sees what the host writes to the
        # file, because it only reads it.
        "-object", f"memory-backend-file,id=mailbox,size={protocol.MAILBOX_BYTES},"
                   f"mem-path={machine.mailbox},share={'on' if machine.ram_shared else 'off'}",
        "-device", "ivshmem-plain,memdev=mailbox,master=on",
        # The agent pauses its VM through this one once it is ready (``kvmlab_guest.hold``),
        # where the host's ``stop`` came at a moment host timing picked; ``-action
        # panic=pause`` (``vmcore``) pauses it. No guest driver binds it: kvmlab loads none.
        "-device", "pvpanic-pci,id=hold",
    ]
    if machine.incoming:
        argv += ["-incoming", "defer"]
    return argv + machine.extra


def _memory_args(machine: Machine) -> list[str]:
    if machine.ram_file is None:
        return []
    share = "on" if machine.ram_shared else "off"
    backend = (f"memory-backend-file,id=ram0,size={machine.memory_mb}M,"
               f"mem-path={machine.ram_file},share={share}")
    return ["-object", backend, "-machine", "memory-backend=ram0"]
