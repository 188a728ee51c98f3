"""The emulator: one exact QEMU, fetched from Debian into the cache the way kernels are.

Instruction counts (``--clock icount``) are comparable only under the same emulator
and CPU model, so kvmlab pins its QEMU like it pins a kernel: QEMU 10.0 from Debian's
bookworm-backports, downloaded through kvmlab's private apt configuration (signatures
checked, the system's apt sources untouched) and unpacked with ``dpkg -x`` into the
cache; it runs with ``-L`` pointing at its own firmware. On a newer host (Debian 13) a
few of the bookworm libraries it links are gone or renamed (libcapstone4, libfuse3-3,
libaio1): those are fetched from bookworm too, unpacked beside it and found through
``LD_LIBRARY_PATH``, so the pin holds there as well. Bookworm's own QEMU 7.2 hangs
in early boot with icount and two vCPUs and double-faults Debian's 6.12, which is why
it is not the default. ``$KVMLAB_QEMU`` names another binary; its version is read from
``--version`` and recorded like the pinned one's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from kvmlab import apt, cache
from kvmlab.errors import KvmlabError, MissingTool, UnknownSpec

SUITE = "bookworm-backports"
#: Where a library the host lacks is looked for: the backport's own suite, then the one it is built for.
LIBRARY_SUITES = (SUITE, "bookworm")
LIBRARIES = "libs"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data")
BINARY = "usr/bin/qemu-system-x86_64"
DATA = "usr/share/qemu"
#: The oldest QEMU that boots 2-vCPU guests with ``-icount`` (7.2 hangs in early boot).
ICOUNT_MIN_VERSION = (10, 0)
#: Linux 6.12 and later double-fault under QEMU 7.2's TCG while unpacking the initramfs
#: (``traps: PANIC: double fault`` in kmem_cache_alloc_noprof); QEMU 10.0 boots them.
LINUX_6_12_MIN_VERSION = (10, 0)
#: qboot starts a -kernel boot ~0.5 s sooner than SeaBIOS under TCG; used when present.
QBOOT = "qboot.rom"
SYSTEM_DATA = Path("/usr/share/qemu")
RECORD = "emulator.json"
#: QEMU's version as ``--version`` prints it: 10.0.2, or 7.2.
VERSION = re.compile(r"\d+\.\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Emulator:
    binary: str
    version: str
    """QEMU's own version, e.g. ``10.0.2``, as ``--version`` prints it."""
    package: str | None = None
    """The Debian package and version it came from, when kvmlab fetched it."""
    data_dir: str | None = None
    """Its firmware directory (``-L``), for a QEMU unpacked outside /usr."""
    library_path: str | None = None
    """``LD_LIBRARY_PATH`` for libraries the host lacked, unpacked beside it (None: none)."""

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", self.version)[:3])

    def command(self) -> list[str]:
        """The start of its command line: the binary, through ``env`` when it needs its
        own libraries, so a printed command runs as printed and the process is QEMU."""
        if self.library_path:
            return ["env", f"LD_LIBRARY_PATH={self.library_path}", self.binary]
        return [self.binary]

    def firmware_args(self) -> list[str]:
        data = Path(self.data_dir) if self.data_dir else SYSTEM_DATA
        argv = ["-L", self.data_dir] if self.data_dir else []
        if (data / QBOOT).exists():
            argv += ["-bios", str(data / QBOOT)]
        return argv

    def describe(self) -> str:
        origin = self.package or self.binary
        return f"QEMU {self.version} ({origin})"

    def to_json(self) -> dict:
        return asdict(self)


def choose() -> Emulator:
    """``$KVMLAB_QEMU`` when set, else kvmlab's pinned QEMU (fetched on first use)."""
    if name := os.environ.get("KVMLAB_QEMU"):
        path = shutil.which(name)
        if path is None:
            raise MissingTool(f"{name} not found ($KVMLAB_QEMU); unset it to use kvmlab's own QEMU")
        return Emulator(path, probe_version(path))
    return fetch()


def fetch() -> Emulator:
    """The pinned QEMU from the cache, downloading and unpacking it first if needed."""
    root = apt.AptRoot(SUITE)
    packages = []
    for name in PACKAGES:
        package = root.package(name)
        if package is None:
            raise KvmlabError(f"Debian {SUITE} has no {name}: cannot fetch kvmlab's QEMU")
        packages.append(package)
    # No epoch colon in the name: QEMU's -L and -bios paths are safer without one.
    final = cache.area("qemu") / packages[0].key.replace(":", "_")
    with cache.locked(final.with_suffix(".lock")):
        if not (final / RECORD).exists():
            with cache.building(final) as scratch:
                _unpack(root, packages, scratch, final)
    return load(final)


def load(directory: Path) -> Emulator:
    """The QEMU recorded in ``directory``, trusted only once its record is checked: the
    version picks the clock and the kernels it may boot, and the binary is what runs."""
    try:
        record = json.loads((directory / RECORD).read_text())
        problem = _record_problem(record)
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        problem = str(err)
    if problem:
        raise KvmlabError(f"{directory / RECORD} is damaged ({problem}); delete {directory} to fetch again")
    return Emulator(**record)


