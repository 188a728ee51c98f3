"""kvmlab inspect against QMP sockets that never let drgn in: a deadline and one line,
and Ctrl-C or SIGTERM honoured while it waits (drgn's own wait has neither)."""

import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import REPO, assert_one_line_error, kvmlab


@pytest.fixture
def silent_qmp(tmp_path):
    """A UNIX socket that accepts connections and never greets: a QEMU busy with its one
    client leaves a second one exactly so."""
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield SimpleNamespace(path=path, held=held)
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_socket_that_never_greets_ends_in_one_line_at_the_deadline(silent_qmp):
    started = time.monotonic()
    done = kvmlab("inspect", str(silent_qmp.path), "--kernel", "debian:bookworm", "--timeout", "2",
                  timeout=120)
    waited = time.monotonic() - started
    assert_one_line_error(done, "drgn cannot attach", "sent no QMP greeting within 2 s", "another client")
    assert waited < 60  # the 2 s deadline held: drgn's own wait would be for ever


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_waiting_inspect_ends_on_sigterm_and_ctrl_c(silent_qmp, how):
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmlab.cli", "inspect", str(silent_qmp.path), "--kernel", "debian:bookworm",
         "--timeout", "600"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not silent_qmp.held and time.monotonic() < deadline:  # connected: it is waiting now
        time.sleep(0.05)
    assert silent_qmp.held, "kvmlab inspect never connected"
    process.send_signal(how)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "kvmlab: interrupted"


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


def test_a_bad_timeout_is_refused(silent_qmp):
    done = kvmlab("inspect", str(silent_qmp.path), "--kernel", "debian:bookworm", "--timeout", "nan")
    assert_one_line_error(done, "--timeout wants a positive number")
