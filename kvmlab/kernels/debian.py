"""Debian's kernel packages: fetched through kvmlab's apt root, unpacked and cached.

Debian kernels land in the cache keyed by the package's sha256, with vmlinuz, config,
System.map and the module tree; ``debuginfo`` adds the -dbg package's vmlinux and
the DWARF of the KVM modules under ``debug/``.
"""

import json
import shutil
import subprocess
from pathlib import Path

from kvmlab import apt, cache
from kvmlab.errors import KvmlabError, UnknownSpec
from kvmlab.kernels.model import KVM_MODULE, Kernel, depmod

#: The module directory whose DWARF a kernel's debug info keeps.
KVM_DIR = Path(KVM_MODULE).parent
#: What a cache entry's kernel.json must name.
ENTRY_KEYS = ("release", "package", "version")


def fetch(spec: str, what: str, debuginfo: bool) -> Kernel:
    if what.startswith("linux-image-"):
        try:
            image = apt.find_package(what)
        except UnknownSpec:
            entry = _cached_entry(what, debuginfo)
            if entry is None:
                raise
            kernel = load_entry(entry)  # gone from Debian (sid moves on), still in the cache
            kernel.spec = spec
            return kernel
    else:
        image = apt.newest_cloud_kernel(what)
    entry = cache.area("kernels") / image.key
    if not (entry / "kernel.json").exists():
        _unpack_image(image, entry)
    if debuginfo and not (entry / "debug").is_dir():
        _unpack_debuginfo(image, entry)
    kernel = load_entry(entry)
    kernel.spec = spec
    return kernel


def _cached_entry(package: str, debuginfo: bool) -> Path | None:
    """The newest cache entry of ``package`` (with its debug info when asked), for a pinned
    spec whose package the mirror no longer serves: a qualify store or a run of a sid
    kernel names a package that sid drops within weeks."""
    entries = [entry for entry in cache.area("kernels").glob(f"{package}_*")
               if (entry / "kernel.json").exists() and (not debuginfo or (entry / "debug").is_dir())]
    return max(entries, key=lambda entry: (entry / "kernel.json").stat().st_mtime, default=None)


def _unpack_image(image: apt.Package, entry: Path) -> None:
    with cache.building(entry) as scratch:
        parts = apt.build_parts(image)
        root = scratch / "root"
        for part in parts:
            _extract_deb(apt.AptRoot(part.suite).download(part, scratch / "deb"), root)
        shutil.rmtree(scratch / "deb")
        release = _release(root, parts)
        for name in ("vmlinuz", "config", "System.map"):
            for source in _kernel_file_places(root, name, release):
                if source.exists() and not (scratch / name).exists():
                    source.rename(scratch / name)
                source.unlink(missing_ok=True)
        shutil.rmtree(root / "boot", ignore_errors=True)
        shutil.rmtree(root / "usr" / "share", ignore_errors=True)
        _unmerge_usr(root, Path("lib", "modules"))
        depmod(root, release)
        record = {
            "release": release, "package": image.name, "version": image.version,
            "sha256": image.sha256, "suite": image.suite,
            "parts": [{"package": p.name, "version": p.version, "sha256": p.sha256} for p in parts],
        }
        (scratch / "kernel.json").write_text(json.dumps(record, indent=2) + "\n")


def _release(root: Path, parts: list[apt.Package]) -> str:
    """The release of the one vmlinuz the packages hold: in ``/boot`` up to 6.x, beside the
    modules (``/usr/lib/modules/<release>/vmlinuz``) from 7.x on."""
    found = sorted({path.name.removeprefix("vmlinuz-") for path in (root / "boot").glob("vmlinuz-*")} |
                   {path.parent.name for tree in ("lib", "usr/lib")
                    for path in root.glob(f"{tree}/modules/*/vmlinuz")})
    if len(found) != 1:
        names = ", ".join(p.name for p in parts)
        what = "no vmlinuz" if not found else f"{len(found)} kernels ({', '.join(found)})"
        raise KvmlabError(f"{names} hold {what} in /boot or /usr/lib/modules/<release>/: not a "
                          "kernel package kvmlab can read (has Debian split its kernels anew?)")
    return found[0]


def _kernel_file_places(root: Path, name: str, release: str) -> list[Path]:
    """Where a Debian kernel package puts ``name`` (vmlinuz, config, System.map), oldest
    layout first."""
    return [root / "boot" / f"{name}-{release}",
            root / "usr" / "lib" / "modules" / release / name,
            root / "lib" / "modules" / release / name]


