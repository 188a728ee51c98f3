"""QMP, the QEMU Monitor Protocol, with deadlines: a wedged QEMU never wedges kvmlab.

Thin synchronous wrappers over the qemu.qmp library's asyncio client. QEMU serves one
QMP client at a time, so every call connects, runs its commands and disconnects.
"""

import asyncio
import contextlib
import socket as socket_mod
import struct
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from kvmlab.errors import KvmlabError

DEFAULT_TIMEOUT_S = 5.0
GREETING_MAX = 64 << 10
"""More than any QMP greeting: a first line this long is no greeting."""


def execute(socket: Path, command: str, arguments: dict | None = None,
            timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Any:
    """Run one QMP command on the VM behind ``socket`` and return its result.

    ``timeout_s`` bounds the connection and the answer each (``None``, or one beyond
    ``limit``'s range: no limit). ``quit`` returns None even when QEMU hangs up before
    answering, as it may.
    """
    try:
        return asyncio.run(_execute(socket, command, arguments, limit(timeout_s)))
    except Exception as err:  # the library raises many types; the user needs one line
        reason = str(err) or type(err).__name__
        if isinstance(err, TimeoutError):
            reason = f"no answer within {timeout_s:g} s"
        raise KvmlabError(f"QMP {command} on {socket} failed: {reason}") from None


async def _execute(socket: Path, command: str, arguments: dict | None,
                   timeout_s: float | None) -> Any:
    client = QMPClient("kvmlab")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout_s)
        try:
            return await asyncio.wait_for(client.execute(command, arguments), timeout_s)
        except (EOFError, ConnectionError):
            if command == "quit":
                return None  # QEMU may hang up before it answers "quit"
            raise
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


def limit(timeout_s: float | None) -> float | None:
    """``timeout_s`` as sockets and asyncio take it: None (no limit) for one beyond what a
    socket can take (``inf``, ``1e300``: more than ``threading.TIMEOUT_MAX``, some 292 years)."""
    return None if timeout_s is None or timeout_s >= threading.TIMEOUT_MAX else timeout_s


def await_greeting(socket: Path, timeout_s: float, who: str) -> None:
    """Wait for QEMU's QMP greeting on ``socket``, then hang up, or fail in one line
    (``connect_greeted``)."""
    hang_up(connect_greeted(socket, timeout_s, who))


def hang_up(conn: socket_mod.socket) -> None:
    """Close a connection ``connect_greeted`` gave, reading the greeting first: closing a
    UNIX socket with unread data resets the peer's end (ECONNRESET) instead of ending it."""
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.recv(GREETING_MAX)
    conn.close()


def connect_greeted(socket: Path, timeout_s: float, who: str) -> socket_mod.socket:
    """A connection to ``socket`` on which QEMU's QMP greeting has arrived and still waits
    to be read, for a client that reads it itself (drgn); or fail in one line.

    QEMU serves one client per QMP socket; a second one is accepted by the kernel's
    backlog but never greeted while the first stays. drgn's ``set_qemu_qmp`` waits for
    that greeting with no deadline, inside C code that neither Ctrl-C nor SIGTERM
    reaches, so the greeting is awaited here, where a deadline holds, and drgn is given
    this very connection (a second one could meet another client in between). The
    connection comes back with every later wait on it bounded too (``limit_waits``).

    A timeout beyond what a socket can take (``limit``) means no deadline: wait as long
    as it takes, Ctrl-C still ending the wait.
    """
    left = limit(timeout_s)
    deadline = None if left is None else time.monotonic() + left
    conn = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        conn.settimeout(_left(deadline))
        conn.connect(str(socket))
        received = _peek_line(conn, deadline)
        if not received:
            raise KvmlabError(f"{who}: QEMU closed {socket} without a QMP greeting")
        if b"\n" not in received or b'"QMP"' not in received:
            raise KvmlabError(f"{who}: {socket} is not a QMP socket (it said {received[:80]!r})")
        conn.settimeout(None)  # blocking again, for C code; the waits are bounded below instead
        limit_waits(conn, timeout_s)
        return conn
    except TimeoutError:
        conn.close()
        raise KvmlabError(
            f"{who}: {socket} sent no QMP greeting within {timeout_s:g} s: another client holds it "
            "(QEMU serves one per socket: a kvmlab run's invariant checks, another kvmlab inspect "
            "or drgn), or QEMU is wedged"
        ) from None
    except OSError as err:
        conn.close()
        raise KvmlabError(f"{who}: cannot connect to {socket}: {err.strerror or err}") from None
    except BaseException:
        conn.close()
        raise


def _peek_line(conn: socket_mod.socket, deadline: float | None) -> bytes:
    """The first line waiting on ``conn``, left there to be read (b"": the peer hung up
    first). A line that comes in pieces is peeked again until it is whole."""
    received = b""
    while b"\n" not in received:
        conn.settimeout(_left(deadline))
        peeked = conn.recv(GREETING_MAX, socket_mod.MSG_PEEK)
        if not peeked or len(peeked) >= GREETING_MAX:
            return peeked
        if peeked == received:
            time.sleep(0.01)  # the rest of the line is not there yet; peeking again would spin
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError
        received = peeked
    return received


def limit_waits(conn: socket_mod.socket, timeout_s: float) -> None:
    """Make each read and write on ``conn`` give up (EAGAIN) after ``timeout_s`` without
    progress, even inside C code that retries a read a signal interrupts (drgn's)."""
    left = limit(timeout_s)
    if left is None:
        return
    seconds = int(left)
    micros = max(int((left - seconds) * 1e6), 0 if seconds else 1000)  # 0 and 0 would mean never
    value = struct.pack("@ll", seconds, micros)
    conn.setsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_RCVTIMEO, value)
    conn.setsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_SNDTIMEO, value)


def _left(deadline: float | None) -> float | None:
    """The socket timeout that keeps ``deadline`` (None: no deadline, block)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)
