"""Where the KVM modules of a Debian kernel are compiled: on the host, or in a root of the
kernel's own suite, so that they are built by the compiler Debian built the kernel with.

Debian builds each suite's kernels with that suite's gcc (its version is in
``CONFIG_CC_VERSION_TEXT``: gcc-10 for bullseye, gcc-12 for bookworm, and from trixie on
named by its target, ``x86_64-linux-gnu-gcc-14``; sid's 7.x kernels use gcc-16). Modules built by
another compiler may not load, or load and differ in more than the patch. When the host
has that compiler, the build runs here. Otherwise kvmlab makes a minimal root of the
kernel's suite with mmdebstrap (the compiler, make, the C library headers, libelf),
cached by suite and package list, and runs make in it, with kvmlab's cache (the source
tree and the headers) bound at the same path, the way tuxmake keeps one toolchain per
build. The headers package's own tools (fixdep, modpost) come from that suite too and
run in its root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmlab import apt, cache
from kvmlab.errors import KvmlabError, MissingTool
from kvmlab.kernels.model import Kernel

#: What a module build needs beside the compiler, in the suite's root.
#: dwarves is pahole, which 7.x's module build runs to give each module its BTF.
PACKAGES = ("make", "libc6-dev", "libelf-dev", "bc", "binutils", "dwarves")
_COMPILER = re.compile(r"^(x86_64-linux-gnu-)?(gcc|gcc-\d+|clang|clang-\d+)$")


@dataclass
class Toolchain:
    """A compiler to build a kernel's modules with, and where it runs."""

    compiler: str
    """The command: gcc-10, gcc-12, ..."""
    version: str
    """Its ``--version`` first line, part of the build's cache key."""
    root: Path | None = None
    """A root of the kernel's suite to run in; None: the host."""
    suite: str | None = None

    def describe(self) -> str:
        where = f"in a Debian {self.suite} root" if self.root else "on the host"
        return f"{self.version}, {where}"

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        """Run ``argv`` here or in the root; in the root, kvmlab's cache and /dev appear
        at their own paths, and /proc (7.x's objtool reads /proc/self/limits); a private
        mount namespace, so nothing leaks to the host."""
        if self.root is None:
            return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        steps = []
        for path in (cache.root().resolve(), Path("/dev"), Path("/proc")):
            inside = shlex.quote(f"{self.root}{path}")
            steps.append(f"mkdir -p {inside} && mount --rbind {shlex.quote(str(path))} {inside}")
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        script = " && ".join(steps) + f" && exec {chroot} {shlex.quote(str(self.root))} {shlex.join(argv)}"
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"},
                              check=False)


def for_kernel(base: Kernel) -> Toolchain:
    """The toolchain Debian built ``base`` with: the host's if it has the compiler, else a
    root of ``base``'s suite; one clear line when neither can be had."""
    text = (base.config_value("CC_VERSION_TEXT") or "").strip('"')
    name = text.split(" ")[0]
    package = compiler_package(name)
    if package is None:
        raise KvmlabError(f"{base.release}: its config names no compiler kvmlab knows "
                          f"(CONFIG_CC_VERSION_TEXT {text!r}), so its modules cannot be rebuilt alike")
    if shutil.which(name) is not None:
        return Toolchain(name, _version(subprocess.run([name, "--version"], capture_output=True, text=True)))
    if base.suite is None:
        raise KvmlabError(f"{name} not found, and {base.release} names no Debian suite to take it from")
    root = _suite_root(base.suite, name, package)
    done = Toolchain(name, "", root, base.suite).run([name, "--version"], os.environ.copy())
    if done.returncode != 0:
        raise KvmlabError(f"{name} does not run in the Debian {base.suite} root {root}: "
                          f"{done.stderr.strip()[-300:]}")
    return Toolchain(name, _version(done), root, base.suite)


def _version(done: subprocess.CompletedProcess) -> str:
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def compiler_package(name: str) -> str | None:
    """The Debian package of a compiler as a kernel config names it (``gcc-12``,
    ``x86_64-linux-gnu-gcc-14`` is gcc-14's), or None for one kvmlab does not know."""
    named = _COMPILER.match(name)
    return named.group(2) if named else None


def root_suites(suite: str) -> list[str]:
    """The suites a build root for ``suite``'s kernels is made from: the suite itself, or
    for ``X-backports`` X first, then the backports."""
    base = suite.removesuffix("-backports")
    return [base] if base == suite else [base, suite]


def _suite_root(suite: str, compiler: str, package: str) -> Path:
    """A minimal root of ``suite`` with ``compiler`` (from ``package``) and PACKAGES, made
    once and cached. A backports suite is no system of its own: its root is the suite it
    backports to with the backports added, as a machine running that kernel has them."""
    if os.geteuid() != 0:
        raise KvmlabError(f"building in a Debian {suite} root (for {compiler}, which this host lacks) "
                          "needs root: it chroots into the root it makes")
    for tool in ("mmdebstrap", "unshare", "chroot"):
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} not found: a Debian {suite} build root needs it (make setup)")
    packages = sorted({package, *PACKAGES})
    suites = root_suites(suite)
    if all(apt.AptRoot(s).package(package) is None for s in suites):
        raise KvmlabError(f"Debian {suite} has no package {package}, the compiler its kernels "
                          "were built with")
    base = suites[0]
    sources = [f"deb [signed-by={apt.KEYRING}] {apt.mirror()} {s} main" for s in suites]
    key = hashlib.sha256(" ".join(packages + sources[1:]).encode()).hexdigest()[:12]
    entry = cache.area("toolchains") / f"{suite}-{key}"
    if (entry / "usr" / "bin" / compiler).exists():
        return entry
    with cache.locked(cache.area("toolchains") / f"{suite}-{key}.lock"):
        if not (entry / "usr" / "bin" / compiler).exists():
            with cache.building(entry) as scratch:  # an empty directory, as mmdebstrap wants
                done = subprocess.run(
                    ["mmdebstrap", "--quiet", "--variant=minbase", *apt.host_policy_aptopts(),
                     f"--include={','.join(packages)}",
                     base, str(scratch), *sources],
                    capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise KvmlabError(f"mmdebstrap of a Debian {suite} build root failed: "
                                      f"{done.stderr.strip()[-400:] or 'no error output'}")
    return entry
