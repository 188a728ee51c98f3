"""What the traces library raises: one base class, so a caller catches one thing; and the
check each of its readers makes before it opens a file it was given."""

import json
import os
import stat
from pathlib import Path

#: What a stat mode says a path is, for paths that are not regular files.
KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class TraceError(Exception):
    """Input the traces library cannot use (a damaged trace file, a bad probe set), said in one line."""


def require_regular_file(path: Path) -> None:
    """Refuse ``path``, before anything opens it, unless it is a regular file (or a symlink
    to one): reading a FIFO blocks for ever, and a device may never end or may act on
    being opened. OSError (no such file, no permission) is left to the caller's reading."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in KINDS if test(mode)), "of an unknown kind")
        raise TraceError(f"{path}: cannot be read: not a regular file but {kind}")


def read_json(path: Path):
    """A JSON file a capture wrote, or a one-line TraceError naming it: not a regular
    file, unreadable, or not JSON."""
    try:
        require_regular_file(path)
        return json.loads(path.read_text())
    except OSError as err:
        raise TraceError(f"{path}: cannot be read: {err.strerror or err}") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise TraceError(f"{path}: not JSON ({err})") from None
