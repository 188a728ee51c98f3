"""kvmlab inspect against QMP sockets that never let drgn in: a deadline and one line,
and Ctrl-C or SIGTERM honoured wherever it waits (drgn's own waits have neither).

The QMP sockets here are fake QEMUs (``FakeQmp``), each bad in one way; drgn is real, and
so are the kvmlab processes, run as a user runs them. The kernel is a built tree with a
vmlinux that is never read: the waits all come before drgn loads any DWARF.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab.errors import KvmlabError
from kvmlab.inspect import attach, reader
from kvmlab.inspect.attach import Snapshot, Target

GREETING = b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, ' \
           b'"capabilities": []}}\r\n'
BOUND_S = 15
"""How long a kvmlab inspect with --timeout 2 may take, all told: far less than for ever."""


@dataclass
class Client:
    """One connection to a ``FakeQmp``: what the client sent, and whether it has hung up."""

    conn: socket.socket
    received: bytearray = field(default_factory=bytearray)
    gone: threading.Event = field(default_factory=threading.Event)

    def commands(self) -> list[str]:
        found, rest = [], bytes(self.received)
        while (command := _next_json(rest)) is not None:
            found.append(command[0]["execute"])
            rest = rest[command[1]:]
        return found


def _next_json(data: bytes) -> tuple[dict, int] | None:
    """The first whole JSON object in ``data`` and the bytes it took (QMP is a stream of
    them, with or without newlines), or None."""
    text = data.decode(errors="replace")
    stripped = text.lstrip()
    if not stripped:
        return None
    try:
        value, end = json.JSONDecoder().raw_decode(stripped)
    except json.JSONDecodeError:
        return None
    return value, len((text[:len(text) - len(stripped)] + stripped[:end]).encode())


class FakeQmp:
    """A UNIX socket that plays QEMU's QMP as badly as asked, in threads of this process.

    :param greet: which connections get QMP's greeting: ``"none"``, ``"first"`` or ``"all"``.
    :param answer: whether commands get an answer (``{"return": {}}``, their id echoed).
    :param hang_up: close a connection right after greeting it.
    """

    def __init__(self, path: Path, greet: str = "all", answer: bool = False, hang_up: bool = False):
        self.path, self.greet, self.answer, self.hang_up = path, greet, answer, hang_up
        self.clients: list[Client] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.server.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn = self.server.accept()[0]
            except TimeoutError:
                continue
            client = Client(conn)
            self.clients.append(client)
            if self.greet == "all" or (self.greet == "first" and len(self.clients) == 1):
                conn.sendall(GREETING)
                if self.hang_up:
                    conn.close()
                    client.gone.set()
                    continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: Client) -> None:
        pending = b""
        while True:
            try:
                chunk = client.conn.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                client.gone.set()
                return
            client.received += chunk
            pending += chunk
            while self.answer and (command := _next_json(pending)) is not None:
                command, used = command
                pending = pending[used:]
                answer = {"return": {}, **({"id": command["id"]} if "id" in command else {})}
                client.conn.sendall(json.dumps(answer).encode() + b"\r\n")

    def received(self, command: str) -> bool:
        return any(command.encode() in client.received for client in self.clients)

    def all_hung_up(self, within_s: float) -> bool:
        """Whether every client has closed its connection (within ``within_s``): no process of
        kvmlab's is left holding one."""
        deadline = time.monotonic() + within_s
        return all(client.gone.wait(max(deadline - time.monotonic(), 0)) for client in self.clients)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for client in self.clients:
            client.conn.close()
        self.server.close()


@pytest.fixture
def fake_qmp(tmp_path):
    """``fake_qmp(**how)``: a ``FakeQmp`` at a fresh path, closed after the test."""
    made: list[FakeQmp] = []

    def make(name: str = "qmp.sock", **how) -> FakeQmp:
        made.append(FakeQmp(tmp_path / name, **how))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def kernel_spec(tmp_path, monkeypatch) -> str:
    """A built tree whose vmlinux is never read (every wait here comes before the DWARF),
    so that no kernel is downloaded; with a private cache."""
    tree = tmp_path / "tree"
    (tree / "arch/x86/boot").mkdir(parents=True)
    (tree / "arch/x86/boot/bzImage").write_bytes(b"\0" * 512)
    (tree / "include/config").mkdir(parents=True)
    (tree / "include/config/kernel.release").write_text("6.1.0-test\n")
    (tree / "vmlinux").write_bytes(b"")
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))  # kvmlab's processes, and this one
    return f"local:{tree}"