def _unpack_debuginfo(image: apt.Package, entry: Path) -> None:
    dbg = apt.debuginfo_package(image)
    release = json.loads((entry / "kernel.json").read_text())["release"]
    with cache.building(entry / "debug") as scratch:
        deb = apt.AptRoot(dbg.suite).download(dbg, scratch / "deb")
        unpacked = scratch / "root"
        _extract_deb(deb, unpacked)
        debug = unpacked / "usr" / "lib" / "debug"
        vmlinux = _debug_vmlinux(debug, release)
        if vmlinux is None:
            raise KvmlabError(f"{dbg.name} holds no vmlinux-{release} (looked in /usr/lib/debug/boot "
                              "and /usr/lib/debug/lib/modules/<release>)")
        vmlinux.rename(scratch / "vmlinux")
        _unmerge_usr(debug, Path("lib", "modules"))
        _keep_kvm_modules(debug / "lib" / "modules" / release, scratch / "modules")
        shutil.rmtree(scratch / "deb")
        shutil.rmtree(unpacked)


def _keep_kvm_modules(modules: Path, kept: Path) -> None:
    """Move the KVM modules' DWARF from an unpacked -dbg's ``modules`` tree to ``kept``.
    drgn needs vmlinux and kvm.ko only (``inspect.attach``); the package's other 1.1 GB
    of module DWARF made each cached kernel 1.8 GB, and a cold ``make test``, which
    fetches six, ran a CI machine's disk full."""
    kvm = modules / KVM_DIR
    if kvm.is_dir():
        (kept / KVM_DIR).parent.mkdir(parents=True)
        kvm.rename(kept / KVM_DIR)


def _debug_vmlinux(debug: Path, release: str) -> Path | None:
    """The regular file holding vmlinux in an unpacked -dbg package: ``boot/vmlinux-<release>``
    up to 6.x; from 7.x that is a relative symlink to ``lib/modules/<release>/vmlinux``."""
    for place in (debug / "boot" / f"vmlinux-{release}", debug / "lib" / "modules" / release / "vmlinux"):
        real = place.resolve()
        if real.is_file() and real.is_relative_to(debug.resolve()):
            return real
    return None


def _unmerge_usr(root: Path, tree: Path) -> None:
    """Move ``root/usr/<tree>`` to ``root/<tree>``: packages built for a merged /usr
    (trixie's 6.12 and later) ship their modules under usr/lib/modules, while depmod,
    modprobe and the initramfs expect the classic ``lib/modules`` of older suites."""
    merged = root / "usr" / tree
    if not merged.is_dir() or (root / tree).exists():
        return
    (root / tree).parent.mkdir(parents=True, exist_ok=True)
    merged.rename(root / tree)


def _extract_deb(deb: Path, dest: Path) -> None:
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
    except FileNotFoundError:
        raise KvmlabError("dpkg-deb not found: install dpkg to unpack Debian kernels") from None
    except subprocess.CalledProcessError as err:
        raise KvmlabError(f"dpkg-deb -x {deb.name} failed: {err.stderr.decode().strip()}") from None


def load_entry(entry: Path) -> Kernel:
    """The Kernel described by a cache entry written by ``_unpack_image``."""
    record = _entry_record(entry / "kernel.json")
    debug = entry / "debug"
    kvm_debug = debug / "modules" / KVM_MODULE
    pinned = f"debian:{record['package']}"
    return Kernel(
        spec=pinned,
        pinned=pinned,
        release=record["release"],
        vmlinuz=entry / "vmlinuz",
        config=entry / "config",
        system_map=entry / "System.map",
        modules_root=entry / "root",
        store=entry,
        vmlinux=debug / "vmlinux" if (debug / "vmlinux").exists() else None,
        kvm_debug=kvm_debug if kvm_debug.exists() else None,
        package=record["package"],
        version=record["version"],
        suite=record.get("suite"),
        parts=record.get("parts"),
    )


def _entry_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = getattr(err, "strerror", None) or str(err)
    else:
        fields = record if isinstance(record, dict) else {}
        missing = [key for key in ENTRY_KEYS if not isinstance(fields.get(key), str)]
        if not missing:
            return record
        problem = f"no {', '.join(missing)}"
    raise KvmlabError(f"{path} is damaged ({problem}); delete {path.parent} to fetch that kernel again")


def cached(damaged: list[str] | None = None) -> list[Kernel]:
    """Every Debian kernel in the cache, oldest release first; the error of each damaged
    entry goes to ``damaged`` (when given) instead of hiding the others."""
    kernels = []
    for entry in cache.area("kernels").iterdir():
        if not (entry / "kernel.json").exists():
            continue
        try:
            kernels.append(load_entry(entry))
        except KvmlabError as err:
            if damaged is None:
                raise
            damaged.append(str(err))
    return sorted(kernels, key=lambda k: k.release)
