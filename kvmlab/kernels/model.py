"""The Kernel: a bootable kernel and what kvmlab knows of it, whichever spec named it."""

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmlab.errors import KvmlabError

#: The module indexes a kernel build writes beside its modules; modprobe and depmod read them.
MODULE_INDEXES = ("modules.order", "modules.builtin", "modules.builtin.modinfo")
#: Where kvm.ko sits in a module tree (``lib/modules/<release>/``) and, less ``kernel/``, in a build.
KVM_MODULE = "kernel/arch/x86/kvm/kvm.ko"


@dataclass
class Kernel:
    """A bootable kernel and what kvmlab knows of it; all paths are on the host."""

    spec: str
    """What the user asked for (``debian:bookworm`` names whatever is newest today)."""
    pinned: str
    """A spec naming this very kernel, for later: what run.json and qualify stores record."""
    release: str
    vmlinuz: Path
    config: Path | None
    system_map: Path | None
    modules_root: Path | None
    """A directory holding ``lib/modules/<release>`` (None: no loadable modules)."""
    store: Path | None = None
    """A cache directory for what kvmlab derives from this kernel (module archives)."""
    vmlinux: Path | None = None
    """vmlinux with DWARF, for drgn (None: no debug info fetched or built)."""
    kvm_debug: Path | None = None
    """kvm.ko with DWARF, for drgn (None: KVM is built in, or no debug info)."""
    package: str | None = None
    """The Debian image package this kernel (or its base, for kvm-modules:) comes from."""
    version: str | None = None
    suite: str | None = None
    """The Debian suite of ``package``: where its source, headers and compiler come from."""
    parts: list[dict] | None = None
    """``{"package", "version", "sha256"}`` of each Debian package the kernel came in (7.x
    splits one kernel over several)."""
    patches: list[dict] | None = None
    """``{"name", "sha256"}`` of each patch built in (kvm-modules: specs), for the reports."""

    def config_value(self, option: str) -> str | None:
        """The value of ``CONFIG_<option>`` in the kernel's config, or None if unset."""
        if self.config is None or not self.config.exists():
            return None
        prefix = f"CONFIG_{option}="
        for line in self.config.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line[len(prefix):]
        return None

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def depmod(root: Path, release: str) -> None:
    """Write modules.dep and friends for ``root/lib/modules/<release>``.

    Debian's packages leave this to their postinst, which an unpacked tree never ran.
    """
    if not (root / "lib" / "modules" / release).is_dir():
        return
    done = subprocess.run(["depmod", "-b", str(root), release], capture_output=True, text=True)
    if done.returncode != 0:
        raise KvmlabError(f"depmod {release} failed: {done.stderr.strip()}")




def stage_modules(root: Path, release: str, modules: Iterable[tuple[Path, Path]], indexes_from: Path) -> None:
    """Lay out ``root/lib/modules/<release>`` for modprobe: each ``(source .ko, path in the
    tree)`` of ``modules``, the build's module indexes from ``indexes_from``, then depmod."""
    target = root / "lib" / "modules" / release
    target.mkdir(parents=True, exist_ok=True)
    for source, relative in modules:
        dest = target / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    for name in MODULE_INDEXES:
        if (indexes_from / name).exists():
            shutil.copy2(indexes_from / name, target / name)
    depmod(root, release)
