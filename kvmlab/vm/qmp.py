"""QMP, the QEMU Monitor Protocol, with deadlines: a wedged QEMU never wedges kvmlab.

Thin synchronous wrappers over the qemu.qmp library's asyncio client. QEMU serves one
QMP client at a time, so every call connects, runs its commands and disconnects.
"""

import asyncio
import contextlib
import socket as socket_mod
import threading
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from kvmlab.errors import KvmlabError

DEFAULT_TIMEOUT_S = 5.0


def execute(socket: Path, command: str, arguments: dict | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run one QMP command on the VM behind ``socket`` and return its result.

    ``quit`` returns None even when QEMU hangs up before answering, as it may.
    """
    try:
        return asyncio.run(_execute(socket, command, arguments, timeout_s))
    except Exception as err:  # the library raises many types; the user needs one line
        reason = str(err) or type(err).__name__
        raise KvmlabError(f"QMP {command} on {socket} failed: {reason}") from None


async def _execute(socket: Path, command: str, arguments: dict | None, timeout_s: float) -> Any:
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


def await_greeting(socket: Path, timeout_s: float, who: str) -> None:
    """Wait for QEMU's QMP greeting on ``socket``, then hang up, or fail in one line.

    QEMU serves one client per QMP socket; a second one is accepted by the kernel's
    backlog but never greeted while the first stays. drgn's ``set_qemu_qmp`` waits for
    that greeting with no deadline, inside C code that neither Ctrl-C nor SIGTERM
    reaches, so the greeting is awaited here first, where a deadline holds.

    A timeout beyond what a socket can take (``inf``, ``1e300``: more than
    ``threading.TIMEOUT_MAX``, some 292 years) means no deadline: wait as long as it takes,
    Ctrl-C still ending the wait.
    """
    deadline = time.monotonic() + timeout_s if timeout_s < threading.TIMEOUT_MAX else None
    with socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM) as conn:
        try:
            conn.settimeout(_left(deadline))
            conn.connect(str(socket))
            received = b""
            while b"\n" not in received:
                conn.settimeout(_left(deadline))
                chunk = conn.recv(4096)
                if not chunk:
                    raise KvmlabError(f"{who}: QEMU closed {socket} without a QMP greeting")
                received += chunk
        except TimeoutError:
            raise KvmlabError(
                f"{who}: {socket} sent no QMP greeting within {timeout_s:g} s: another client holds it "
                "(QEMU serves one per socket: a kvmlab run's invariant checks, another kvmlab inspect "
                "or drgn), or QEMU is wedged"
            ) from None
        except OSError as err:
            raise KvmlabError(f"{who}: cannot connect to {socket}: {err.strerror or err}") from None
    if b'"QMP"' not in received:
        raise KvmlabError(f"{who}: {socket} is not a QMP socket (it said {received[:80]!r})")


def _left(deadline: float | None) -> float | None:
    """The socket timeout that keeps ``deadline`` (None: no deadline, block)."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)
