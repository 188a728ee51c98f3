"""Reading files kvmlab did not write itself: a plan, a shard's store, a reference table.

Such a path may be anything: a FIFO (reading it blocks until some writer comes, maybe
never), ``/dev/zero`` (read without end until the OOM killer comes), ``/dev/null``
(reads as empty, which a store would take for "no runs yet"), a dangling link or a
link loop. Each is refused in one line before a byte is read, and a regular file is
read only up to a size its kind can reasonably reach.

Opening with ``O_NONBLOCK`` keeps the open itself from blocking on a FIFO that has no
writer; the check on the opened descriptor (not on the path) leaves no window for the
path to be swapped in between.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from kvmlab.errors import KvmlabError

MiB = 2**20


@contextmanager
def open_regular(path: Path, what: str = "file") -> Iterator[BinaryIO]:
    """``path`` opened for binary reading if it is a regular file (after links), else a
    one-line KvmlabError saying what it is instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        dangling = os.path.islink(path)
        what = "a dangling symbolic link" if dangling else f"no such {what}"
        raise KvmlabError(f"{path}: {what}") from None
    except OSError as err:
        reason = "a symbolic link loop" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise KvmlabError(f"{path}: cannot read it: {reason}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise KvmlabError(f"{path}: not a regular file ({_kind(mode)}): a {what} is a plain file")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_bytes(path: Path, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most ``limit`` bytes (see ``open_regular``)."""
    with open_regular(path, what) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise KvmlabError(f"{path}: larger than {_size(limit)}: too large for a {what}")
    return data


def read_text(path: Path, limit: int, what: str = "file") -> str:
    """``read_bytes``, decoded as UTF-8, undecodable input refused in one line."""
    try:
        return read_bytes(path, limit, what).decode()
    except UnicodeDecodeError as err:
        raise KvmlabError(f"{path}: not UTF-8 text (byte {err.start}): not a {what}") from None


def lines(path: Path, line_limit: int, what: str = "file") -> Iterator[bytes]:
    """A regular file's lines (newline kept), each at most ``line_limit`` bytes, read as
    they come: a store of any number of records never sits in memory as one string."""
    with open_regular(path, what) as handle:
        for number, line in enumerate(iter(lambda: handle.readline(line_limit + 1), b""), 1):
            if len(line) > line_limit:
                raise KvmlabError(f"{path}:{number}: a line longer than {_size(line_limit)}: not a {what}")
            yield line


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def _size(limit: int) -> str:
    return f"{limit // MiB} MiB" if limit >= MiB else f"{limit} bytes"
