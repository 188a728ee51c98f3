"""One lab guest from start to close: booted or restored, asked to run commands, judged.

Every guest kvmlab starts goes through this one life cycle:

- ``start``: boot the kernel (``boot``), or restore the template of the guest's
  ``role`` (``template``), making the template first with one boot if there is none.
  A template that is damaged, stale or fails to restore is said in one line, and the
  guest boots afresh: a template only ever saves time;
- ``request``: run a command through the guest agent (``kvmlab_guest.agent``) on the
  control port, watching the guest while it runs (``lifecycle.Liveness``). A guest
  that hangs, crashes or vanishes raises ``GuestDown`` with the judged outcome, its
  console excerpt and, for a panic, its vmcore;
- ``pause`` and ``resume``: over QMP, for a qualification's idle guest; time paused
  counts as neither silence nor running time;
- ``close``: the agent quits (the guest's init hands over its results and powers off),
  QEMU is ended if it lingers, and the outcome is judged and recorded in run.json.

A *job guest* (``agent=False``) runs ``options.argv`` as its init's job instead of the
agent, for ``kvmlab run --fresh-boot`` and ``--keep``: ``wait`` follows it to its end.
"""

from __future__ import annotations

import base64
import io
import json
import select
import socket
import sys
import tarfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvmlab_guest import mailbox, protocol

from kvmlab import cache
from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.vm import boot, console, lifecycle, qmp, runs, template, vmcore

BOOT_TIMEOUT_S = 180.0
HOLD_WAIT_S = 10.0
HELD_STATUS = "guest-panicked"
"""QEMU's status for a guest paused by its pvpanic device (``kvmlab_guest.hold``)."""
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


