"""The paths a user types for a kernel (a tree, a patch, a config, a build directory), read as meant.

pathlib raises RuntimeError for two of them on Python 3.11: ``~nosuchuser/x``
("Could not determine home directory") and a symlink loop ("Symlink loop from ...").
Both are the user's input, not a bug in kvmlab, so they become one-line errors naming
the path and what it was for.
"""

from __future__ import annotations

from pathlib import Path

from kvmlab.errors import KvmlabError


def expanded(path: str | Path, what: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded; ``what`` names it in the error."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # ~user of no user, or ~ with no $HOME and no passwd entry
        home = Path(path).parts[0]
        raise KvmlabError(f"{what} {path}: {home} names no home directory (no such user?)") from None


def resolved(path: str | Path, what: str) -> Path:
    """``path`` expanded and made absolute with its symlinks followed; it need not exist."""
    full = expanded(path, what)
    try:
        return full.resolve()
    except RuntimeError as err:
        raise KvmlabError(f"{what} {path}: a symlink loop ({err})") from None
    except OSError as err:
        raise KvmlabError(f"{what} {path}: cannot be resolved: {err.strerror or err}") from None
