"""Debian's packaged kernels, fetched through a private apt configuration.

kvmlab never touches the system's apt sources or lists: each suite gets its own
sources.list, lists directory and package cache under the kvmlab cache, and apt
verifies the archive's signatures with Debian's keyring as usual. The mirror is the
one the system already uses for Debian (or ``$KVMLAB_DEBIAN_MIRROR``).
"""

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlab import cache
from kvmlab.errors import KvmlabError, MissingTool, UnknownSpec, shown

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
APT_SOURCES = [Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d")]
#: Suites searched, in order, for an exact package name.
KNOWN_SUITES = ("bookworm", "bullseye", "trixie", "bookworm-backports", "trixie-backports", "sid")
CLOUD_META = "linux-image-cloud-amd64"
LISTS_MAX_AGE_S = 24 * 3600


@dataclass(frozen=True)
class Package:
    """One binary package version as the signed archive describes it."""

    name: str
    version: str
    sha256: str
    size: int
    suite: str

    @property
    def key(self) -> str:
        """A cache key naming the package and its content."""
        return f"{self.name}_{self.version}_{self.sha256[:12]}"


def mirror() -> str:
    """The Debian mirror URI: ``$KVMLAB_DEBIAN_MIRROR`` or the system's own Debian source."""
    if env := os.environ.get("KVMLAB_DEBIAN_MIRROR"):
        return env.rstrip("/")
    for uri in _system_uris():
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    raise KvmlabError(
        "no Debian mirror found in /etc/apt sources; set KVMLAB_DEBIAN_MIRROR to one"
    )


def _system_uris() -> list[str]:
    """Every URI of the system's apt sources, one-line and deb822 styles alike."""
    files: list[Path] = []
    for place in APT_SOURCES:
        if place.is_dir():
            files += sorted(p for p in place.iterdir() if p.suffix in (".list", ".sources"))
        elif place.is_file():
            files.append(place)
    uris = []
    for path in files:
        uris += source_uris(path.read_text(errors="replace"), deb822=path.suffix == ".sources")
    return uris


def source_uris(text: str, deb822: bool) -> list[str]:
    """The URIs of apt source text, in the deb822 (.sources) or one-line (.list) style."""
    uris = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if deb822 and line.lower().startswith("uris:"):
            uris += line.split(":", 1)[1].split()
        elif not deb822 and line.startswith("deb "):
            uris += [w for w in line.split() if "://" in w][:1]
    return uris


class AptRoot:
    """A private apt configuration serving exactly one suite of the Debian mirror."""

    def __init__(self, suite: str):
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,63}", suite):
            raise UnknownSpec(f"not a Debian suite name: {shown(suite)}")
        self.suite = suite
        self.dir = cache.area("apt") / suite
        self._stamp = self.dir / "updated"
        self._memo = self.dir / "show.json"

    def _options(self) -> list[str]:
        d = self.dir
        return [
            f"-o=Dir::Etc::sourcelist={d / 'sources.list'}",
            f"-o=Dir::Etc::sourceparts={d / 'parts'}",
            f"-o=Dir::State::Lists={d / 'lists'}",
            f"-o=Dir::State::status={d / 'status'}",
            f"-o=Dir::Cache={d / 'cache'}",
            "-o=APT::Sandbox::User=root",
            "-o=APT::Architecture=amd64",
        ]

    def _prepare(self) -> None:
        for sub in ("parts", "lists/partial", "cache/archives/partial"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "status").touch()
        if not KEYRING.exists():
            raise MissingTool(f"{KEYRING} is missing: install debian-archive-keyring")
        line = f"deb [signed-by={KEYRING}] {mirror()} {self.suite} main\n"
        (self.dir / "sources.list").write_text(line)

    def _apt(self, tool: str, *args: str, cwd: Path | None = None) -> str:
        return self._run(tool, *args, cwd=cwd).stdout

    def _run(self, tool: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(
                [tool, "-q", *self._options(), *args],
                cwd=cwd, capture_output=True, text=True, check=False,
            )
        except FileNotFoundError:
            raise MissingTool(f"{tool} not found: kvmlab fetches Debian kernels with apt") from None
        if done.returncode != 0:
            errors = [ln for ln in done.stderr.splitlines() if ln.startswith(("E:", "W:"))]
            reason = errors[0] if errors else done.stderr.strip()[-300:]
            raise KvmlabError(f"{tool} {args[0]} ({self.suite}) failed: {reason}")
        return done

    def update(self, force: bool = False) -> None:
        """Refresh the suite's signed package lists if older than a day (or ``force``)."""
        with cache.locked(self.dir.with_suffix(".lock")):
            fresh = self._stamp.exists() and time.time() - self._stamp.stat().st_mtime < LISTS_MAX_AGE_S
            if fresh and not force:
                return
            self._prepare()
            try:
                done = self._run("apt-get", "update")
            except KvmlabError as err:
                if "Release" in str(err) or "does not have" in str(err):
                    raise UnknownSpec(
                        f"Debian suite {self.suite!r} is not served by {mirror()}"
                    ) from None
                raise
            self._memo.unlink(missing_ok=True)
            # apt-get exits 0 when it could not fetch: only a complete update counts as
            # fresh, so the next request asks the mirror again.
            failed = [ln for ln in done.stderr.splitlines() if ln.startswith("W: Failed to fetch")]
            if failed:
                raise KvmlabError(f"apt-get update ({self.suite}) could not fetch from {mirror()}: "
                                  f"{failed[0].removeprefix('W: Failed to fetch ').strip()}")
            self._stamp.touch()

    def show(self, name: str) -> dict[str, str] | None:
        """The candidate version's control fields for ``name``, or None if the suite lacks it.

        Answers are remembered until the lists are next refreshed: apt-cache takes
        ~0.5 s a call, which would be most of a warm ``kvmlab run``'s overhead.
        """
        self.update()
        memo = self._read_memo()
        if name not in memo:
            try:
                memo[name] = _control_fields(self._apt("apt-cache", "show", "--no-all-versions", name))
            except KvmlabError:
                return None
            cache.publish_file(self._memo, lambda tmp: tmp.write_text(json.dumps(memo)), replace=True)
        return memo[name]

    def _read_memo(self) -> dict[str, dict[str, str]]:
        """The remembered answers; a damaged memo, or a damaged answer in it, counts as
        absent: apt is asked again and the memo rewritten. It is only a cache of apt's
        answers, so nothing is lost, and the user has nothing to repair."""
        try:
            memo = json.loads(self._memo.read_text())
        except (OSError, ValueError):  # absent, unreadable, not UTF-8, not JSON
            return {}
        if not isinstance(memo, dict):
            return {}
        return {name: fields for name, fields in memo.items() if _sound_fields(fields)}

    def package(self, name: str) -> Package | None:
        fields = self.show(name)
        if not fields or "SHA256" not in fields:
            return None
        return Package(
            name=fields["Package"], version=fields["Version"], sha256=fields["SHA256"],
            size=int(fields.get("Size", 0)), suite=self.suite,
        )

    def download(self, package: Package, dest: Path) -> Path:
        """Download ``package`` into ``dest``; apt checks it against the signed lists."""
        dest.mkdir(parents=True, exist_ok=True)
        self._apt("apt-get", "download", f"{package.name}={package.version}", cwd=dest)
        debs = list(dest.glob(f"{package.name}_*.deb"))
        if len(debs) != 1:
            raise KvmlabError(f"apt-get download {package.name} left no single .deb in {dest}")
        return debs[0]


def host_policy_aptopts() -> list[str]:
    """mmdebstrap options that carry the host's apt policy on Release files past their
    Valid-Until into the roots kvmlab makes.

    mmdebstrap reads none of the host's apt configuration, while kvmlab's own apt calls
    do. A host whose mirror is a frozen snapshot sets ``Acquire::Check-Valid-Until
    "false"``, and there sid's Release expires while its packages are still served: the
    kernel is fetched, and its build root must be made from the same mirror alike.
    Signatures are checked either way.
    """
    try:
        done = subprocess.run(["apt-config", "shell", "VALID", "Acquire::Check-Valid-Until/b"],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return []
    if done.stdout.strip() == "VALID='false'":
        return ['--aptopt=Acquire::Check-Valid-Until "false"']
    return []


def _control_fields(text: str) -> dict[str, str]:
    """Parse the first stanza of Debian control text into a dict (continuations dropped)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t" or ":" not in line:
            continue
        key, value = line.split(":", 1)
        fields[key] = value.strip()
    return fields


def _sound_fields(fields: object) -> bool:
    """Whether a memo entry is control fields as ``_control_fields`` writes them, with what
    ``package`` reads from it: a name, a version and, if any, a whole-number size."""
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        return False
    size = fields.get("Size", "0")
    return "Package" in fields and "Version" in fields and size.isascii() and size.isdigit()


def depends_names(depends: str) -> list[str]:
    """Package names in a Depends field, first alternative of each, versions dropped."""
    return [part.split("|")[0].split("(")[0].strip() for part in depends.split(",") if part.strip()]


def pinned_depends(depends: str, version: str) -> list[str]:
    """The packages a Depends field requires at exactly ``version`` (``name (= version)``),
    leaving out alternatives (``a | b``): the parts of one build, not a choice of tools."""
    names = []
    for part in depends.split(","):
        if "|" in part:
            continue
        match = re.fullmatch(r"\s*([a-z0-9][a-z0-9+.-]*)\s*\(\s*=\s*([^)\s]+)\s*\)\s*", part)
        if match and match.group(2) == version:
            names.append(match.group(1))
    return names


def build_parts(package: Package) -> list[Package]:
    """``package`` and every package it depends on at its very version, transitively.

    Debian ships a 7.x kernel as a small ``linux-image-*`` that depends, each at its own
    version, on ``linux-binary-*`` (vmlinuz), ``linux-modules-*`` and ``linux-base-*``
    (config, System.map, module indexes); older kernels are one package with no such
    dependency. Following the pins, not names, finds the parts of whatever split comes next.
    """
    root = AptRoot(package.suite)
    parts, queue = {package.name: package}, [package]
    while queue:
        fields = root.show(queue.pop().name) or {}
        for name in pinned_depends(fields.get("Depends", ""), package.version):
            if name in parts:
                continue
            part = root.package(name)
            if part is None:
                raise KvmlabError(f"{package.name} depends on {name} (= {package.version}), "
                                  f"which Debian {package.suite} does not have")
            parts[name] = part
            queue.append(part)
    return list(parts.values())


def newest_cloud_kernel(suite: str) -> Package:
    """The image package that ``linux-image-cloud-amd64`` of ``suite`` points to."""
    root = AptRoot(suite)
    meta = root.show(CLOUD_META)
    if meta is None:
        raise UnknownSpec(f"Debian suite {suite!r} has no {CLOUD_META}")
    images = [n for n in depends_names(meta.get("Depends", "")) if n.startswith("linux-image-")]
    if not images:
        raise KvmlabError(f"{CLOUD_META} in {suite} depends on no linux-image package")
    package = root.package(images[0])
    if package is None:
        raise KvmlabError(f"{images[0]} (from {CLOUD_META} in {suite}) is not in {suite}")
    return package


def find_package(name: str, suites: tuple[str, ...] = KNOWN_SUITES) -> Package:
    """The named package from the first suite in ``suites`` that has it."""
    for suite in suites:
        package = AptRoot(suite).package(name)
        if package is not None:
            return package
    raise UnknownSpec(f"no Debian package {name!r} in {', '.join(suites)}")


def debuginfo_package(image: Package) -> Package:
    """The -dbg package with the DWARF of ``image``'s vmlinux and modules."""
    name = image.name.removesuffix("-unsigned") + "-dbg"
    package = AptRoot(image.suite).package(name)
    if package is None:
        raise KvmlabError(f"no debuginfo package {name} in Debian {image.suite}")
    return package
