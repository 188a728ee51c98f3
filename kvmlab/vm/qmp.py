"""QMP, the QEMU Monitor Protocol, with deadlines: a wedged QEMU never wedges kvmlab.

Thin synchronous wrappers over the qemu.qmp library's asyncio client. QEMU serves one
QMP client at a time, so every call connects, runs its commands and disconnects.
"""

import asyncio
import contextlib
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
