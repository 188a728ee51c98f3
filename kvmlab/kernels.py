"""Kernel specs, and the kernels they name: fetched, unpacked and cached.

A spec is what a user types wherever kvmlab wants a kernel:

- ``debian:<suite>``: the newest cloud kernel of that Debian suite
  (``debian:bullseye`` is 5.10, ``debian:bookworm`` 6.1);
- ``debian:<package>``: an exact image package, e.g. ``debian:linux-image-5.10.0-32-cloud-amd64``;
- ``local:<tree>[,modules=<INSTALL_MOD_PATH>]``: a kernel built from a source tree;
- ``kvm-modules:<debian spec>[+<patch, mbox or directory>]``: a Debian kernel with its
  KVM modules rebuilt from its own source, patched or not (``kvmlab.kvm_modules``).

Debian kernels land in the cache keyed by the package's sha256, with vmlinuz, config,
System.map and the module tree; ``debuginfo`` adds the -dbg package's vmlinux and
DWARF modules under ``debug/``.
"""

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmlab import cache, debian
from kvmlab.errors import KvmlabError, UnknownSpec

SPEC_HELP = ("debian:<suite> | debian:<linux-image package> | local:<tree>[,modules=<dir>] | "
             "kvm-modules:<debian spec>[+<patches>]")


@dataclass
class Kernel:
    """A bootable kernel and what kvmlab knows of it; all paths are on the host."""

    spec: str
    release: str
    vmlinuz: Path
    config: Path | None
    system_map: Path | None
    modules_root: Path | None
    """A directory holding ``lib/modules/<release>`` (None: no loadable modules)."""
    store: Path | None = None
    """A cache directory for what kvmlab derives from this kernel (module archives)."""
    vmlinux: Path | None = None
    debug_modules: Path | None = None
    package: str | None = None
    version: str | None = None
    exact: str | None = None
    """A spec that pins this kernel where ``package`` cannot (kvm-modules: over a suite)."""

    @property
    def exact_spec(self) -> str:
        """A spec naming this very kernel, for later (``debian:<suite>`` moves on)."""
        if self.exact:
            return self.exact
        return f"debian:{self.package}" if self.package else self.spec

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


def fetch(spec: str, debuginfo: bool = False) -> Kernel:
    """Resolve ``spec`` to a kernel on disk, downloading and unpacking it if needed."""
    scheme, _, rest = spec.partition(":")
    if scheme == "debian" and rest:
        return _fetch_debian(spec, rest, debuginfo)
    if scheme == "local" and rest:
        from kvmlab import local_kernel

        return local_kernel.load(spec, rest, debuginfo)
    if scheme == "kvm-modules" and rest:
        from kvmlab import kvm_modules

        return kvm_modules.load(spec, rest, debuginfo)
    raise UnknownSpec(f"unknown kernel spec {spec!r}; expected {SPEC_HELP}")


def _fetch_debian(spec: str, what: str, debuginfo: bool) -> Kernel:
    if what.startswith("linux-image-"):
        image = debian.find_package(what)
    else:
        image = debian.newest_cloud_kernel(what)
    entry = cache.area("kernels") / image.key
    if not (entry / "kernel.json").exists():
        _unpack_image(image, entry)
    if debuginfo and not (entry / "debug").is_dir():
        _unpack_debuginfo(image, entry)
    kernel = load_entry(entry)
    kernel.spec = spec
    return kernel


def _unpack_image(image: debian.Package, entry: Path) -> None:
    with cache.building(entry) as scratch:
        deb = debian.AptRoot(image.suite).download(image, scratch / "deb")
        root = scratch / "root"
        _extract_deb(deb, root)
        shutil.rmtree(scratch / "deb")
        boot = root / "boot"
        vmlinuz = next(boot.glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise KvmlabError(f"{image.name} holds no /boot/vmlinuz-*: not a kernel image package")
        release = vmlinuz.name.removeprefix("vmlinuz-")
        for name, target in (("vmlinuz", "vmlinuz"), ("config", "config"), ("System.map", "System.map")):
            source = boot / f"{name}-{release}"
            if source.exists():
                source.rename(scratch / target)
        shutil.rmtree(boot)
        shutil.rmtree(root / "usr" / "share", ignore_errors=True)
        depmod(root, release)
        record = {
            "release": release, "package": image.name, "version": image.version,
            "sha256": image.sha256, "suite": image.suite,
        }
        (scratch / "kernel.json").write_text(json.dumps(record, indent=2) + "\n")


def _unpack_debuginfo(image: debian.Package, entry: Path) -> None:
    dbg = debian.debuginfo_package(image)
    release = json.loads((entry / "kernel.json").read_text())["release"]
    with cache.building(entry / "debug") as scratch:
        deb = debian.AptRoot(dbg.suite).download(dbg, scratch / "deb")
        unpacked = scratch / "root"
        _extract_deb(deb, unpacked)
        debug = unpacked / "usr" / "lib" / "debug"
        vmlinux = debug / "boot" / f"vmlinux-{release}"
        if not vmlinux.exists():
            raise KvmlabError(f"{dbg.name} holds no vmlinux-{release}")
        vmlinux.rename(scratch / "vmlinux")
        modules = debug / "lib" / "modules" / release
        if modules.is_dir():
            modules.rename(scratch / "modules")
        shutil.rmtree(scratch / "deb")
        shutil.rmtree(unpacked)


def _extract_deb(deb: Path, dest: Path) -> None:
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True, capture_output=True)
    except FileNotFoundError:
        raise KvmlabError("dpkg-deb not found: install dpkg to unpack Debian kernels") from None
    except subprocess.CalledProcessError as err:
        raise KvmlabError(f"dpkg-deb -x {deb.name} failed: {err.stderr.decode().strip()}") from None


def depmod(root: Path, release: str) -> None:
    """Write modules.dep and friends for ``root/lib/modules/<release>``.

    Debian's packages leave this to their postinst, which an unpacked tree never ran.
    """
    if not (root / "lib" / "modules" / release).is_dir():
        return
    done = subprocess.run(["depmod", "-b", str(root), release], capture_output=True, text=True)
    if done.returncode != 0:
        raise KvmlabError(f"depmod {release} failed: {done.stderr.strip()}")


def load_entry(entry: Path) -> Kernel:
    """The Kernel described by a cache entry written by ``_unpack_image``."""
    record = json.loads((entry / "kernel.json").read_text())
    debug = entry / "debug"
    return Kernel(
        spec=f"debian:{record['package']}",
        release=record["release"],
        vmlinuz=entry / "vmlinuz",
        config=entry / "config",
        system_map=entry / "System.map",
        modules_root=entry / "root",
        store=entry,
        vmlinux=debug / "vmlinux" if (debug / "vmlinux").exists() else None,
        debug_modules=debug / "modules" if (debug / "modules").is_dir() else None,
        package=record["package"],
        version=record["version"],
    )


def cached() -> list[Kernel]:
    """Every Debian kernel in the cache, oldest release first."""
    entries = [p for p in cache.area("kernels").iterdir() if (p / "kernel.json").exists()]
    return sorted((load_entry(p) for p in entries), key=lambda k: k.release)
