"""Boot a lab VM: from a kernel and options to a running QEMU with its run directory.

``start`` is the one way kvmlab boots a guest (``guest.Guest`` drives it): ``settle``
checks the kernel and chooses the accelerator, QEMU and clock; ``assemble`` builds the
initramfs (cached image + cached modules + per-run layer); ``launch`` writes the
command line and starts QEMU, each step recorded in run.json. A guest restored from a
template (``template``) is settled and launched the same way, without the initramfs.
"""

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.vm import accel as accel_mod
from kvmlab.vm import clock as clock_mod
from kvmlab.vm import emulator, image, initramfs, layer, lifecycle, qemu, runs, vmcore
from kvmlab.vm import modules as modules_archive

TRACE_SPEC = "trace.json"
"""The probe set a traced job reads, in ``protocol.GUEST_ROOT``."""


@dataclass
class RunOptions:
    argv: list[str]
    timeout_s: float = 600.0
    stall_s: float = 90.0
    """A guest whose init sends no heartbeat for this long is declared hung (0: never)."""
    cpus: int = 2
    memory_mb: int = 4096
    accel: str | None = None
    clock: str | None = None
    """``icount``, ``wall`` or None/``auto``: ``clock_default`` where the accelerator allows it."""
    clock_default: str = clock_mod.WALL
    keep: bool = False
    out: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    append: str = ""
    recipe: str = image.DEFAULT_RECIPE
    stream: bool = True
    added: list[Path] = field(default_factory=list)
    trace: dict | None = None
    """A probe set from ``traces.probes.load`` plus buffer/format options: the job runs
    under ``traces.guest.capture``, and trace.dat comes back with the results."""
    checker: Callable[[qemu.Machine], lifecycle.Checker] | None = None
    """Makes a check to run now and then while the job runs, e.g. the memslot invariants
    (``kvmlab.inspect.watch.InvariantWatch.every``)."""
    files: dict[str, str] = field(default_factory=dict)
    """Extra small files for the guest's ``protocol.GUEST_ROOT`` (name → text)."""
    labels: dict = field(default_factory=dict)
    """Extra run.json fields naming who started the guest (a qualification: ``runs.QUALIFY``)."""
    fresh_boot: bool = False
    """Boot the kernel even where a template could be restored."""


@dataclass
class Booted:
    """A QEMU just started: where it keeps its files, how it was started, and when."""

    run_dir: Path
    machine: qemu.Machine
    process: subprocess.Popen
    started: float
    control: socket.socket
    """Listening on ``machine.control_socket``, where QEMU connects the control port as it
    starts (``qemu.command``); the guest accepts it."""


def traced(argv: list[str], out: str | None = None) -> list[str]:
    """``argv`` run under the guest's trace capture, which reads the probe set ``TRACE_SPEC``."""
    spec = f"{protocol.GUEST_ROOT}/{TRACE_SPEC}"
    return ["python3", "-m", "traces.guest.capture", spec, *(["--out", out] if out else []), "--", *argv]


def trace_files(spec: dict) -> dict[str, str]:
    """The layer file that carries probe set ``spec`` to a ``traced`` job."""
    return {TRACE_SPEC: json.dumps(spec)}


@dataclass(frozen=True)
class Settings:
    """How a guest of ``kernel`` runs, decided once before anything is built or started:
    the same settings make the same guest, which is what a template's key is made of."""

    kernel: Kernel
    accel: accel_mod.Accel
    emulator: emulator.Emulator
    clock: clock_mod.Clock
    cpus: int
    memory_mb: int
    append: str
    env: dict[str, str]
    recipe: image.Recipe
    modules: list[str]
    """What the guest init loads: the recipe's modules and the panic driver."""
    panic_driver: str | None
    announced: bool = False
    """The command already said what its guests run under (``Machine``): a guest need not."""


@dataclass(frozen=True)
class Machine:
    """The accelerator, QEMU and clock guests run under, decided once for a whole command."""

    accel: accel_mod.Accel
    emulator: emulator.Emulator
    clock: clock_mod.Clock

    @classmethod
    def choose(cls, accel: str | None = None, clock: str | None = None,
               clock_default: str = clock_mod.ICOUNT) -> "Machine":
        chosen = accel_mod.choose(accel)
        qemu_emulator = emulator.choose()
        return cls(chosen, qemu_emulator, clock_mod.choose(clock, chosen, qemu_emulator, clock_default))

    def describe(self) -> str:
        return f"{self.accel.describe()}; {self.emulator.describe()}; {self.clock.describe()}"


def settle(kernel: Kernel, options: RunOptions, machine: "Machine | None" = None) -> Settings:
    """Check the kernel and choose the accelerator, QEMU and clock for ``options`` (those
    of ``machine`` when one was chosen for the whole command)."""
    given = machine
    machine = machine or Machine.choose(options.accel, options.clock, options.clock_default)
    chosen, qemu_emulator, clock = machine.accel, machine.emulator, machine.clock
    require_kvm(kernel)
    require_emulator(kernel, qemu_emulator)
    append, env = options.append, options.env
    if clock.name == clock_mod.ICOUNT:
        append = f"{clock_mod.QUIET_APPEND} {append}".strip()
        env = {**clock_mod.QUIET_ENV, **env}
    recipe = image.recipe(options.recipe)
    panic_driver = modules_archive.first_available(kernel, vmcore.GUEST_MODULES)
    return Settings(kernel, chosen, qemu_emulator, clock, options.cpus, options.memory_mb, append, env,
                    recipe, recipe.modules + ([panic_driver] if panic_driver else []), panic_driver,
                    announced=given is not None)