def _record_problem(record: object) -> str | None:
    """What is wrong with a recorded QEMU, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    unknown = sorted(set(record) - {field.name for field in fields(Emulator)})
    if unknown:
        return f"unknown field {unknown[0]!r}"
    binary, version = record.get("binary"), record.get("version")
    if not isinstance(binary, str) or not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        return f"binary {binary!r} is not an executable file"
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        return f"version {version!r} is not a QEMU version"
    for name in ("package", "data_dir", "library_path"):
        if not isinstance(record.get(name), str | None):
            return f"{name} {record[name]!r} is not text"
    return None


def _unpack(root: apt.AptRoot, packages: list[apt.Package], scratch: Path, final: Path) -> None:
    """Unpack ``packages`` into ``scratch``, which becomes ``final``: paths are recorded as there."""
    downloads = scratch / "debs"
    for package in packages:
        deb = root.download(package, downloads)
        _checked(["dpkg-deb", "-x", str(deb), str(scratch)], f"unpacking {deb.name}")
    shutil.rmtree(downloads)
    binary = scratch / BINARY
    libraries: list[Path] = []
    missing = _missing_libraries([str(binary)])
    if missing:
        libraries = _unpack_libraries(packages[0], missing, scratch / LIBRARIES)
        missing = _missing_libraries([*_with_libraries(libraries), str(binary)])
    if missing:
        raise KvmlabError(
            f"{packages[0].name} {packages[0].version} needs libraries neither this host nor Debian "
            f"{' or '.join(LIBRARY_SUITES)} provides: {', '.join(missing)} "
            "(apt-get install qemu-system-x86 brings most of them)"
        )
    record = Emulator(
        binary=str(final / BINARY),
        version=probe_version(*_with_libraries(libraries), str(binary)),
        package=f"{packages[0].name} {packages[0].version}",
        data_dir=str(final / DATA),
        library_path=":".join(str(final / d.relative_to(scratch)) for d in libraries) or None,
    )
    (scratch / RECORD).write_text(json.dumps(record.to_json(), indent=2) + "\n")


def _with_libraries(libraries: list[Path]) -> list[str]:
    return ["env", f"LD_LIBRARY_PATH={':'.join(map(str, libraries))}"] if libraries else []


def _unpack_libraries(qemu: apt.Package, missing: list[str], into: Path) -> list[Path]:
    """Unpack the packages of ``missing`` libraries that ``qemu`` depends on into ``into``;
    the library directories they filled. A library no dependency names, or that no suite
    of ``LIBRARY_SUITES`` has, is left missing, for the caller to refuse."""
    fields = apt.AptRoot(qemu.suite).show(qemu.name) or {}
    depends = set(apt.depends_names(fields.get("Depends", "")))
    names = [name for name in map(library_package, missing) if name in depends]
    downloads = into / "debs"
    for name in names:
        try:
            package = apt.find_package(name, LIBRARY_SUITES)
        except UnknownSpec:
            continue
        deb = apt.AptRoot(package.suite).download(package, downloads)
        _checked(["dpkg-deb", "-x", str(deb), str(into)], f"unpacking {deb.name}")
    shutil.rmtree(downloads, ignore_errors=True)
    dirs = [into / "usr/lib/x86_64-linux-gnu", into / "lib/x86_64-linux-gnu"]
    return [d for d in dirs if d.is_dir()]


def library_package(soname: str) -> str | None:
    """The Debian package that ships a shared library, by Debian's naming rule (policy
    8.1): ``libcapstone.so.4`` → libcapstone4, ``libfuse3.so.3`` → libfuse3-3 (a name
    ending in a digit takes a hyphen)."""
    match = re.fullmatch(r"(lib[A-Za-z0-9_+.-]+?)\.so\.([0-9][0-9.]*)", soname)
    if match is None:
        return None
    name, version = match.group(1).lower().replace("_", "-"), match.group(2)
    return f"{name}-{version}" if name[-1].isdigit() else f"{name}{version}"


def _missing_libraries(command: list[str]) -> list[str]:
    """The libraries ``command`` (a binary, perhaps after ``env VAR=...``) cannot find."""
    *prefix, binary = command
    done = subprocess.run([*prefix, "ldd", binary], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if "not found" in line]


def probe_version(*command: str) -> str:
    """QEMU's version from ``BINARY --version`` (``QEMU emulator version 10.0.2 (...)``);
    ``command`` is the binary, perhaps after ``env VAR=...``."""
    binary = command[-1]
    done = _checked([*command, "--version"], f"{binary} --version")
    match = re.search(rf"version ({VERSION.pattern})", done.stdout)
    if match is None:
        raise KvmlabError(f"{binary} --version printed no QEMU version: {done.stdout.strip()[:200]!r}")
    return match.group(1)


def _checked(argv: list[str], what: str) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as err:
        raise MissingTool(f"{what}: {err.strerror}") from None
    if done.returncode != 0:
        raise KvmlabError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return done
