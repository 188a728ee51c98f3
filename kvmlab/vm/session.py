"""A lab guest that stays up and runs commands on request: what ``kvmlab qualify`` drives.

``kvmlab run`` boots a guest for one command. A qualification runs hundreds of short
commands on two kernels, interleaved, so it keeps one guest per kernel up, sends each
command to the guest agent (``kvmlab_guest.agent``) over the control port, and pauses
the idle guest over QMP so that the two never compete for the host's CPUs.

The guest is started, watched and judged as ``kvmlab run`` does it (``boot`` and
``lifecycle``): a kernel that stops sending heartbeats is hung, a QEMU that exits is a
lost VM or a crash, and either ends the session with ``GuestDown`` carrying the run's
verdict and console excerpt. Time the guest spends paused (by us, or by a check) never
counts as silence.
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

from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.vm import boot, console, lifecycle, qmp, runs, vmcore

BOOT_TIMEOUT_S = 180.0
CONNECT_TIMEOUT_S = 10.0
AGENT = ["python3", "-m", "kvmlab_guest.agent"]


class GuestDown(KvmlabError):
    """The guest hung, crashed or vanished; ``result`` says which, with the console excerpt."""

    def __init__(self, result: lifecycle.RunResult):
        super().__init__(result.message)
        self.result = result


@dataclass
class Reply:
    code: int | str
    """The command's exit code, or ``protocol.AGENT_TIMEOUT`` when the agent had to kill it."""
    stdout: str
    stderr: str
    elapsed_s: float
    files: dict[str, bytes | None] = field(default_factory=dict)


class GuestSession:
    def __init__(self, kernel: Kernel, options: boot.RunOptions, log=sys.stderr):
        self.kernel, self.options, self.log = kernel, options, log
        self.run_dir: Path | None = None
        self.process = None
        self.watch: lifecycle.Checker | None = None
        self._vm: boot.Booted | None = None
        self._liveness: lifecycle.Liveness | None = None
        self._socket: socket.socket | None = None
        self._pending = b""
        self._paused_at: float | None = None
        self._next_id = 0
        self._splats_seen = 0

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        """Boot the kernel and wait for the agent; ``GuestDown`` if it never comes."""
        self.options.argv = AGENT
        self._vm = boot.start(self.kernel, self.options, self.log)
        self.run_dir, self.process = self._vm.run_dir, self._vm.process
        self._liveness = lifecycle.Liveness(self.process, self.run_dir, self.options.timeout_s,
                                            self.options.stall_s, self._vm.started)
        self._socket = self._connect(self._vm.machine.control_socket)
        self._receive(time.monotonic() + BOOT_TIMEOUT_S)
        (self.run_dir / "initrd.cpio").unlink(missing_ok=True)
        if self.options.checker:
            self.watch = self.options.checker(self._vm.machine)

    def close(self) -> None:
        """Ask the agent to quit (the guest powers off); kill QEMU if it lingers."""
        if self.process is None:
            return
        try:
            if self._paused_at is not None:
                self.resume()
            self._send({"quit": True})
            lifecycle.wait_for_exit(self.process, lifecycle.POWEROFF_GRACE_S)
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

    def check_alive(self) -> None:
        """Raise ``GuestDown`` if QEMU ended while nobody was talking to the guest (an idle
        guest's death would otherwise go unnoticed by whoever closes it next)."""
        if self.process is not None and self.process.poll() is not None:
            self._fail()

    def pause(self) -> None:
        self._monitor("stop")
        self._paused_at = time.monotonic()

    def resume(self) -> None:
        self._monitor("cont")
        if self._paused_at is not None:
            self._liveness.paused(time.monotonic() - self._paused_at)
        self._paused_at = None

    def new_splats(self) -> list[console.Splat]:
        """Kernel reports on the console since the last call (a WARN need not kill a guest)."""
        splats = console.find_splats(self._vm.machine.console_log.read_text(errors="replace"))
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
                    self._fail()
                time.sleep(0.05)

    def _monitor(self, command: str) -> None:
        """A QMP command; a monitor that does not answer is a guest that went away."""
        try:
            qmp.execute(self._vm.machine.qmp_socket, command)
        except KvmlabError:
            self._fail()

    def _send(self, message: dict) -> None:
        """Send to the agent; a connection the guest's end dropped is a guest that went away."""
        try:
            self._socket.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            self._fail()

    def _receive(self, deadline: float) -> dict:
        """The agent's next message, watching the guest while it comes."""
        self._liveness.deadline = deadline
        while b"\n" not in self._pending:
            readable, _, _ = select.select([self._socket], [], [], 0.2)
            if readable:
                try:
                    chunk = self._socket.recv(1 << 20)
                except OSError:  # reset by the guest's end: as good as an end of file
                    chunk = b""
                if not chunk:
                    self._fail()
                self._pending += chunk
                continue
            if self._liveness.over():
                self._fail()
            self._liveness.run_check(self.watch)
        line, self._pending = self._pending.split(b"\n", 1)
        return json.loads(line)

    def _fail(self) -> None:
        dump = None
        if self._liveness.status.panicked and self.process is not None:
            dump = vmcore.save(self.run_dir, self._vm.machine.qmp_socket, self.process,
                               self.options.memory_mb)
        self._shut(state="down")
        result = lifecycle.judge(self._liveness.status, self.run_dir, self._vm.started, False,
                                 self._vm.machine.qmp_socket, self.options.timeout_s, self.options.stall_s)
        if result.outcome in ("ok", "failed"):  # the agent ended by itself: the VM is gone anyway
            result.outcome, result.message = (
                "lost",
                f"guest agent ended (exit {result.job_code}); its stderr: {_tail(self.run_dir / 'stderr')}",
            )
        if dump is not None:
            result.note_vmcore(dump)
        runs.record(self.run_dir, outcome=result.outcome)
        raise GuestDown(result)

    def _shut(self, state: str) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self.process is not None:
            lifecycle.kill(self.process)
            runs.record(self.run_dir, state=state)
            self.process = None
        for leftover in ("initrd.cpio", "layer.cpio"):
            (self.run_dir / leftover).unlink(missing_ok=True)


def _tail(path: Path, lines: int = 5) -> str:
    return console.tail(path.read_text(errors="replace"), lines) if path.exists() else "(none)"
