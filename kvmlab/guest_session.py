"""A lab guest that stays up and runs commands on request: what ``kvmlab qualify`` drives.

``kvmlab run`` boots a guest for one command. A qualification runs hundreds of short
commands on two kernels, interleaved, so it keeps one guest per kernel up, sends each
command to the guest agent (vm-images/agent.py) over the ``kvmlab.control`` port, and
pauses the idle guest over QMP so that the two never compete for the host's CPUs.

The guest is watched as ``kvmlab run`` watches it: a kernel that stops sending
heartbeats is hung, a QEMU that exits is a lost VM or a crash, and either ends the
session with ``GuestDown`` carrying the run's verdict and console excerpt. Time the
guest spends paused (by us, or by an invariant check) never counts as silence.
"""

from __future__ import annotations

import base64
import json
import select
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmlab import console, invariant_watch, qemu, qmp, runner, runs
from kvmlab.errors import KvmlabError
from kvmlab.kernels import Kernel

AGENT = Path(__file__).resolve().parent.parent / "vm-images" / "agent.py"
BOOT_TIMEOUT_S = 180.0
CONNECT_TIMEOUT_S = 10.0


class GuestDown(KvmlabError):
    """The guest hung, crashed or vanished; ``result`` says which, with the console excerpt."""

    def __init__(self, result: runner.RunResult):
        super().__init__(result.message)
        self.result = result


@dataclass
class Reply:
    code: int | str
    """The command's exit code, or "timeout" when the agent had to kill it."""
    stdout: str
    stderr: str
    elapsed_s: float
    files: dict[str, bytes | None] = field(default_factory=dict)