class Guest:
    def __init__(self, kernel: Kernel, options: boot.RunOptions, log=sys.stderr, role: str | None = None,
                 agent: bool = True, machine: boot.Machine | None = None):
        """``role``: the template this guest restores (made first if need be), unless
        ``options.fresh_boot``; None: it boots. ``agent``: the guest runs the agent and takes
        requests; else it is a job guest, which boots to run ``options.argv``. ``machine``:
        the accelerator, QEMU and clock already chosen (else chosen from ``options``)."""
        self.kernel, self.log, self.agent, self.machine_chosen = kernel, log, agent, machine
        self.role = role if agent else None
        self.options = replace(options, argv=AGENT) if agent else options
        self.run_dir: Path | None = None
        self.process = None
        self.watch: lifecycle.Checker | None = None
        self.template: template.Template | None = None
        """The template this guest was restored from (None: it booted)."""
        self.settings: boot.Settings | None = None
        self._vm: boot.Booted | None = None
        self._liveness: lifecycle.Liveness | None = None
        self._socket: socket.socket | None = None
        self._pending = b""
        self._paused_at: float | None = None
        self._next_id = 0
        self._splats_seen = 0
        self._dump: vmcore.Dump | None = None
        self._held = False
        """A restored guest, or a booted one whose agent paused it, stays paused until its
        first message is sent (``_send``)."""
        self._vm_made_template = False
        self._ended_with: int | None = None
        """QEMU's exit status as ``_shut`` found it, before ending it (None: still running)."""

        self._result: lifecycle.RunResult | None = None

    @property
    def machine(self):
        return self._vm.machine

    @property
    def status(self) -> lifecycle.Status:
        return self._liveness.status

    # -- start ------------------------------------------------------------------------
    def start(self) -> None:
        """Restore or boot the guest, up to its agent (or its job) running."""
        self.settings = boot.settle(self.kernel, self.options, self.machine_chosen)
        if self.role and not self.options.fresh_boot:
            found = self._template()
            if found is not None:
                try:
                    self._restore(found)
                except template.RestoreFailed as err:
                    if self._killed():
                        self._fail()  # killed from outside mid-restore: a guest lost, not a bad template
                    self._say(f"{err}; booting afresh")
                    runs.record(self.run_dir, message=str(err))  # what went wrong stays with the run
                    self._abandon("restore failed")
                    template.discard(found.directory)
            if self._vm is None:
                self._boot()
        else:
            self._boot()
        if self.options.checker:
            self.watch = self.options.checker(self.machine)

    def _boot(self, ram_file: Path | None = None) -> None:
        self._vm = boot.start(self.kernel, self.options, self.log, self.settings, ram_file=ram_file)
        self._follow(self._vm)
        if self.agent:
            self._await_agent()
            (self.run_dir / "initrd.cpio").unlink(missing_ok=True)  # loaded long ago: free the disk

    def _template(self) -> template.Template | None:
        """The role's template: loaded, or made now with one boot (None: it could not be saved,
        and this guest, already booted, goes on as a fresh boot)."""
        key = template.inputs(self.settings, self.role, self.options.files)
        budget = template.budget_bytes()
        directory = template.directory_for(key)
        with cache.locked(directory.with_name(f".{directory.name}.lock")):
            found, problem = template.load(directory, key)
            if problem:
                self._say(f"template {directory.name} {problem}; booting afresh to make it again")
                template.discard(directory)
            if found is not None:
                return found
            return self._make_template(directory, key, budget)

    def _make_template(self, directory: Path, key: dict, budget: int) -> template.Template | None:
        ram = template.live_ram(directory, self.settings.memory_mb)
        self._say(f"making template {directory.name} (one boot, then every guest of it restores)")
        try:
            self._boot(ram_file=ram)
            try:
                made = template.save(self._vm, directory, key, self.status.ready_at or 0.0)
            except template.RestoreFailed as err:
                if self._killed():
                    self._fail()
                self._say(f"{err}; this guest goes on as a fresh boot")
                self._monitor("cont")
                return None
        finally:
            ram.unlink(missing_ok=True)  # the guest keeps its mapping; the file is the template's now
        runs.record(self.run_dir, state="saved", saved_as=made.name)
        for old in template.superseded(key):
            self._say(f"removing template {old.name}: {made.name} replaces it (newer guest code)")
            template.discard(old)
        for old in template.over_budget(made.directory, budget):
            self._say(f"removing template {old.directory.name}, the least recently used: templates over "
                      f"{budget / 2**30:g} GiB (${template.BUDGET_ENV})")
            template.discard(old.directory)
        self._vm_made_template = True  # its boot said what the guest runs under
        self._forget()
        return made

    def _restore(self, found: template.Template) -> None:
        run_dir = runs.new()
        runs.record(run_dir, kernel=self.kernel.spec, kernel_exact=self.kernel.pinned,
                    release=self.kernel.release, argv=self.options.argv, keep=self.options.keep,
                    state="preparing", restored=True, **found.describe(), **self.options.labels)
        initrd = run_dir / "initrd.cpio"
        initrd.touch()  # QEMU opens -initrd at start; the restored memory already holds its contents
        boot.describe(self.settings, run_dir, None if self._vm_made_template else self.log)
        machine = boot.machine_for(self.settings, run_dir, initrd, ram_file=found.ram, incoming=True)
        self._vm = boot.launch(machine, self.options.keep)
        self._follow(self._vm)
        template.incoming(machine.qmp_socket, self.process, found)
        try:
            self._socket = self._accept()
        except GuestDown as down:
            if self._killed():
                raise
            raise template.RestoreFailed(f"restored guest of {found.name} went down: "
                                         f"{down.result.message.splitlines()[0]}") from None
        self.status.ready_at = self.status.last_beat = 0.0
        self.template = found
        self._held = True
        runs.record(run_dir, state="running", restore_s=round(time.monotonic() - self._vm.started, 3))

    def _killed(self) -> bool:
        """QEMU ended by a signal (another process killed it), not by failing on its own."""
        code = self.process.poll() if self.process is not None else self._ended_with
        return code is not None and code < 0

    def _follow(self, vm: boot.Booted) -> None:
        self.run_dir, self.process = vm.run_dir, vm.process
        self._liveness = lifecycle.Liveness(self.process, self.run_dir, self.options.timeout_s,
                                            self.options.stall_s, vm.started)

    def _await_agent(self) -> None:
        """Wait for the agent's greeting; ``GuestDown`` if it never comes. An agent that
        pauses its VM after it (``kvmlab_guest.hold``) is held, as a restored guest is:
        saved as a template there, or given its first request through the mailbox."""
        self._socket = self._accept()
        greeting = self._receive(time.monotonic() + BOOT_TIMEOUT_S)
        if greeting.get("held") is True:
            self._await_hold()
            self._held = True

    def _await_hold(self) -> None:
        """Wait for QEMU to pause the guest at the agent's hold (status ``guest-panicked``:
        the agent wrote to the pvpanic device; no console panic line came with it)."""
        deadline = time.monotonic() + HOLD_WAIT_S
        while True:
            try:
                status = qmp.execute(self.machine.qmp_socket, "query-status").get("status")
            except KvmlabError:
                self._fail()
            if status == HELD_STATUS:
                return
            if time.monotonic() > deadline:
                problem = f"the agent said it paused the guest; QEMU says {status} after {HOLD_WAIT_S:g} s"
                self._say(problem)
                runs.record(self.run_dir, message=problem)
                self._fail()
            time.sleep(0.01)

    def _abandon(self, state: str) -> None:
        """End a QEMU that will not be used, leaving its run directory to say why."""
        self._shut(state=state)
        self._forget()

    def _forget(self) -> None:
        if self._socket is not None:
            self._socket.close()
        if self._vm is not None:
            self._vm.control.close()
        self._socket, self.process, self._vm, self._pending = None, None, None, b""

    # -- requests ---------------------------------------------------------------------
    def request(self, argv: list[str], files: tuple[str, ...] = (), timeout_s: float = 600.0,
                env: dict[str, str] | None = None, put: dict[str, bytes] | None = None,
                added: list[Path] = (), stream: bool = False) -> Reply:
        """Run ``argv`` in the guest and return how it went, with the ``files`` it left.

        ``put`` writes files before it runs (path → bytes), ``added`` copies host files or
        directories to ``protocol.ADDED``, and ``stream`` sends its output to the stdout and
        stderr ports as a job's goes, instead of returning it."""
        self._next_id += 1
        message = {"id": self._next_id, "argv": argv, "files": list(files), "timeout_s": timeout_s}
        if env:
            message["env"] = env
        if put:
            message["put"] = {path: base64.b64encode(data).decode() for path, data in put.items()}
        if added:
            message["unpack"] = {protocol.ADDED: base64.b64encode(_tar(added)).decode()}
        if stream:
            message["stream"] = True
        self._send(message)
        # The agent kills the command at timeout_s; the margin is for it to say so.
        answer = self._receive(time.monotonic() + timeout_s + 30)
        return Reply(answer["code"], answer["stdout"], answer["stderr"], answer["elapsed_s"],
                     {path: None if data is None else base64.b64decode(data)
                      for path, data in answer["files"].items()})

    def wait(self) -> None:
        """A job guest: follow it until its job ends, QEMU ends, or it hangs."""
        try:
            while not self._liveness.over():
                self._liveness.run_check(self.watch)
                time.sleep(0.05)
        except KeyboardInterrupt:
            runs.record(self.run_dir, state="interrupted")
            raise

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
        splats = console.find_splats(self.machine.console_log.read_text(errors="replace"))
        fresh, self._splats_seen = splats[self._splats_seen :], len(splats)
        return fresh

    # -- close ------------------------------------------------------------------------
    def close(self, job_code: int | str | None = None) -> lifecycle.RunResult:
        """End the guest and judge how its life went: the agent is asked to quit (its init
        hands over the results and powers off); a kept job guest stays up. ``job_code``:
        the exit code of the request that was the run's job, if one was."""
        if self._result is not None:
            return self._result
        status = self.status
        kept = self.options.keep and status.exit_code is not None and not self.agent
        try:
            if self.process is not None and not kept:
                if self._socket is not None and not status.panicked:
                    self._quit_agent()
                elif status.exit_code is not None:
                    lifecycle.wait_for_exit(self.process, lifecycle.POWEROFF_GRACE_S)
                self._dump_if_panicked()
        finally:
            if not kept:
                self._shut()
        self._liveness.catch_up()
        # The agent's own exit, which its init reports, is not the job's: the request's code is.
        if job_code == protocol.AGENT_TIMEOUT:
            status.exit_code, status.timed_out = None, True
        elif job_code is not None:
            status.exit_code = int(job_code)
        return self._judge(kept)

    def kill(self, state: str = "killed") -> None:
        """End QEMU at once, no goodbyes (the caller is being interrupted)."""
        self._shut(state=state)

    def _quit_agent(self) -> None:
        try:
            if self._paused_at is not None:
                self.resume()
            self._send({"quit": True})
            lifecycle.wait_for_exit(self.process, lifecycle.POWEROFF_GRACE_S)
        except (OSError, KvmlabError):
            pass

    def _judge(self, kept: bool) -> lifecycle.RunResult:
        options = self.options
        result = lifecycle.judge(self.status, self.run_dir, self._started, kept, self._qmp_socket,
                                 options.timeout_s, options.stall_s)
        if self.watch is not None:
            lifecycle.judge_checks(result, self.watch.report)
        if self._dump is not None:
            result.note_vmcore(self._dump)
        runs.record(self.run_dir, state=result.outcome, exit_code=result.exit_code, job_code=result.job_code,
                    boot_s=result.boot_s, ready_s=result.ready_s, total_s=result.total_s)
        self._result = result
        return result

    def _dump_if_panicked(self) -> None:
        """A panicked guest's vmcore, saved before QEMU is ended."""
        if self.status.panicked and self.process is not None and self._dump is None:
            self._say("the guest kernel panicked; saving its memory for drgn")
            self._dump = vmcore.save(self.run_dir, self._qmp_socket, self.process, self.options.memory_mb)

    def _fail(self) -> None:
        self._dump_if_panicked()
        self._shut(state="down")
        result = lifecycle.judge(self.status, self.run_dir, self._started, False, self._qmp_socket,
                                 self.options.timeout_s, self.options.stall_s)
        if result.outcome in ("ok", "failed"):  # the agent ended by itself: the VM is gone anyway
            result.outcome, result.message = (
                "lost",
                f"guest agent ended (exit {result.job_code}); its stderr: {_tail(self.run_dir / 'stderr')}",
            )
        if self._dump is not None:
            result.note_vmcore(self._dump)
        runs.record(self.run_dir, state=result.outcome, outcome=result.outcome, exit_code=result.exit_code)
        self._result = result
        raise GuestDown(result)

    def _shut(self, state: str = "finished") -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._vm is not None:
            self._vm.control.close()
        if self.process is not None:
            self._ended_with = self.process.poll()
            lifecycle.kill(self.process)
            if state != "finished":
                runs.record(self.run_dir, state=state)
            self.process = None
        for leftover in ("initrd.cpio", "layer.cpio", "mailbox"):
            (self.run_dir / leftover).unlink(missing_ok=True)

    @property
    def _started(self) -> float:
        return self._vm.started

    @property
    def _qmp_socket(self) -> Path:
        return self._vm.machine.qmp_socket

    # -- plumbing ---------------------------------------------------------------------
    def _say(self, text: str) -> None:
        print(f"kvmlab: {text}", file=self.log, flush=True)

    def _accept(self) -> socket.socket:
        """The control port's connection, which QEMU makes as it starts; ``GuestDown`` if
        QEMU ends or does not connect within ``CONNECT_TIMEOUT_S``."""
        listener = self._vm.control
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        try:
            while not select.select([listener], [], [], 0.05)[0]:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self._fail()
            return listener.accept()[0]
        finally:
            listener.close()

    def _monitor(self, command: str) -> None:
        """A QMP command; a monitor that does not answer is a guest that went away."""
        try:
            qmp.execute(self.machine.qmp_socket, command)
        except KvmlabError:
            self._fail()

    def _send(self, message: dict) -> None:
        """Send to the agent; a connection the guest's end dropped is a guest that went away.

        A restored guest held paused finds its first message in its mailbox when it runs,
        at the same instruction in every restore (``kvmlab_guest.mailbox``); one too big
        for the mailbox waits in the socket instead, as much as it takes without the guest
        reading."""
        data = (json.dumps(message) + "\n").encode()
        sent = 0
        try:
            if self._held:
                sent = mailbox.post(self.machine.mailbox, data) or self._send_without_blocking(data)
                self._held = False
                self._monitor("cont")
            self._socket.sendall(data[sent:])
        except OSError:
            self._fail()

    def _send_without_blocking(self, data: bytes) -> int:
        """As much of ``data`` as the socket's buffers take now; how much that was."""
        sent = 0
        self._socket.setblocking(False)
        try:
            while sent < len(data):
                sent += self._socket.send(data[sent:])
        except BlockingIOError:
            pass
        finally:
            self._socket.setblocking(True)
        return sent


    def _receive(self, deadline: float) -> dict:
        """The agent's next message, watching the guest while it comes."""
        self._liveness.deadline = deadline
        while b"\n" not in self._pending:
            readable, _, _ = select.select([self._socket], [], [], 0.05)
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


def _tar(paths: list[Path]) -> bytes:
    """``paths`` (files or directories) as one tar archive, each under its own name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in paths:
            archive.add(path, arcname=path.name)
    return buffer.getvalue()


def _tail(path: Path, lines: int = 5) -> str:
    return console.tail(path.read_text(errors="replace"), lines) if path.exists() else "(none)"
