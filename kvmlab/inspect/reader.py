"""drgn in a reader process of its own, watched by kvmlab's: a deadline, Ctrl-C and SIGTERM
end it wherever drgn waits.

drgn waits on QEMU inside C code that holds Python's GIL and retries a read that a signal
interrupts. While it waits, nothing else runs in its process: no signal handler, no other
thread, no deadline (with drgn 0.3.0, a thread's ``set_qemu_qmp`` on a socket that greeted
and then stayed silent froze the main thread, and SIGINT and SIGTERM waited for the read to
give up). A thread cannot watch it, so a process does.

kvmlab's process does what is Python (the QMP greeting, the debuginfo fetch:
``Inspector.prepare``), then forks. The reader process attaches drgn to the greeted
connection and reads, or runs drgn's shell, telling kvmlab's process what it does over a
pipe (``attach.HANDSHAKE`` ... ``PAUSED``, ``RUNNING``, ``SHELL``) and sending back its
result or its error. kvmlab's process keeps the deadline on drgn's handshake; later waits
on QEMU are bounded inside the reader (``qmp.limit_waits``, and ``qmp.execute``'s own
deadlines for stop/cont). On a missed deadline, Ctrl-C or SIGTERM, kvmlab's process kills
the reader (SIGKILL: C code cannot hold it off), resumes the guest if the reader had
paused it, and ends in one line.

In drgn's shell Ctrl-C belongs to the shell, as in Python's (it interrupts the statement or
clears the line); SIGTERM still ends the session and kvmlab at any point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import NoReturn

from kvmlab.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, KvmlabError
from kvmlab.inspect import attach
from kvmlab.inspect.attach import Inspector, Snapshot, Target
from kvmlab.vm import qmp

SHELL = "shell"
"""The reader hands the terminal to drgn's shell: Ctrl-C is the shell's from now on."""
RESUME_TIMEOUT_S = 2.0
"""How long the last ``cont`` of a guest the reader left paused may take: kvmlab is ending."""

Work = Callable[[Inspector, Callable[[tuple], None]], "int | None"]
"""What the reader process does with its inspector; it may ``send`` messages (a tuple whose
first item is their kind) and returns its exit code."""


class ReaderCrashed(Exception):
    """The reader process failed in a way kvmlab did not foresee: a bug, its traceback noted."""


def snapshot(where: Target, timeout_s: float, check: bool = False, pid: int | None = None) -> Snapshot:
    """``Inspector.snapshot`` in a reader process."""
    return Reader(where, timeout_s).run(
        lambda inspector, send: send(("result", inspector.snapshot(check=check, pid=pid))))


class Reader:
    """One reader process for one inspector, and what kvmlab's process knows of it."""

    def __init__(self, where: Target, timeout_s: float):
        self.where = where
        self.timeout_s = timeout_s
        self.inspector = Inspector(where, timeout_s)
        self.pid: int | None = None
        self.paused = False
        """The reader said it paused the guest and has not said it resumed it."""
        self.deadline: float | None = None
        self.result = None
        self.code = 0
        self.error: BaseException | None = None
        self._sigint = None

    def run(self, work: Work):
        """Prepare here, do ``work`` in the reader; its result (a ``("result", x)`` message),
        or with none its exit code. The reader's errors are raised here as they were there."""
        self.inspector.prepare()
        messages, sender = Pipe(duplex=False)
        terminal = _terminal_state()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:
            messages.close()
            _reader_process(self.inspector, work, sender)
        sender.close()
        if self.inspector.conn is not None:
            self.inspector.conn.close()  # the reader's now: QEMU sees it end when the reader does
        try:
            self._watch(messages)
        except BaseException:
            self._kill()
            self._drain(messages)
            raise
        finally:
            messages.close()
            if self._sigint is not None:
                signal.signal(signal.SIGINT, self._sigint)
            self._resume_if_paused()
            _restore_terminal(terminal)
        if self.error is not None:
            raise self.error
        return self.result if self.result is not None else self.code

    def _watch(self, messages: Connection) -> None:
        """Follow the reader's messages until it ends, keeping the handshake's deadline."""
        while (message := self._next(messages)) is not None:
            kind, *rest = message
            if kind == attach.HANDSHAKE:
                limit = qmp.limit(self.timeout_s)
                self.deadline = None if limit is None else time.monotonic() + limit
            elif kind == attach.LOADING:
                self.deadline = None
            elif kind == attach.PAUSED:
                self.paused = True
            elif kind == attach.RUNNING:
                self.paused = False
            elif kind == SHELL:
                self._sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
            elif kind == "result":
                self.result = rest[0]
            elif kind == "error":
                self.error = KvmlabError(rest[0], rest[1])
            elif kind == "crash":
                self.error = ReaderCrashed(rest[0])
                self.error.add_note(f"in the reader process:\n{rest[1]}")
        self.code = self._reap()

    def _drain(self, messages: Connection) -> None:
        """Read what a killed reader said and this process had not read yet: a pause said
        just before the end must still be undone."""
        with contextlib.suppress(EOFError, OSError):
            while messages.poll(0):
                kind, *_ = messages.recv()
                if kind in (attach.PAUSED, attach.RUNNING):
                    self.paused = kind == attach.PAUSED

    def _next(self, messages: Connection) -> tuple | None:
        """The reader's next message; None once it has ended."""
        left = None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)
        if not messages.poll(left):
            raise KvmlabError(f"{self.inspector.who}: "
                              f"{attach.no_answer(self.where.debug_socket, self.timeout_s)}")
        try:
            return messages.recv()
        except EOFError:
            return None

    def _reap(self) -> int:
        """The ended reader's exit code; a reader killed by a signal is said here."""
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        code = os.waitstatus_to_exitcode(status)
        if code >= 0 or self.error is not None:
            return code
        if -code in (signal.SIGINT, signal.SIGTERM):
            raise KeyboardInterrupt  # the reader got the terminal's Ctrl-C or a group's SIGTERM
        raise ReaderCrashed(f"drgn's reader process ended on {signal.Signals(-code).name}")

    def _kill(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self.pid = None

    def _resume_if_paused(self) -> None:
        """Let the guest run again if the reader paused it and ended before resuming it."""
        if not self.paused or self.where.control_socket is None:
            return
        self.paused = False
        try:
            qmp.execute(self.where.control_socket, "cont", timeout_s=RESUME_TIMEOUT_S)
        except KvmlabError as err:
            print(f"kvmlab: {self.where.name} stays paused: {err}", file=sys.stderr)


def _reader_process(inspector: Inspector, work: Work, sender: Connection) -> NoReturn:
    """The reader process: do ``work``, send its error if it fails, and end (never return)."""
    code = EXIT_INTERNAL
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a SIGTERM to the group ends it at once
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # kvmlab's process decides what Ctrl-C means
        inspector.tell = lambda event: sender.send((event,))
        code = work(inspector, sender.send) or 0
    except KvmlabError as err:
        code = err.exit_code
        sender.send(("error", str(err), err.exit_code))
    except KeyboardInterrupt:  # a Ctrl-C before SIGINT was ignored, or one the shell let through
        code = EXIT_INTERRUPTED
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    except BaseException as err:  # a bug: its traceback goes to kvmlab's process
        sender.send(("crash", f"{type(err).__name__}: {err}", traceback.format_exc()))
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _terminal_state() -> list | None:
    """The terminal's settings, for after a reader killed while drgn's shell had changed them."""
    try:
        return termios.tcgetattr(sys.stdin.fileno())
    except (termios.error, OSError, ValueError, AttributeError):
        return None  # no terminal (a pipe, /dev/null, a closed stdin)


def _restore_terminal(state: list | None) -> None:
    if state is not None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, state)
