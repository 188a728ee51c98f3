"""``local:`` kernels: built from a source tree on this machine.

``local:TREE`` boots TREE/arch/x86/boot/bzImage with TREE/.config, System.map and
vmlinux (DWARF, if the build had DEBUG_INFO). Modules come from
``local:TREE,modules=DIR`` (DIR is the INSTALL_MOD_PATH of ``make modules_install``)
or, without it, from the .ko files in the tree itself, laid out and depmod'ed in the
cache. A kernel with KVM built in needs no modules at all.
"""

import hashlib
from pathlib import Path

from kvmlab import cache
from kvmlab.errors import KvmlabError, UnknownSpec
from kvmlab.kernels.model import KVM_MODULE, Kernel, stage_modules


def load(spec: str, rest: str, debuginfo: bool) -> Kernel:
    tree_text, *options = rest.split(",")
    tree = Path(tree_text).expanduser().resolve()
    settings = dict(_option(spec, o) for o in options)
    bzimage = tree / "arch" / "x86" / "boot" / "bzImage"
    release_file = tree / "include" / "config" / "kernel.release"
    if not bzimage.exists() or not release_file.exists():
        raise UnknownSpec(f"{spec}: {tree} is not a built kernel tree (no bzImage or kernel.release)")
    release = release_file.read_text().strip()
    store = cache.area("local") / _digest(bzimage)
    store.mkdir(exist_ok=True)
    vmlinux = tree / "vmlinux"
    if debuginfo and not vmlinux.exists():
        raise KvmlabError(f"{spec}: no vmlinux in {tree}, so no debuginfo")
    kvm_debug = tree / KVM_MODULE.removeprefix("kernel/")
    return Kernel(
        spec=spec, pinned=spec, release=release, vmlinuz=bzimage,
        config=tree / ".config", system_map=tree / "System.map",
        modules_root=_modules_root(spec, tree, release, settings.get("modules"), store),
        store=store,
        vmlinux=vmlinux if vmlinux.exists() else None,
        kvm_debug=kvm_debug if vmlinux.exists() and kvm_debug.exists() else None,
    )


def _option(spec: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if key != "modules" or not sep:
        raise UnknownSpec(f"{spec}: unknown option {text!r}; expected modules=DIR")
    return key, value


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _modules_root(spec: str, tree: Path, release: str, installed: str | None,
                  store: Path) -> Path | None:
    if installed:
        root = Path(installed).expanduser().resolve()
        if not (root / "lib" / "modules" / release).is_dir():
            raise UnknownSpec(f"{spec}: no lib/modules/{release} under {root}")
        return root
    built = sorted(tree.rglob("*.ko"))
    if not built:
        return None
    root = store / "modules"
    if not (root / "lib" / "modules" / release / "modules.dep").exists():
        with cache.building(root) as scratch:
            placed = ((ko, Path("kernel") / ko.relative_to(tree)) for ko in built)
            stage_modules(scratch, release, placed, tree)
    return root
