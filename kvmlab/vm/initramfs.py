"""initramfs archives: the kernel unpacks several concatenated cpio archives in order.

kvmlab boots every kernel with three of them: the cached guest image (rootfs), the
kernel's own modules (cached per kernel), and a small per-run layer (init, job,
kselftest_py). Archives are written with bsdtar in the ``newc`` format the kernel
reads, owned by root whoever built them.
"""

import shutil
import subprocess
from pathlib import Path

from kvmlab.errors import KvmlabError, MissingTool


def _bsdtar(*args: str) -> None:
    if shutil.which("bsdtar") is None:
        raise MissingTool("bsdtar not found: install libarchive-tools (make setup does)")
    done = subprocess.run(["bsdtar", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KvmlabError(f"bsdtar {' '.join(args[:3])} failed: {done.stderr.strip()}")


def from_tar(tar: Path, out: Path) -> None:
    """Convert a tar archive (e.g. mmdebstrap's output) to a newc cpio archive."""
    _bsdtar("--format", "newc", "-cf", str(out), f"@{tar}")


def from_tree(tree: Path, out: Path) -> None:
    """Archive the contents of ``tree`` as the root of a newc cpio archive, root-owned."""
    _bsdtar("--format", "newc", "--uid", "0", "--gid", "0", "-cf", str(out), "-C", str(tree), ".")


def concatenate(parts: list[Path], out: Path) -> None:
    """Write the archives one after the other into ``out`` (Linux unpacks them in order)."""
    with open(out, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                shutil.copyfileobj(source, sink, 1 << 20)
