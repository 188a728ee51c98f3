"""Upstream KVM selftests (memslot_perf_test...) built from Debian's linux-source-6.1.

The benchmarks compare kselftest_py with the upstream tests the patch's cover letter
quotes, so the upstream binaries must come from a known source: Debian's signed
``linux-source-6.1`` package, fetched at run time. Neither the source nor the binaries
belong in the repository; they live in the kvmlab cache under ``upstream-selftests``,
keyed by the package's version and sha256, and a second call costs nothing.

The binaries are linked statically so that they run in any x86-64 guest whatever its
libc (bookworm's 2.36, bullseye's 2.31), and no guest image needs a compiler.

    python bench/upstream_selftests.py [NAME...]
"""

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmlab import apt, cache
from kvmlab.errors import KvmlabError, MissingTool

SUITE = "bookworm"
SOURCE_PACKAGE = "linux-source-6.1"
DEFAULT_NAMES = ("memslot_perf_test", "memslot_modification_stress_test")
#: The parts of the kernel tree ``make headers`` and the kvm selftests read: 135 MB of
#: the 1.5 GB tree. Unpacking costs about the same either way (xz decompression
#: dominates), but writing a tenth of the files is kinder to the cache's disk.
TREE_PARTS = ("Makefile", "scripts", "include", "arch/x86", "tools", "usr")
SELFTESTS = "tools/testing/selftests/kvm"
TOOLS = ("dpkg-deb", "tar", "xz", "make", "gcc")


def build(names: tuple[str, ...] = DEFAULT_NAMES) -> dict[str, Path]:
    """Static x86-64 builds of the named kvm selftests, from the cache or built now.

    Each binary is published on its own by an atomic rename, under a lock per source
    package, so concurrent callers build once and never see a partial file.
    """
    for name in names:
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise KvmlabError(f"not a kvm selftest name: {name!r}")
    package = apt.AptRoot(SUITE).package(SOURCE_PACKAGE)
    if package is None:
        raise KvmlabError(f"Debian {SUITE} has no {SOURCE_PACKAGE} package")
    area = cache.area("upstream-selftests")
    entry = area / package.key
    paths = {name: entry / name for name in names}
    if all(path.exists() for path in paths.values()):
        return paths
    _check_host()
    with cache.locked(area / f"{package.key}.lock"):
        missing = [name for name, path in paths.items() if not path.exists()]
        if missing:
            with tempfile.TemporaryDirectory(prefix=".build.", dir=area) as work:
                built = _build_in(Path(work), package, missing)
                for name in missing:
                    cache.publish_file(paths[name], lambda tmp, src=built[name]: shutil.copy2(src, tmp))
    return paths


def _check_host() -> None:
    """The selftests Makefile builds for ``uname -m``: only x86-64 hosts give x86-64 tests."""
    if platform.machine() != "x86_64":
        raise KvmlabError(f"upstream selftests are built on x86-64 hosts only, not {platform.machine()}")
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise MissingTool(f"{tool} not found: building upstream kvm selftests needs {', '.join(TOOLS)}")


def _build_in(work: Path, package: apt.Package, names: list[str]) -> dict[str, Path]:
    """Fetch, unpack and build in ``work``; return where each binary was made."""
    deb = apt.AptRoot(SUITE).download(package, work / "deb")
    _run(["dpkg-deb", "-x", str(deb), str(work / "deb")], "unpacking the .deb")
    tarball = work / "deb" / "usr" / "src" / f"{package.name}.tar.xz"
    src = work / "src"
    src.mkdir()
    _run(
        ["tar", "-xJf", str(tarball), "-C", str(src), "--strip-components=1",
         *(f"{package.name}/{part}" for part in TREE_PARTS)],
        "unpacking the kernel source",
    )
    jobs = f"-j{os.cpu_count() or 1}"
    # The selftests include the uapi headers from <src>/usr/include: 6.1's kvm Makefile
    # does not install them itself.
    _run(["make", "-C", str(src), jobs, "ARCH=x86", "headers"], "make headers")
    out = work / "out"
    # LDFLAGS on the command line replaces the Makefile's "-pthread -no-pie", so both
    # come back with -static. The objects are already built -fno-PIE.
    _run(
        ["make", "-C", str(src / SELFTESTS), jobs, f"OUTPUT={out}", "LDFLAGS=-static -pthread -no-pie",
         *(str(out / name) for name in names)],
        "building the kvm selftests",
    )
    return {name: out / name for name in names}


def _run(argv: list[str], what: str) -> None:
    """Run a build step quietly; on failure raise its most telling output line."""
    # A parent make (kvmlab's own Makefile) must not leak its jobserver or level into ours.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(argv, capture_output=True, text=True, env={**env, "LC_ALL": "C"}, check=False)
    if done.returncode != 0:
        raise KvmlabError(f"{what} failed: {_failure_line(done.stdout + done.stderr)}")


def _failure_line(output: str) -> str:
    """The last compiler error, else linker message, else make error, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    # collect2's "ld returned 1 exit status" only says that the linker line above it matters.
    lines = [line for line in lines if not line.startswith("collect2:")]
    for marker in (" error: ", "ld: ", "*** "):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1]
    return lines[-1] if lines else "no output"


def main() -> int:
    names = tuple(sys.argv[1:]) or DEFAULT_NAMES
    started = time.monotonic()
    try:
        paths = build(names)
    except KvmlabError as err:
        print(f"upstream_selftests: {err}", file=sys.stderr)
        return err.exit_code
    for path in paths.values():
        print(path)
    print(f"build: {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
