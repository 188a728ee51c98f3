"""One lab VM's life as the host sees it: start QEMU, follow the guest, judge how it ended.

Both ways kvmlab boots a guest use this: ``runner`` (``kvmlab run``: one command, then
power off) and ``session`` (a guest that stays up and takes commands, for qualify).
The guest's init reports on the status port (``status.jsonl`` in the run directory):
``ready`` when the job starts, a ``heartbeat`` every few seconds, ``exit`` with the
job's code. ``Liveness`` reads that file and says when the VM's life is over: the job
exited, QEMU ended, the deadline passed, or the heartbeats stopped (a frozen or
livelocked kernel). Time the guest spends paused, by a check or by the host on
purpose, counts as neither silence nor running time. ``judge`` then turns what was
seen, and the console's kernel reports, into one outcome and exit code.
"""

import ctypes
import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kvmlab_guest import protocol

from kvmlab.errors import EXIT_HANG, EXIT_INVARIANT, EXIT_LOST, EXIT_SPLAT
from kvmlab.vm import console

PR_SET_PDEATHSIG = 1
#: What Linux prints first when it panics (``console.SPLATS`` knows it too).
PANIC_LINE = b"Kernel panic - not syncing"
POWEROFF_GRACE_S = 15.0


def start_qemu(argv: list[str], run_dir: Path, keep: bool) -> subprocess.Popen:
    """Start ``argv`` (QEMU) logging to ``qemu.log``; unless kept, it dies with us."""

    def die_with_parent() -> None:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    with open(run_dir / "qemu.log", "wb") as qemu_log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=None if keep else die_with_parent,
        )


def wait_for_exit(process: subprocess.Popen, grace_s: float) -> None:
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


class CheckReport(Protocol):
    failed: bool

    def summary(self) -> str: ...


class Checker(Protocol):
    """A check that pauses the guest now and then while it runs (``kvmlab.inspect.watch``)."""

    report: CheckReport

    def due(self, now: float) -> bool: ...

    def check(self) -> float:
        """Run once; returns the seconds the guest was kept paused."""
        ...


@dataclass
class Status:
    """What the guest has said so far; times are seconds since QEMU started."""

    exit_code: int | None = None
    userspace_at: float | None = None
    ready_at: float | None = None
    last_beat: float | None = None
    timed_out: bool = False
    stalled: bool = False
    panicked: bool = False
    """The console shows the kernel's panic line (QEMU may have paused it for a vmcore)."""


class Liveness:
    """Follows one VM's status file and says when its life is over (``over``)."""

    def __init__(self, process: subprocess.Popen, run_dir: Path, timeout_s: float, stall_s: float,
                 started: float):
        self.process, self.stall_s, self.started = process, stall_s, started
        self.deadline = started + timeout_s
        self.status = Status()
        self._status_file = run_dir / "status.jsonl"
        self._console_log = run_dir / "console.log"
        self._seen = 0
        self._console_read = 0

    def over(self) -> bool:
        """Read what the guest said since the last call; True once the job exited, QEMU
        ended, the deadline passed or the heartbeats stopped (``status`` says which)."""
        self.catch_up()
        status = self.status
        self._read_console()
        if status.exit_code is not None or self.process.poll() is not None:
            self.catch_up()
            return True
        if status.panicked:  # QEMU pauses a guest with pvpanic there: its vmcore is next
            return True
        now = time.monotonic()
        if now > self.deadline:
            status.timed_out = True
            return True
        # Before its first heartbeat the guest is still booting: QEMU's start counts as one,
        # so a kernel that livelocks in boot is caught as soon as one that livelocks later.
        last_sign = status.last_beat if status.last_beat is not None else 0.0
        if self.stall_s and now - self.started - last_sign > self.stall_s:
            status.timed_out = status.stalled = True
            return True
        return False

    def _read_console(self) -> None:
        """Look at what the console gained since the last call for the userspace mark
        and the panic line (re-reading a little, so that a line cut between two reads
        is still seen)."""
        overlap = max(len(PANIC_LINE), len(protocol.USERSPACE_MARK))
        start = max(0, self._console_read - overlap)
        try:
            with open(self._console_log, "rb") as console_file:
                console_file.seek(start)
                fresh = console_file.read()
        except FileNotFoundError:
            return
        self._console_read = start + len(fresh)
        if self.status.userspace_at is None and protocol.USERSPACE_MARK.encode() in fresh:
            self.status.userspace_at = time.monotonic() - self.started
        if PANIC_LINE in fresh:
            self.status.panicked = True

    def paused(self, seconds: float) -> None:
        """The guest was paused this long: that was neither silence nor running time."""
        self.deadline += seconds
        if self.status.last_beat is not None:
            self.status.last_beat += seconds

    def run_check(self, checker: Checker | None) -> None:
        """Run ``checker`` if the job has started and it is due; its pause is not silence."""
        if checker is None or self.status.ready_at is None or not checker.due(time.monotonic()):
            return
        self.paused(checker.check())
        self.catch_up()
        gone = self.process.poll() is not None or self.status.exit_code is not None
        if getattr(checker.report, "error", None) and gone:
            checker.report.error = None  # the guest went away under the check: not the checker's fault

    def catch_up(self) -> None:
        """Apply the status events written since the last call."""
        lines = _whole_lines(self._status_file)
        for line in lines[self._seen:]:
            self._apply(line)
        self._seen = len(lines)

    def _apply(self, line: str) -> None:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return
        kind = event.get("event") if isinstance(event, dict) else None
        if kind in (protocol.EVENT_READY, protocol.EVENT_HEARTBEAT):
            self.status.last_beat = time.monotonic() - self.started
        if kind == protocol.EVENT_READY:
            self.status.ready_at = self.status.last_beat
        elif kind == protocol.EVENT_EXIT:
            self.status.exit_code = int(event["code"])


def _whole_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    return text.splitlines()[: text.count("\n")]


@dataclass
class RunResult:
    """How a run ended. ``exit_code`` is what ``kvmlab run`` exits with."""

    outcome: str  # ok | failed | splat | hang | lost | kept | invariant
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
    checks: CheckReport | None = None
    vmcore: str | None = None
    """The vmcore saved when the guest panicked (``vmcore.save``), if one was."""

    def note_vmcore(self, dump) -> None:
        """Say what became of a panicked guest's memory (a ``vmcore.Dump``)."""
        self.message = f"{self.message}\n{dump.describe()}".strip()
        self.vmcore = str(dump.path) if dump.path else None


def judge(status: Status, run_dir: Path, started: float, kept: bool, qmp_socket: Path,
          timeout_s: float, stall_s: float) -> RunResult:
    """Turn what was observed into an outcome, an exit code and one line to say."""
    console_log = run_dir / "console.log"
    text = console_log.read_text(errors="replace") if console_log.exists() else ""
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
        result.message = (f"VM kept running; QMP socket {qmp_socket} "
                          f"(kvmlab inspect {run_dir.name}; kvmlab stop {run_dir.name})")
    else:
        result.outcome = "ok" if status.exit_code == 0 else "failed"
        result.exit_code = status.exit_code
    return result


def judge_checks(result: RunResult, report: CheckReport) -> None:
    """A violation, or checks that could not run, fail a run that otherwise passed."""
    result.checks = report
    if report.failed and result.outcome in ("ok", "failed", "kept"):
        result.outcome, result.exit_code = "invariant", EXIT_INVARIANT
        result.message = "\n".join(filter(None, [report.summary(), result.message]))