class GuestSession:
    def __init__(self, kernel: Kernel, options: runner.RunOptions, log=sys.stderr):
        self.kernel, self.options, self.log = kernel, options, log
        self.run_dir: Path | None = None
        self.process = None
        self.watch: invariant_watch.InvariantWatch | None = None
        self._machine: qemu.Machine | None = None
        self._socket: socket.socket | None = None
        self._pending = b""
        self._status = runner.Status()
        self._seen = 0
        self._started = 0.0
        self._paused_at: float | None = None
        self._next_id = 0
        self._splats_seen = 0

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Boot the kernel and wait for the agent; ``GuestDown`` if it never comes."""
        self.options.argv = ["python3", "/kvmlab/agent.py"]
        self.options.files = {**self.options.files, "agent.py": AGENT.read_text()}
        self.run_dir = runs.new()
        runs.record(
            self.run_dir,
            kernel=self.kernel.spec,
            kernel_exact=self.kernel.exact_spec,
            release=self.kernel.release,
            argv=self.options.argv,
            state="preparing",
        )
        self._machine = runner.prepare(self.kernel, self.options, self.run_dir, self.log)
        argv = qemu.command(self._machine)
        (self.run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        self._started = time.monotonic()
        self.process = runner.start_qemu(argv, self.run_dir, keep=False)
        runs.record(
            self.run_dir,
            qemu_pid=self.process.pid,
            qmp=str(self._machine.qmp_socket),
            debug_qmp=str(self._machine.debug_socket),
            state="running",
        )
        self._socket = self._connect(self._machine.control_socket)
        self._receive(time.monotonic() + BOOT_TIMEOUT_S)
        (self.run_dir / "initrd.cpio").unlink(missing_ok=True)
        if self.options.check_every_s:
            self.watch = invariant_watch.InvariantWatch(
                self.kernel,
                self._machine.debug_socket,
                self._machine.qmp_socket,
                self.run_dir,
                self.options.check_every_s,
            )

    def close(self) -> None:
        """Ask the agent to quit (the guest powers off); kill QEMU if it lingers."""
        if self.process is None:
            return
        try:
            if self._paused_at is not None:
                self.resume()
            self._send({"quit": True})
            runner.wait_for_exit(self.process, runner.POWEROFF_GRACE_S)
        except (OSError, KvmlabError):
            pass
        finally:
            self._shut(state="finished")

    # -- commands ---------------------------------------------------------------------
    def request(self, argv: list[str], files: tuple[str, ...] = (), timeout_s: float = 600.0) -> Reply:
        """Run ``argv`` in the guest and return how it went, with the ``files`` it left."""
        self._next_id += 1
        self._send({"id": self._next_id, "argv": argv, "files": list(files), "timeout_s": timeout_s})
        # The agent kills the command at timeout_s; the margin is for it to say so.
        answer = self._receive(time.monotonic() + timeout_s + 30)
        return Reply(
            answer["code"],
            answer["stdout"],
            answer["stderr"],
            answer["elapsed_s"],
            {
                path: None if data is None else base64.b64decode(data)
                for path, data in answer["files"].items()
            },
        )

    @property
    def paused(self) -> bool:
        return self._paused_at is not None

    def pause(self) -> None:
        self._monitor("stop")
        self._paused_at = time.monotonic()

    def resume(self) -> None:
        self._monitor("cont")
        if self._paused_at is not None and self._status.last_beat is not None:
            self._status.last_beat += time.monotonic() - self._paused_at
        self._paused_at = None

    def new_splats(self) -> list[console.Splat]:
        """Kernel reports on the console since the last call (a WARN need not kill a guest)."""
        splats = console.find_splats(self._machine.console_log.read_text(errors="replace"))
        fresh, self._splats_seen = splats[self._splats_seen :], len(splats)
        return fresh

    # -- plumbing ---------------------------------------------------------------------
    def _connect(self, path: Path) -> socket.socket:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(str(path))
                return client
            except OSError:
                client.close()
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self._fail(timed_out=False)
                time.sleep(0.05)

    def _monitor(self, command: str) -> None:
        """A QMP command; a monitor that does not answer is a guest that went away."""
        try:
            qmp.execute(self._machine.qmp_socket, command)
        except KvmlabError:
            self._fail(timed_out=False)

    def _send(self, message: dict) -> None:
        self._socket.sendall((json.dumps(message) + "\n").encode())

    def _receive(self, deadline: float) -> dict:
        """The agent's next message, watching the guest while it comes."""
        status_file = self.run_dir / "status.jsonl"
        while b"\n" not in self._pending:
            readable, _, _ = select.select([self._socket], [], [], 0.2)
            if readable:
                chunk = self._socket.recv(1 << 20)
                if not chunk:
                    self._fail(timed_out=False)
                self._pending += chunk
                continue
            self._seen = runner.catch_up(self._status, status_file, self._seen, self._started)
            now = time.monotonic()
            if self.process.poll() is not None or self._status.exit_code is not None:
                self._fail(timed_out=False)
            if now > deadline:
                self._fail(timed_out=True)
            beat = self._status.last_beat
            if (
                self.options.stall_s
                and beat is not None
                and now - self._started - beat > self.options.stall_s
            ):
                self._status.stalled = True
                self._fail(timed_out=True)
            if self.watch is not None and self.watch.due(now):
                paused = self.watch.check()
                deadline += paused
                if self._status.last_beat is not None:
                    self._status.last_beat += paused
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _fail(self, timed_out: bool) -> None:
        self._status.timed_out = timed_out
        self._shut(state="down")
        result = runner.judge(
            self._status,
            self.run_dir,
            self._started,
            False,
            self._machine,
            self.options.timeout_s,
            self.options.stall_s,
        )
        if result.outcome in ("ok", "failed"):  # the agent ended by itself: the VM is gone anyway
            result.outcome, result.message = (
                "lost",
                f"guest agent ended (exit {result.job_code}); its stderr: {_tail(self.run_dir / 'stderr')}",
            )
        runs.record(self.run_dir, outcome=result.outcome)
        raise GuestDown(result)

    def _shut(self, state: str) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self.process is not None:
            runner.kill(self.process)
            runs.record(self.run_dir, state=state)
            self.process = None
        for leftover in ("initrd.cpio", "layer.cpio"):
            (self.run_dir / leftover).unlink(missing_ok=True)


def _tail(path: Path, lines: int = 5) -> str:
    return console.tail(path.read_text(errors="replace"), lines) if path.exists() else "(none)"