def inspect_argv(socket_path: Path, spec: str, timeout: str, interactive: bool) -> list[str]:
    return [sys.executable, "-m", "kvmlab.cli", "inspect", *(["-i"] if interactive else []),
            str(socket_path), "--kernel", spec, "--timeout", timeout]


# Each way a QMP socket can leave drgn waiting, and what kvmlab says of it.
SILENT_SOCKETS = {
    "accepts, never greets": ({"greet": "none"}, "sent no QMP greeting within 2 s"),
    "greets once, then silent": ({"greet": "first"}, "QEMU did not answer on"),
    "greets every client, answers none": ({"greet": "all"}, "QEMU did not answer on"),
    "greets only the first client": ({"greet": "first", "answer": True}, "QMP query-target response"),
    "greets the first client and hangs up": ({"greet": "first", "hang_up": True},
                                             "hung up in drgn's QMP handshake"),
}


@pytest.mark.parametrize("interactive", [False, True], ids=["inspect", "inspect -i"])
@pytest.mark.parametrize("how", SILENT_SOCKETS, ids=list(SILENT_SOCKETS))
def test_every_wait_on_qemu_ends_at_the_deadline_in_one_line(fake_qmp, kernel_spec, how, interactive):
    server_how, said = SILENT_SOCKETS[how]
    server = fake_qmp(**server_how)
    started = time.monotonic()
    done = subprocess.run(inspect_argv(server.path, kernel_spec, "2", interactive), cwd=REPO,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    waited = time.monotonic() - started
    assert_one_line_error(done, "drgn cannot attach", said)
    assert done.stderr.count("\n") == 1, done.stderr
    assert waited < BOUND_S
    assert server.all_hung_up(within_s=5), "a process of kvmlab's still holds the socket"


def test_the_timeout_is_the_deadline(fake_qmp, kernel_spec):
    """--timeout 4 waits about 4 s, not 2 and not 10: the deadline is the user's."""
    server = fake_qmp(greet="first")
    started = time.monotonic()
    done = kvmlab("inspect", str(server.path), "--kernel", kernel_spec, "--timeout", "4", timeout=120)
    waited = time.monotonic() - started
    assert_one_line_error(done, "QEMU did not answer on", "within 4 s")
    assert 3.5 < waited < 4 + 8


# Where a waiting kvmlab inspect is when the signal comes: waiting for the greeting (Python),
# or drgn in its handshake (C code that holds the GIL and retries a read a signal interrupts).
WAITS = {
    "for the greeting": ({"greet": "none"}, lambda server: bool(server.clients)),
    "in drgn's handshake": ({"greet": "first"}, lambda server: server.received("qmp_capabilities")),
}


@pytest.mark.parametrize("interactive", [False, True], ids=["inspect", "inspect -i"])
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", WAITS, ids=list(WAITS))
def test_sigint_and_sigterm_end_a_waiting_inspect_at_once(fake_qmp, kernel_spec, where, how, interactive):
    server_how, waiting = WAITS[where]
    server = fake_qmp(**server_how)
    process = subprocess.Popen(inspect_argv(server.path, kernel_spec, "600", interactive), cwd=REPO,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while not waiting(server) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waiting(server), f"kvmlab inspect never got to wait {where}"
        time.sleep(0.2)  # well inside the wait
        process.send_signal(how)
        signalled = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        ended_s = time.monotonic() - signalled
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, stderr
    assert stderr.splitlines() == ["kvmlab: interrupted"]
    assert ended_s < 5
    assert server.all_hung_up(within_s=5), "drgn's reader process outlived kvmlab"


def test_not_a_qmp_socket(tmp_path):
    path = tmp_path / "chatty.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        conn.sendall(b"hello there\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    done = kvmlab("inspect", str(path), "--kernel", "debian:bookworm")
    server.close()
    assert_one_line_error(done, "is not a QMP socket")


def test_a_bad_timeout_is_refused(fake_qmp):
    done = kvmlab("inspect", str(fake_qmp(greet="none").path), "--kernel", "debian:bookworm",
                  "--timeout", "nan")
    assert_one_line_error(done, "--timeout wants a positive number")


# ------------------------------------------------------------------ the reader process, in this one

@pytest.fixture
def dead_run(kernel_spec, tmp_path) -> Target:
    """A target with nothing to greet (a vmcore that is never read): the reader's work is the test's."""
    return Target(None, None, kernel_spec, "run-x", tmp_path, vmcore=tmp_path / "vmcore")


def test_the_readers_result_comes_back(dead_run):
    got = reader.Reader(dead_run, 2).run(lambda inspector, send: send(("result", Snapshot(read_s=1.5))))
    assert got == Snapshot(read_s=1.5)


@pytest.mark.parametrize("ending, code", [(None, 0), (0, 0), (3, 3)])
def test_the_readers_exit_code_comes_back(dead_run, ending, code):
    """drgn's shell ends with its own exit code (``exit(3)``): it is the session's."""
    def work(inspector, send):
        if ending is not None:
            sys.exit(ending)

    assert reader.Reader(dead_run, 2).run(work) == code


def test_the_readers_error_is_raised_here_with_its_exit_code(dead_run):
    def fail(inspector, send):
        raise KvmlabError("drgn could not read run-x's memslots: FaultError", 123)

    with pytest.raises(KvmlabError, match="could not read run-x's memslots") as raised:
        reader.Reader(dead_run, 2).run(fail)
    assert raised.value.exit_code == 123


def test_a_bug_in_the_reader_keeps_its_traceback(dead_run):
    with pytest.raises(reader.ReaderCrashed, match="ZeroDivisionError") as raised:
        reader.Reader(dead_run, 2).run(lambda inspector, send: 1 / 0)
    assert "in the reader process" in raised.value.__notes__[0]
    assert "ZeroDivisionError" in raised.value.__notes__[0]


def test_a_reader_that_paused_the_guest_and_went_silent_is_killed_and_the_guest_resumed(fake_qmp,
                                                                                        dead_run):
    """The reader pauses the guest, then waits on QEMU past the deadline: kvmlab's process
    kills it and sends the ``cont`` the reader never did."""
    control = fake_qmp("control.sock", greet="all", answer=True)
    dead_run.control_socket = control.path

    def pause_then_hang(inspector, send):
        inspector.pause()
        inspector.tell(attach.HANDSHAKE)  # a wait on QEMU, bounded by the deadline
        time.sleep(600)

    started = time.monotonic()
    with pytest.raises(KvmlabError, match="QEMU did not answer .* within 1 s"):
        reader.Reader(dead_run, 1).run(pause_then_hang)
    assert time.monotonic() - started < 10
    assert [client.commands() for client in control.clients] == [["qmp_capabilities", "stop"],
                                                                 ["qmp_capabilities", "cont"]]


def test_ctrl_c_while_the_reader_holds_the_guest_paused_resumes_it(fake_qmp, dead_run):
    """Ctrl-C (here SIGUSR1 made one) while the reader holds the guest paused: kvmlab's
    process kills the reader and resumes the guest, even had it not yet read the reader's
    "paused" (it reads what is left in the pipe first)."""
    control = fake_qmp("control.sock", greet="all", answer=True)
    dead_run.control_socket = control.path

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    def pause_then_signal(inspector, send):
        inspector.pause()
        os.kill(os.getppid(), signal.SIGUSR1)
        time.sleep(600)

    saved = signal.signal(signal.SIGUSR1, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            reader.Reader(dead_run, 5).run(pause_then_signal)
    finally:
        signal.signal(signal.SIGUSR1, saved)
    assert [client.commands() for client in control.clients] == [["qmp_capabilities", "stop"],
                                                                 ["qmp_capabilities", "cont"]]