def start(kernel: Kernel, options: RunOptions, log=sys.stderr, settings: Settings | None = None,
          ram_file: Path | None = None) -> Booted:
    """A new run directory and a QEMU booting ``kernel`` to run ``options.argv``
    (with ``ram_file``: its memory in that file, shared, to be saved as a template)."""
    run_dir = runs.new()
    runs.record(run_dir, kernel=kernel.spec, kernel_exact=kernel.pinned, release=kernel.release,
                argv=options.argv, keep=options.keep, state="preparing", **options.labels)
    settings = settings or settle(kernel, options)
    initrd = assemble(settings, options, run_dir, log)
    machine = machine_for(settings, run_dir, initrd, ram_file=ram_file, shared=True)
    return launch(machine, options.keep)


def launch(machine: qemu.Machine, keep: bool) -> Booted:
    """Start QEMU on ``machine``, its command line and pid in the run directory."""
    argv = qemu.command(machine)
    run_dir = machine.run_dir
    (run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
    with open(machine.mailbox, "wb") as mailbox:
        mailbox.truncate(protocol.MAILBOX_BYTES)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(machine.control_socket))
    control.listen(1)
    started = time.monotonic()
    try:
        process = lifecycle.start_qemu(argv, run_dir, keep)
    except BaseException:
        control.close()
        raise
    runs.record(run_dir, qemu_pid=process.pid, qmp=str(machine.qmp_socket),
                debug_qmp=str(machine.debug_socket), state="running")
    return Booted(run_dir, machine, process, started, control)


def require_kvm(kernel: Kernel) -> None:
    """Refuse, before booting, a kernel that cannot give the guest a /dev/kvm."""
    if kernel.config is None:
        return
    if kernel.config_value("KVM") not in ("y", "m"):
        raise KvmlabError(
            f"kernel {kernel.release} ({kernel.spec}) has no KVM support (CONFIG_KVM unset)"
        )
    if not any(kernel.config_value(v) in ("y", "m") for v in ("KVM_AMD", "KVM_INTEL")):
        raise KvmlabError(f"kernel {kernel.release} has neither kvm_amd nor kvm_intel")


def require_emulator(kernel: Kernel, qemu_emulator: emulator.Emulator) -> None:
    """Refuse, before booting, a kernel known to crash under this QEMU's TCG."""
    linux = tuple(int(part) for part in re.findall(r"\d+", kernel.release)[:2])
    if linux >= (6, 12) and qemu_emulator.version_tuple < emulator.LINUX_6_12_MIN_VERSION:
        wanted = ".".join(map(str, emulator.LINUX_6_12_MIN_VERSION))
        raise KvmlabError(
            f"kernel {kernel.release} double-faults while booting under QEMU {qemu_emulator.version}; "
            f"it needs QEMU {wanted} or later (unset $KVMLAB_QEMU to use kvmlab's own QEMU)"
        )


def assemble(settings: Settings, options: RunOptions, run_dir: Path, log=sys.stderr) -> Path:
    """The run's initramfs: cached image + cached modules + a layer with the job and its files."""
    parts = [image.build(settings.recipe, log=log)]
    modules = modules_archive.archive(settings.kernel, settings.modules, settings.kernel.store or run_dir)
    if modules is not None:
        parts.append(modules)
    argv, files = options.argv, dict(options.files)
    if options.trace:
        files.update(trace_files(options.trace))
        argv = traced(argv)
    job = protocol.Job(argv=argv, env=settings.env, modules=settings.modules, keep=options.keep)
    parts.append(layer.build(run_dir, job, options.added, files))
    initrd = run_dir / "initrd.cpio"
    initramfs.concatenate(parts, initrd)
    describe(settings, run_dir, log)
    return initrd


def describe(settings: Settings, run_dir: Path, log=sys.stderr) -> None:
    """Say (``log`` None: only record) and record in run.json what the guest runs under."""
    if log is not None and not settings.announced:
        print(f"kvmlab: {settings.accel.describe()}; {settings.emulator.describe()}; "
              f"{settings.clock.describe()}", file=log)
    runs.record(run_dir, qemu=settings.emulator.to_json(), accel=settings.accel.name, cpu=settings.accel.cpu,
                clock=settings.clock.name, cpus=settings.cpus, memory_mb=settings.memory_mb,
                panic_driver=settings.panic_driver)


def machine_for(settings: Settings, run_dir: Path, initrd: Path, ram_file: Path | None = None,
                shared: bool = False, incoming: bool = False) -> qemu.Machine:
    return qemu.Machine(
        vmlinuz=settings.kernel.vmlinuz, initrd=initrd, run_dir=run_dir, accel=settings.accel,
        emulator=settings.emulator, clock=settings.clock, cpus=settings.cpus, memory_mb=settings.memory_mb,
        append=settings.append, ram_file=ram_file, ram_shared=shared, incoming=incoming,
    )
