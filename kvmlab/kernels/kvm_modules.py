"""``kvm-modules:`` specs: a Debian kernel booted with its KVM modules rebuilt from source.

    kvm-modules:debian:bookworm                   the unmodified source, rebuilt
    kvm-modules:debian:bookworm+fix.patch         ... with a patch, an mbox series,
    kvm-modules:debian:bookworm+series/           ... or a directory of patches

A patch qualification must compare base and base+patch with nothing else different,
so both sides boot the same Debian kernel image and differ only in kvm.ko, kvm-amd.ko
and kvm-intel.ko, built by the same compiler from the same source: Debian's
linux-source package of the image's very version, with the series applied by ``git
am`` (or ``git apply`` for a bare diff) on a scratch git tree, and ``virt/kvm`` +
``arch/x86/kvm`` built as out-of-tree modules against Debian's matching
linux-headers. A patch that reaches outside those two directories cannot be built
this way and is refused, naming the file.

The compiler is the one Debian built the kernel with, on the host or in a root of the
kernel's own suite (``toolchain``; build.json says which). Built modules are cached
under ``kvm-modules/<key>``, keyed by the base package, the patches' bytes and the
compiler, so a second request is instant. The guest gets them
stripped (a smaller initramfs boots faster under TCG); drgn reads the copies with DWARF.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from kvmlab import apt, cache
from kvmlab.errors import KvmlabError, MissingTool
from kvmlab.kernels import debian, paths, toolchain
from kvmlab.kernels import patches as patch_series
from kvmlab.kernels.build import compile_error, make_env
from kvmlab.kernels.model import KVM_MODULE, Kernel, depmod

SCHEME = "kvm-modules"
KVM_DIRS = ("virt/kvm", "arch/x86/kvm")
#: KVM's own headers, which a patch may change too: the modules are then built against a
#: private copy of the headers package with the patched files in it. Only the modules
#: see the change, so it must leave alone what the rest of the kernel was compiled
#: against: a constant or a structure only KVM uses (the memslot limit, struct
#: kvm_memslots) is fine, a structure the core kernel shares with KVM is not.
KVM_HEADERS = ("arch/x86/include/asm/kvm_host.h", "include/linux/kvm_host.h")
MODULES = ("kvm.ko", "kvm-amd.ko", "kvm-intel.ko")
MODULE_DIR = str(Path(KVM_MODULE).parent)


def load(spec: str, rest: str, debuginfo: bool) -> Kernel:
    """The kernel a ``kvm-modules:`` spec names, building its modules if not cached."""
    base_spec, _, patch = rest.partition("+")
    if not base_spec.startswith("debian:"):
        raise KvmlabError(f"{spec}: kvm-modules: rebuilds the KVM modules of a debian: kernel, "
                          f"not {base_spec!r}")
    patches = patch_series.series(paths.expanded(patch, f"{spec}: patch")) if patch else []
    _refuse_unbuildable(patches)  # before hundreds of MB of Debian packages are fetched
    base = debian.fetch(base_spec, base_spec.removeprefix("debian:"), debuginfo)
    tools = toolchain.for_kernel(base)
    key = _key(base, patches, tools.version)
    entry = cache.area(SCHEME) / key
    if not (entry / "build.json").exists():
        with cache.locked(cache.area(SCHEME) / f"{key}.lock"):
            if not (entry / "build.json").exists():
                _build(base, patches, tools, entry)
    pinned = f"{SCHEME}:{base.pinned}" + (f"+{paths.resolved(patch, f'{spec}: patch')}" if patch else "")
    kvm_debug = entry / "build" / KVM_MODULE.removeprefix("kernel/")
    return Kernel(
        spec=spec, pinned=pinned, release=base.release, vmlinuz=base.vmlinuz, config=base.config,
        system_map=base.system_map, modules_root=entry / "root", store=entry, vmlinux=base.vmlinux,
        kvm_debug=kvm_debug if kvm_debug.exists() else None, package=base.package,
        version=base.version, suite=base.suite, patches=[_patch_record(p) for p in patches],
    )


def _patch_record(patch: Path) -> dict:
    return {"name": patch.name, "sha256": hashlib.sha256(patch.read_bytes()).hexdigest()}


def _key(base: Kernel, patches: list[Path], compiler: str) -> str:
    digest = hashlib.sha256(f"{base.package} {base.version}\n{compiler}\n".encode())
    for patch in patches:
        digest.update(hashlib.sha256(patch.read_bytes()).digest())
    return f"{base.release}-{digest.hexdigest()[:16]}"


# -- the build ----------------------------------------------------------------------------
def _build(base: Kernel, patches: list[Path], tools: toolchain.Toolchain, entry: Path) -> None:
    started = time.monotonic()
    source, headers = _kvm_source(base), _headers(base)
    with cache.building(entry) as scratch:
        tree = scratch / "tree"
        for part in KVM_DIRS:
            shutil.copytree(source / part, tree / part)
        for header in KVM_HEADERS:
            (tree / header).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_header_file(headers, header), tree / header)
        _apply(tree, patches)
        changed = [h for h in KVM_HEADERS if (tree / h).read_bytes() != _header_file(headers, h).read_bytes()]
        if changed:
            headers = _patched_headers(headers, tree, changed, scratch / "headers")
        built = _compile(tree, headers, base, tools)
        _check_vermagic(built, base)
        _install(built, base, scratch)
        shutil.rmtree(tree)
        shutil.rmtree(scratch / "headers", ignore_errors=True)
        record = {"base": base.pinned, "release": base.release, "compiler": tools.version,
                  "toolchain": tools.describe(),
                  "patches": [_patch_record(p) for p in patches], "patched_headers": changed,
                  "build_s": round(time.monotonic() - started, 1)}
        (scratch / "build.json").write_text(json.dumps(record, indent=2) + "\n")


def _refuse_unbuildable(patches: list[Path]) -> None:
    """Refuse a patch git cannot read, or one that changes nothing or reaches outside KVM_DIRS."""
    inside = (*(part + "/" for part in KVM_DIRS), *KVM_HEADERS)
    with tempfile.TemporaryDirectory(prefix="kvmlab-patch-check-") as empty:
        for patch in patches:
            touched = patch_series.files_touched(Path(empty), patch)
            if not touched:
                raise KvmlabError(f"patch {patch.name} changes no file")
            outside = [path for path in touched if not path.startswith(inside)]
            if outside:
                raise KvmlabError(
                    f"patch {patch.name} changes {outside[0]}, outside {', '.join(KVM_DIRS)} and KVM's "
                    "headers: the KVM modules alone cannot carry it; build a whole kernel (local: spec)")


def _apply(tree: Path, patches: list[Path]) -> None:
    """Commit the pristine source, then each patch on top (``_refuse_unbuildable`` passed them)."""
    patch_series.git(tree, "init", "-q")
    patch_series.git(tree, "add", "-A")
    patch_series.git(tree, "commit", "-q", "-m", "Debian source")
    for patch in patches:
        patch_series.apply(tree, patch)


def _compile(tree: Path, headers: Path, base: Kernel, tools: toolchain.Toolchain) -> Path:
    """make the two KVM directories as one external module against the headers."""
    kvm = tree / "arch" / "x86" / "kvm"
    makefile = kvm / "Makefile"
    # The in-tree Makefile finds virt/kvm's list of objects and headers under
    # $(srctree), which for an external build is the headers package: point it at ours.
    text = makefile.read_text().replace("$(srctree)/virt/kvm", str(tree / "virt" / "kvm"))
    makefile.write_text(text)
    argv = ["make", "-C", str(headers), f"M={kvm}", f"-j{os.cpu_count() or 1}", f"CC={tools.compiler}",
            f"KCFLAGS=-I{kvm} -I{tree / 'virt' / 'kvm'}", "modules"]
    done = tools.run(argv, make_env())
    (tree.parent / "build.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise KvmlabError(f"building the KVM modules of {base.release} failed: "
                          f"{compile_error((done.stdout + done.stderr).splitlines())}")
    return kvm


def _header_file(headers: Path, header: str) -> Path:
    """Where Debian's headers packages keep one of KVM_HEADERS (the ``-common`` package's tree)."""
    found = sorted(headers.parent.glob(f"*/{header}"))
    if not found:
        raise KvmlabError(f"the headers of {headers.name} hold no {header}")
    return found[0]


def _patched_headers(headers: Path, tree: Path, changed: list[str], copy: Path) -> Path:
    """The headers package's tree again, hard-linked, with the patched KVM headers written
    in as new files (the cached package is never changed). The whole ``usr`` is copied:
    the packages link to each other's directories by relative symlinks."""
    entry = headers.parents[2]  # <entry>/usr/src/linux-headers-<release>
    copy.mkdir()
    _run(["cp", "-al", str(entry / "usr"), str(copy / "usr")])
    twin = copy / headers.relative_to(entry)
    for header in changed:
        target = twin.parent / _header_file(headers, header).relative_to(headers.parent)
        target.unlink()
        target.write_bytes((tree / header).read_bytes())
    makefile = twin / "Makefile"  # points at the -common package by absolute path (_headers)
    text = makefile.read_text().replace(f"{entry}/usr/src/", f"{copy}/usr/src/")
    makefile.unlink()
    makefile.write_text(text)
    return twin


