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
from kvmlab.kernels import paths
from kvmlab.kernels.model import KVM_MODULE, Kernel, stage_modules


def load(spec: str, rest: str, debuginfo: bool) -> Kernel:
    """The kernel a ``local:`` spec names. Everything is checked before the cache is
    written to, so a refused spec leaves no trace there."""
    tree_text, *options = rest.split(",")
    tree = paths.resolved(tree_text, f"{spec}: tree")
    settings = dict(_option(spec, o) for o in options)
    bzimage = tree / "arch" / "x86" / "boot" / "bzImage"
    release_file = tree / "include" / "config" / "kernel.release"
    if not bzimage.is_file() or not release_file.is_file():
        raise UnknownSpec(f"{spec}: {tree} is not a built kernel tree (no bzImage or kernel.release)")
    release = _release(spec, release_file)
    vmlinux = tree / "vmlinux"
    if debuginfo and not vmlinux.exists():
        raise KvmlabError(f"{spec}: no vmlinux in {tree}, so no debuginfo")
    installed = _installed_modules(spec, settings["modules"], release) if "modules" in settings else None
    store = cache.area("local") / _digest(bzimage)
    store.mkdir(exist_ok=True)
    kvm_debug = tree / KVM_MODULE.removeprefix("kernel/")
    return Kernel(
        spec=spec, pinned=spec, release=release, vmlinuz=bzimage,
        config=tree / ".config", system_map=tree / "System.map",
        modules_root=installed or _built_modules(tree, release, store),
        store=store,
        vmlinux=vmlinux if vmlinux.exists() else None,
        kvm_debug=kvm_debug if vmlinux.exists() and kvm_debug.exists() else None,
    )


def _release(spec: str, path: Path) -> str:
    """The tree's kernel release, refused unless it is a plain name: it becomes a directory
    name in the cache (``lib/modules/<release>``), so ``../../x`` would write outside it."""
    try:
        release = path.read_bytes().decode().strip()
    except UnicodeDecodeError:
        raise KvmlabError(f"{spec}: {path} is not UTF-8 text") from None
    plain = release not in ("", ".", "..") and "/" not in release and release.isprintable() \
        and not any(char.isspace() for char in release)
    if not plain:
        raise KvmlabError(f"{spec}: {path} holds {release!r}, not a kernel release "
                          f"(a name without '/', spaces or control characters)")
    return release


def _option(spec: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if key != "modules" or not value:
        raise UnknownSpec(f"{spec}: unknown option {text!r}; expected modules=DIR")
    return key, value


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _installed_modules(spec: str, installed: str, release: str) -> Path:
    """The ``modules=`` directory (an INSTALL_MOD_PATH), which must hold this release's modules."""
    root = paths.resolved(installed, f"{spec}: modules directory")
    if not (root / "lib" / "modules" / release).is_dir():
        raise UnknownSpec(f"{spec}: no lib/modules/{release} under {root}")
    return root


def _built_modules(tree: Path, release: str, store: Path) -> Path | None:
    """The tree's own .ko files, laid out and depmod'ed in the cache (None: it has none)."""
    built = sorted(tree.rglob("*.ko"))
    if not built:
        return None
    root = store / "modules"
    if not (root / "lib" / "modules" / release / "modules.dep").exists():
        with cache.building(root) as scratch:
            placed = ((ko, Path("kernel") / ko.relative_to(tree)) for ko in built)
            stage_modules(scratch, release, placed, tree)
    return root
