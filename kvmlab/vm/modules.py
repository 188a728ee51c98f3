"""The second initramfs archive: the kernel's own modules the guest init loads.

Only the modules the image recipe names, with their dependencies as modprobe resolves
them, go in: a full module tree (~90 MB for a cloud kernel) would add seconds to every
TCG boot. The archive is cached beside the kernel, keyed by the module list.
"""

import hashlib
import subprocess
import tempfile
from pathlib import Path

from kvmlab import cache
from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel, stage_modules
from kvmlab.vm import initramfs


def archive(kernel: Kernel, modules: list[str], store: Path) -> Path | None:
    """A cpio archive of ``modules`` and their dependencies; None if nothing is loadable.

    ``store`` is where the archive is cached (beside a Debian kernel, or a cache
    directory for a local tree).
    """
    if kernel.modules_root is None:
        return None
    key = hashlib.sha256(" ".join(sorted(modules)).encode()).hexdigest()[:12]
    out = store / f"modules-{key}.cpio"
    if out.exists():
        return out
    source = kernel.modules_root / "lib" / "modules" / kernel.release
    files = _closure(kernel, modules)
    with tempfile.TemporaryDirectory(dir=store) as scratch:
        placed = ((path, path.relative_to(source)) for path in files)
        stage_modules(Path(scratch), kernel.release, placed, source)
        # The image is merged-/usr: /lib is a symlink the archive must not replace.
        (Path(scratch) / "usr").mkdir()
        (Path(scratch) / "lib").rename(Path(scratch) / "usr" / "lib")
        cache.publish_file(out, lambda tmp: initramfs.from_tree(Path(scratch), tmp))
    return out


def first_available(kernel: Kernel, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` this kernel has, as a module or built in (None: none)."""
    if kernel.modules_root is None:
        return None
    for name in names:
        try:
            _closure(kernel, [name])
        except KvmlabError:
            continue
        return name
    return None


def _closure(kernel: Kernel, modules: list[str]) -> set[Path]:
    """The .ko files modprobe would insert for ``modules``; built-in ones need none."""
    assert kernel.modules_root is not None
    files: set[Path] = set()
    for name in modules:
        done = subprocess.run(
            ["modprobe", "-d", str(kernel.modules_root), "-S", kernel.release,
             "--show-depends", name],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            if _builtin(kernel, name):
                continue
            raise KvmlabError(
                f"kernel {kernel.release} has no module {name}: {done.stderr.strip()}"
            )
        for line in done.stdout.splitlines():
            words = line.split()
            if words and words[0] == "insmod":
                files.add(Path(words[1]))
    return files


def _builtin(kernel: Kernel, name: str) -> bool:
    assert kernel.modules_root is not None
    builtin = kernel.modules_root / "lib" / "modules" / kernel.release / "modules.builtin"
    wanted = name.replace("-", "_")
    if not builtin.exists():
        return False
    return any(
        Path(line).stem.replace("-", "_") == wanted for line in builtin.read_text().splitlines()
    )