def _check_vermagic(built: Path, base: Kernel) -> None:
    """A module whose vermagic differs from the kernel's is refused at load: say so before boot."""
    want, got = _vermagic(_shipped(base, "kvm.ko")), _vermagic(built / "kvm.ko")
    if want != got:
        raise KvmlabError(f"rebuilt kvm.ko has vermagic {got!r}, the kernel {base.release} wants {want!r}")


def _shipped(base: Kernel, name: str) -> Path:
    """The base kernel's own ``name`` module, compressed (``kvm.ko.xz``, as trixie and
    later ship them) or not."""
    directory = base.modules_root / "lib" / "modules" / base.release / MODULE_DIR
    found = sorted(directory.glob(f"{name}*"))
    if not found:
        raise KvmlabError(f"{base.release} ships no {MODULE_DIR}/{name}: no KVM modules to replace")
    return found[0]


def _vermagic(module: Path) -> str:
    return _run(["modinfo", "-F", "vermagic", str(module)]).stdout.strip()


def _install(built: Path, base: Kernel, scratch: Path) -> None:
    """The base's module tree (hard links) with the three modules replaced, stripped; DWARF copies aside."""
    source = base.modules_root / "lib" / "modules" / base.release
    target = scratch / "root" / "lib" / "modules" / base.release
    target.parent.mkdir(parents=True)
    _run(["cp", "-al", str(source), str(target)])
    debug = scratch / "build" / "arch" / "x86" / "kvm"
    debug.mkdir(parents=True)
    for name in MODULES:
        shutil.copy2(built / name, debug / name)
        for shipped in (target / MODULE_DIR).glob(f"{name}*"):  # kvm.ko, or kvm.ko.xz
            shipped.unlink()
        installed = target / MODULE_DIR / name
        shutil.copy2(built / name, installed)
        _run(["strip", "--strip-debug", str(installed)])
    depmod(scratch / "root", base.release)


