"""Boot a kernel in QEMU, run one command in the guest, and say how it went.

The flow reads top to bottom in ``run``: check the kernel, assemble the initramfs
(cached image + cached modules + per-run layer), start QEMU, follow the guest's
streams until the job reports its exit code, the VM dies or the timeout passes, then
collect results and read the console for kernel splats. QEMU never outlives a failed
or interrupted run: it is killed in ``finally`` and, unless kept, also dies with us
through PR_SET_PDEATHSIG.
"""

import ctypes
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab import accel as accel_mod
from kvmlab import clock as clock_mod
from kvmlab import console, emulator, image, initramfs, invariant_watch, layer, modules_archive, qemu, runs
from kvmlab.errors import EXIT_HANG, EXIT_INVARIANT, EXIT_LOST, EXIT_SPLAT, KvmlabError
from kvmlab.kernels import Kernel

PR_SET_PDEATHSIG = 1
POWEROFF_GRACE_S = 15.0


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
    check_every_s: float | None = None
    """Pause the guest and check its memslot invariants this often (needs debuginfo)."""
    files: dict[str, str] = field(default_factory=dict)
    """Extra small files for the guest's /kvmlab/ (name → text)."""


@dataclass
class RunResult:
    """How a run ended. ``exit_code`` is what ``kvmlab run`` exits with."""

    outcome: str  # ok | failed | splat | hang | lost | kept
    exit_code: int
    job_code: int | None
    message: str
    run_dir: Path
    boot_s: float | None = None
    """QEMU start to the guest init's first console line (kernel boot + initramfs)."""
    ready_s: float | None = None
    """QEMU start to the job starting (modules loaded, ports open)."""
    total_s: float = 0.0
    splats: list[console.Splat] = field(default_factory=list)
    checks: invariant_watch.WatchReport | None = None


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


def prepare(kernel: Kernel, options: RunOptions, run_dir: Path, log=sys.stderr) -> qemu.Machine:
    """Everything up to the QEMU command line: checks, archives, accelerator, emulator, clock."""
    chosen = accel_mod.choose(options.accel)
    qemu_emulator = emulator.choose()
    clock = clock_mod.choose(options.clock, chosen, qemu_emulator, options.clock_default)
    require_kvm(kernel)
    append, env = options.append, options.env
    if clock.name == clock_mod.ICOUNT:
        append = f"{clock_mod.QUIET_APPEND} {append}".strip()
        env = {**clock_mod.QUIET_ENV, **env}
    recipe = image.recipe(options.recipe)
    parts = [image.build(recipe, log=log)]
    modules = modules_archive.archive(kernel, recipe.modules, kernel.store or run_dir)
    if modules is not None:
        parts.append(modules)
    argv, files = options.argv, dict(options.files)
    if options.trace:
        files["trace.json"] = json.dumps(options.trace)
        argv = ["python3", "-m", "traces.guest.capture", "/kvmlab/trace.json", "--", *argv]
    parts.append(layer.build(run_dir, argv, env, recipe.modules, options.keep,
                             options.added, files))
    initrd = run_dir / "initrd.cpio"
    initramfs.concatenate(parts, initrd)
    print(f"kvmlab: {chosen.describe()}; {qemu_emulator.describe()}; {clock.describe()}", file=log)
    runs.record(run_dir, qemu=qemu_emulator.to_json(), accel=chosen.name, cpu=chosen.cpu, clock=clock.name,
                cpus=options.cpus)
    return qemu.Machine(
        vmlinuz=kernel.vmlinuz, initrd=initrd, run_dir=run_dir, accel=chosen, emulator=qemu_emulator,
        clock=clock, cpus=options.cpus, memory_mb=options.memory_mb, append=append,
    )


