#!/usr/bin/python3
"""kvmlab's guest agent: run the host's commands one at a time in a guest that stays up.

The job of a long-lived lab guest (``kvmlab qualify`` keeps one per kernel and runs its
whole matrix inside it). Runs on the image's python3 with the standard library only.

The host talks to it over the virtio-serial port ``protocol.PORT_CONTROL`` in JSON lines:

- the agent says ``{"event": "agent-ready"}`` once, when it has the port; its first
  request may come through the mailbox instead (``mailbox``: how a restored guest
  takes it at the same instruction every time);
- a request ``{"id": N, "argv": [...], "timeout_s": S, "files": [PATH, ...]}`` runs
  argv with the job's environment and answers ``{"id": N, "code": C, "stdout": ...,
  "stderr": ..., "elapsed_s": ..., "files": {PATH: BASE64 or null}}``: the tails of the
  streams and the named files the command left behind (then deleted, so the next
  request starts clean). A command that outlives its timeout is killed: ``"code":
  "timeout"``. Optional fields: ``env`` (added to the environment), ``put`` ({PATH:
  BASE64}: files written first), ``unpack`` ({DIRECTORY: BASE64 tar}: unpacked first)
  and ``stream`` (the command's output goes to the agent's own stdout and stderr, which
  are the job's ports, as it comes, instead of into the answer): ``kvmlab run`` in a
  restored guest is one such request;
- ``{"quit": true}``, or the host going away (end of file), ends the agent, and with
  it the job: the guest powers off.
"""

import base64
import compileall
import io
import json
import os
import select
import subprocess
import sys
import tarfile
import time

from kvmlab_guest import hold, mailbox, ports, protocol

STREAM_TAIL = 64 * 1024
#: Unpack as tar(1) would, where this Python knows how (3.11.4 and later, and backports).
SAFE_EXTRACT = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}


def open_port(name: str) -> int:
    """The port's fd; the host connects first, or a read here would see end of file."""
    return os.open(ports.find((name,))[name], os.O_RDWR)


def send(port: int, message: dict) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(port, data) :]


def first_from_mailbox(port: int, box) -> dict | None:
    """The first request, if it comes through the mailbox; None once the port has data."""
    while not select.select([port], [], [], mailbox.LOOK_S)[0]:
        line = mailbox.take(box)
        if line is not None:
            return json.loads(line)
    return None


def requests(port: int, box=None):
    """Each request line from the host, the first perhaps from the mailbox ``box``, until
    the host quits or hangs up."""
    first = first_from_mailbox(port, box) if box is not None else None
    if first is not None:
        yield first
    pending = b""
    while True:
        chunk = os.read(port, 65536)
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)


def prepare(request: dict) -> None:
    """Write the request's files and unpack its archives before its command runs."""
    for path, data in request.get("put", {}).items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))
    for directory, data in request.get("unpack", {}).items():
        os.makedirs(directory, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(data))) as archive:
            archive.extractall(directory, **SAFE_EXTRACT)


def run(request: dict) -> dict:
    try:
        prepare(request)
    except (OSError, ValueError, tarfile.TarError) as err:  # a request the host got wrong
        return answer(request, protocol.EXIT_NOT_RUNNABLE, b"", f"kvmlab: bad request: {err}\n".encode(), 0.0)
    stream = bool(request.get("stream"))
    started = time.monotonic()
    try:
        done = subprocess.run(
            request["argv"],
            capture_output=not stream,
            stdin=subprocess.DEVNULL,
            timeout=request.get("timeout_s"),
            cwd="/root",
            env={**os.environ, **request.get("env", {})},
        )
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
        code = code if code >= 0 else 128 - code
    except subprocess.TimeoutExpired as expired:
        code, stdout, stderr = protocol.AGENT_TIMEOUT, expired.stdout, expired.stderr
    except OSError as err:
        stdout, stderr = b"", f"kvmlab: cannot run {request['argv'][0]}: {err}\n".encode()
        code = protocol.EXIT_NOT_FOUND if isinstance(err, FileNotFoundError) else protocol.EXIT_NOT_RUNNABLE
        if stream:
            sys.stderr.buffer.write(stderr)
            sys.stderr.flush()
    return answer(request, code, stdout, stderr, time.monotonic() - started)


def answer(request: dict, code, stdout: bytes | None, stderr: bytes | None, elapsed_s: float) -> dict:
    return {
        "id": request.get("id"),
        "code": code,
        "elapsed_s": elapsed_s,
        "stdout": (stdout or b"")[-STREAM_TAIL:].decode(errors="replace"),
        "stderr": (stderr or b"")[-STREAM_TAIL:].decode(errors="replace"),
        "files": {path: _take(path) for path in request.get("files", [])},
    }


def _take(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    os.unlink(path)
    return base64.b64encode(data).decode()


def main() -> int:
    # Compiled once here, the guest's packages import in 0.11 s of guest time instead of
    # 0.18 s in every command after (the layer carries no bytecode, and jobs write none);
    # a template keeps the bytecode for every guest restored from it.
    compileall.compile_dir(protocol.GUEST_CODE, quiet=1)
    port = open_port(protocol.PORT_CONTROL)
    box = mailbox.open_mailbox()
    register = hold.holder() if box is not None else None
    send(port, {"event": protocol.EVENT_AGENT_READY, "release": os.uname().release,
                "held": register is not None})
    if register is not None:
        hold.hold(register)  # its first request is in the mailbox when the host continues it
    for request in requests(port, box):
        if request.get("quit"):
            break
        send(port, run(request))
    return 0


if __name__ == "__main__":
    sys.exit(main())
