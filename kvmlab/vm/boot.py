"""Boot a lab VM: from a kernel and options to a running QEMU with its run directory.

``start`` is the one way kvmlab starts a guest, whether it runs one command
(``runner``) or stays up for many (``session``): check the kernel, choose the
accelerator, QEMU and clock, assemble the initramfs (cached image + cached modules +
per-run layer), write the command line and start QEMU, recording each step in run.json.
"""

import json
import re
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


@dataclass
class Booted:
    """A QEMU just started: where it keeps its files, how it was started, and when."""

    run_dir: Path
    machine: qemu.Machine
    process: subprocess.Popen
    started: float


def traced(argv: list[str], out: str | None = None) -> list[str]:
    """``argv`` run under the guest's trace capture, which reads the probe set ``TRACE_SPEC``."""
    spec = f"{protocol.GUEST_ROOT}/{TRACE_SPEC}"
    return ["python3", "-m", "traces.guest.capture", spec, *(["--out", out] if out else []), "--", *argv]


def trace_files(spec: dict) -> dict[str, str]:
    """The layer file that carries probe set ``spec`` to a ``traced`` job."""
    return {TRACE_SPEC: json.dumps(spec)}


def start(kernel: Kernel, options: RunOptions, log=sys.stderr) -> Booted:
    """A new run directory and a QEMU booting ``kernel`` to run ``options.argv``."""
    run_dir = runs.new()
    runs.record(run_dir, kernel=kernel.spec, kernel_exact=kernel.pinned, release=kernel.release,
                argv=options.argv, keep=options.keep, state="preparing")
    machine = prepare(kernel, options, run_dir, log)
    argv = qemu.command(machine)
    (run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
    started = time.monotonic()
    process = lifecycle.start_qemu(argv, run_dir, options.keep)
    runs.record(run_dir, qemu_pid=process.pid, qmp=str(machine.qmp_socket),
                debug_qmp=str(machine.debug_socket), state="running")
    return Booted(run_dir, machine, process, started)


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


def prepare(kernel: Kernel, options: RunOptions, run_dir: Path, log=sys.stderr) -> qemu.Machine:
    """Everything up to the QEMU command line: checks, archives, accelerator, emulator, clock."""
    chosen = accel_mod.choose(options.accel)
    qemu_emulator = emulator.choose()
    clock = clock_mod.choose(options.clock, chosen, qemu_emulator, options.clock_default)
    require_kvm(kernel)
    require_emulator(kernel, qemu_emulator)
    append, env = options.append, options.env
    if clock.name == clock_mod.ICOUNT:
        append = f"{clock_mod.QUIET_APPEND} {append}".strip()
        env = {**clock_mod.QUIET_ENV, **env}
    recipe = image.recipe(options.recipe)
    parts = [image.build(recipe, log=log)]
    panic_driver = modules_archive.first_available(kernel, vmcore.GUEST_MODULES)
    wanted = recipe.modules + ([panic_driver] if panic_driver else [])
    modules = modules_archive.archive(kernel, wanted, kernel.store or run_dir)
    if modules is not None:
        parts.append(modules)
    argv, files = options.argv, dict(options.files)
    if options.trace:
        files.update(trace_files(options.trace))
        argv = traced(argv)
    job = protocol.Job(argv=argv, env=env, modules=wanted, keep=options.keep)
    parts.append(layer.build(run_dir, job, options.added, files))
    initrd = run_dir / "initrd.cpio"
    initramfs.concatenate(parts, initrd)
    print(f"kvmlab: {chosen.describe()}; {qemu_emulator.describe()}; {clock.describe()}", file=log)
    runs.record(run_dir, qemu=qemu_emulator.to_json(), accel=chosen.name, cpu=chosen.cpu, clock=clock.name,
                cpus=options.cpus, memory_mb=options.memory_mb, panic_driver=panic_driver)
    return qemu.Machine(
        vmlinuz=kernel.vmlinuz, initrd=initrd, run_dir=run_dir, accel=chosen, emulator=qemu_emulator,
        clock=clock, cpus=options.cpus, memory_mb=options.memory_mb, append=append,
    )