def run(kernel: Kernel, options: RunOptions, log=sys.stderr) -> RunResult:
    """Boot ``kernel``, run ``options.argv`` in the guest, return how it ended."""
    run_dir = runs.new()
    runs.record(run_dir, kernel=kernel.spec, kernel_exact=kernel.exact_spec, release=kernel.release,
                argv=options.argv, keep=options.keep, state="preparing")
    machine = prepare(kernel, options, run_dir, log)
    argv = qemu.command(machine)
    (run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
    print(f"kvmlab: booting {kernel.release} ({kernel.spec}); run directory {run_dir}", file=log)
    started = time.monotonic()
    process = start_qemu(argv, run_dir, options.keep)
    runs.record(run_dir, qemu_pid=process.pid, qmp=str(machine.qmp_socket),
                debug_qmp=str(machine.debug_socket), state="running")
    followers = _follow_streams(run_dir, options.stream)
    watch = None
    if options.check_every_s:
        watch = invariant_watch.InvariantWatch(kernel, machine.debug_socket, machine.qmp_socket, run_dir,
                                               options.check_every_s)
    kept = False
    try:
        try:
            status = _wait(process, run_dir, started, options, watch)
        except KeyboardInterrupt:
            runs.record(run_dir, state="interrupted")
            raise
        kept = options.keep and status.exit_code is not None
        if status.exit_code is not None and not kept:
            wait_for_exit(process, POWEROFF_GRACE_S)
    finally:
        if not kept:
            kill(process)
        for follower in followers:
            follower.finish()
        # QEMU loaded these at start; the image and modules stay cached elsewhere.
        for archive in (machine.initrd, run_dir / "layer.cpio"):
            archive.unlink(missing_ok=True)
    result = judge(status, run_dir, started, kept, machine, options.timeout_s, options.stall_s)
    if watch is not None:
        _judge_checks(result, watch.report)
    _collect_results(run_dir, options.out, log)
    runs.record(run_dir, state=result.outcome, exit_code=result.exit_code,
                job_code=result.job_code, boot_s=result.boot_s, ready_s=result.ready_s,
                total_s=result.total_s)
    return result


def start_qemu(argv: list[str], run_dir: Path, keep: bool) -> subprocess.Popen:
    def die_with_parent() -> None:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    with open(run_dir / "qemu.log", "wb") as qemu_log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=None if keep else die_with_parent,
        )


USERSPACE_MARK = b"kvmlab-init: userspace reached"


@dataclass
class Status:
    exit_code: int | None = None
    userspace_at: float | None = None
    ready_at: float | None = None
    last_beat: float | None = None
    timed_out: bool = False
    stalled: bool = False
    init_error: str | None = None


def _wait(process: subprocess.Popen, run_dir: Path, started: float, options: RunOptions,
          watch: invariant_watch.InvariantWatch | None = None) -> Status:
    """Follow status.jsonl until the job exits, QEMU ends, or the timeout passes.

    With a ``watch``, its checks run while the job does; the time they keep the guest
    paused counts against neither the timeout nor the stall timeout.
    """
    status = Status()
    status_file = run_dir / "status.jsonl"
    console_log = run_dir / "console.log"
    seen = 0
    deadline = started + options.timeout_s
    while True:
        seen = catch_up(status, status_file, seen, started)
        if status.userspace_at is None and console_log.exists():
            if USERSPACE_MARK in console_log.read_bytes():
                status.userspace_at = time.monotonic() - started
        if status.exit_code is not None or process.poll() is not None:
            catch_up(status, status_file, seen, started)
            return status
        if time.monotonic() > deadline:
            status.timed_out = True
            return status
        # Before its first heartbeat the guest is still booting: QEMU's start counts as one,
        # so a kernel that livelocks in boot is caught as soon as one that livelocks later.
        last_sign = status.last_beat if status.last_beat is not None else 0.0
        if options.stall_s and time.monotonic() - started - last_sign > options.stall_s:
            status.timed_out = status.stalled = True
            return status
        if watch is not None and status.ready_at is not None and watch.due(time.monotonic()):
            paused = watch.check()
            deadline += paused
            if status.last_beat is not None:
                status.last_beat += paused
            seen = catch_up(status, status_file, seen, started)
            if watch.report.error and (process.poll() is not None or status.exit_code is not None):
                watch.report.error = None  # the guest went away under the check: not the checker's fault
        time.sleep(0.05)


def catch_up(status: Status, status_file: Path, seen: int, started: float) -> int:
    """Apply the status events written since line ``seen``; returns the new count."""
    lines = _read_lines(status_file)
    for line in lines[seen:]:
        _apply_event(status, line, started)
    return len(lines)


def _read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    return text.splitlines()[: text.count("\n")]


