"""The on-disk cache: where it lives, and how entries appear in it atomically.

Entries are directories named by content (a package's sha256, a recipe's hash). They
are built in a private temporary directory beside their final place and renamed into
it, so a reader never sees a half-built entry and two kvmlab runs building the same
entry at once both end up using one complete copy.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def root() -> Path:
    """The cache root: ``$KVMLAB_CACHE``, else ``$XDG_CACHE_HOME/kvmlab``, else ~/.cache/kvmlab."""
    if env := os.environ.get("KVMLAB_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kvmlab"


def area(name: str) -> Path:
    """A named top-level area of the cache (``kernels``, ``images``, ``apt``...), created."""
    path = root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def disk_usage(path: Path) -> int:
    """Bytes ``path`` and everything under it take on disk (allocated blocks: a sparse
    file counts what it holds; links not followed)."""
    total = _allocated(path)
    for parent, dirs, files in os.walk(path):
        total += sum(_allocated(Path(parent, name)) for name in dirs + files)
    return total


def _allocated(path: Path) -> int:
    try:
        return path.lstat().st_blocks * 512
    except OSError:
        return 0


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``final`` when the block succeeds.

    If another process published ``final`` first, the scratch copy is discarded and
    theirs is kept. If the block fails, nothing appears at ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield scratch
        try:
            os.rename(scratch, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def publish_file(final: Path, write, replace: bool = False) -> Path:
    """Create ``final`` by calling ``write(tmp_path)`` and renaming.

    A no-op if ``final`` exists, unless ``replace``: then it is swapped atomically.
    """
    if final.exists() and not replace:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return final


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