# -- what the build needs, cached on their own ------------------------------------------------
def _kvm_source(base: Kernel) -> Path:
    """virt/kvm and arch/x86/kvm of Debian's linux-source of the base's very version."""
    root = apt.AptRoot(_suite(base))
    name = "linux-source-" + ".".join(base.version.split(".")[:2])
    package = root.package(name)
    if package is None or package.version != base.version:
        found = package.version if package else "none"
        raise KvmlabError(f"no {name} {base.version} in Debian {_suite(base)} (found: {found}): "
                          f"the modules must be built from the kernel's own source")
    entry = cache.area("kernel-source") / package.key
    if not entry.is_dir():
        with cache.building(entry) as scratch:
            deb = root.download(package, scratch / "deb")
            _run(["dpkg-deb", "-x", str(deb), str(scratch / "deb")])
            tarball = scratch / "deb" / "usr" / "src" / f"{name}.tar.xz"
            _run(["tar", "-xJf", str(tarball), "-C", str(scratch), "--strip-components=1",
                  *(f"{name}/{part}" for part in KVM_DIRS)])
            shutil.rmtree(scratch / "deb")
    return entry


def _headers(base: Kernel) -> Path:
    """Debian's linux-headers for the base kernel, with kbuild, usable from the cache."""
    root = apt.AptRoot(_suite(base))
    headers = root.package(f"linux-headers-{base.release}")
    if headers is None or headers.version != base.version:
        raise KvmlabError(f"no linux-headers-{base.release} {base.version} in Debian {_suite(base)}")
    entry = cache.area("kernel-headers") / headers.key
    tree = entry / "usr" / "src" / f"linux-headers-{base.release}"
    if entry.is_dir():
        return tree
    depends = apt.depends_names(root.show(headers.name).get("Depends", ""))
    parts = [headers] + [p for name in depends if name.startswith(("linux-headers-", "linux-kbuild-"))
                         if (p := root.package(name)) is not None]
    with cache.building(entry) as scratch:
        for package in parts:
            deb = root.download(package, scratch / "debs")
            _run(["dpkg-deb", "-x", str(deb), str(scratch)])
        shutil.rmtree(scratch / "debs")
        # Its Makefile includes the -common package's by absolute path: make it ours.
        makefile = scratch / "usr" / "src" / f"linux-headers-{base.release}" / "Makefile"
        makefile.write_text(makefile.read_text().replace("/usr/src/", f"{entry}/usr/src/"))
    return tree


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    """A step of the build whose failure is one line: the command and the end of its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise MissingTool(f"{argv[0]} not found: rebuilding KVM modules needs it (make setup)") from None
    if done.returncode != 0:
        raise KvmlabError(f"{shlex.join(argv)} failed (exit {done.returncode}): {_last_lines(done.stderr)}")
    return done


def _last_lines(stderr: str, count: int = 2) -> str:
    """Where a failing tool says what went wrong: its last lines, joined into one."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no error output"


def _suite(base: Kernel) -> str:
    if base.suite is None:
        raise KvmlabError(f"{base.pinned}: no Debian suite recorded, so no source or headers to build from")
    return base.suite