def _apply_event(status: Status, line: str, started: float) -> None:
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return
    if event.get("event") in ("ready", "heartbeat"):
        status.last_beat = time.monotonic() - started
    if event.get("event") == "ready":
        status.ready_at = status.last_beat
    elif event.get("event") == "exit":
        status.exit_code = int(event["code"])


def wait_for_exit(process: subprocess.Popen, grace_s: float) -> None:
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def judge(status: Status, run_dir: Path, started: float, kept: bool,
           machine: qemu.Machine, timeout_s: float, stall_s: float) -> RunResult:
    """Turn what was observed into an outcome, an exit code and one line to say."""
    text = machine.console_log.read_text(errors="replace") if machine.console_log.exists() else ""
    splats = console.find_splats(text)
    total = time.monotonic() - started
    result = RunResult("ok", 0, status.exit_code, "", run_dir, status.userspace_at,
                       status.ready_at, total, splats)
    if splats:
        worst = console.worst(splats)
        assert worst is not None
        result.outcome, result.exit_code = "splat", EXIT_SPLAT
        if status.timed_out:
            result.outcome, result.exit_code = "hang", EXIT_HANG
        result.message = f"guest kernel reported a {worst.summary()}\n{worst.excerpt}"
    elif status.stalled:
        result.outcome, result.exit_code = "hang", EXIT_HANG
        where = "stopped responding" if status.ready_at is not None else "never finished booting"
        result.message = (
            f"guest hang: the guest {where} (no heartbeat for {stall_s:g} s; its kernel "
            f"is frozen or livelocked); console tail:\n{console.tail(text)}"
        )
    elif status.timed_out:
        result.outcome, result.exit_code = "hang", EXIT_HANG
        result.message = (
            f"guest hang: no exit within the {timeout_s:g} s timeout; "
            f"console tail:\n{console.tail(text)}"
        )
    elif status.exit_code is None:
        result.outcome, result.exit_code = "lost", EXIT_LOST
        result.message = (
            f"VM lost: QEMU ended without the job's exit status; console tail:\n{console.tail(text)}"
        )
    elif kept:
        result.outcome, result.exit_code = "kept", status.exit_code
        result.message = (f"VM kept running; QMP socket {machine.qmp_socket} "
                          f"(kvmlab inspect {run_dir.name}; kvmlab stop {run_dir.name})")
    else:
        result.outcome = "ok" if status.exit_code == 0 else "failed"
        result.exit_code = status.exit_code
    return result


def _judge_checks(result: RunResult, report: invariant_watch.WatchReport) -> None:
    """A violation, or checks that could not run, fail a run that otherwise passed."""
    result.checks = report
    if report.failed and result.outcome in ("ok", "failed", "kept"):
        result.outcome, result.exit_code = "invariant", EXIT_INVARIANT
        result.message = "\n".join(filter(None, [report.summary(), result.message]))


def _collect_results(run_dir: Path, out: Path | None, log) -> None:
    """Unpack results.tar into ``out`` (default: the run directory's results/)."""
    target = out or run_dir / "results"
    archive = run_dir / "results.tar"
    target.mkdir(parents=True, exist_ok=True)
    if not archive.exists() or archive.stat().st_size == 0:
        return
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as err:
        print(f"kvmlab: results archive incomplete ({err}); kept as {archive}", file=log)


class _Follower:
    """Copy a file QEMU is writing to one of our streams as it grows."""

    def __init__(self, path: Path, sink):
        self.path, self.sink = path, sink
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        offset = 0
        while True:
            finishing = self._done.is_set()
            if self.path.exists():
                with open(self.path, "rb") as source:
                    source.seek(offset)
                    chunk = source.read()
                if chunk:
                    offset += len(chunk)
                    self.sink.write(chunk)
                    self.sink.flush()
            if finishing:
                return
            self._done.wait(0.05)

    def finish(self) -> None:
        self._done.set()
        self._thread.join()


def _follow_streams(run_dir: Path, stream: bool) -> list[_Follower]:
    if not stream:
        return []
    return [
        _Follower(run_dir / "stdout", sys.stdout.buffer),
        _Follower(run_dir / "stderr", sys.stderr.buffer),
    ]
