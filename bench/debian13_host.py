"""A host kvmlab was not written on: `make setup` and `make demo` in a Debian 13 (trixie) root.

kvmlab is developed on Debian 12. This checks that a fresh clone also sets itself up
and boots its two demo kernels where the distribution brings trixie's newer Python,
QEMU and mmdebstrap. It makes a trixie root with mmdebstrap (variant apt, plus make,
python3, python3-venv and ca-certificates: just what ``make setup`` needs to start), so
``make setup`` itself installs the system packages with apt-get as root. Into it go a
clean ``git clone`` of the checkout (uncommitted files stay out), the host's mounts of
/proc, /sys and /dev (with /dev/kvm where there is one), and the host's way of reaching
the package registries: its apt mirror and Valid-Until policy, its pip configuration
(files, ``PIP_*`` variables and the local indexes they name, read-only) and its extra
CA certificates. Then, as root in a chroot, with the root's ``~/.cache/kvmlab`` empty
so kernels, the guest image and kvmlab's QEMU are fetched there:

1. ``make setup``  2. ``make demo``

Prints each step's wall time and exit code, the versions seen (Debian, python3, the
distribution's QEMU, kvmlab's QEMU, mmdebstrap) and the tail of a failed step's output;
exits 1 if a step failed. Mounts are undone on every way out, and any process still
running in the root is ended first, and the root is deleted unless ``--keep``. Needs
root on the host and mmdebstrap; takes about 2.5 minutes on 2 cores.

    python3 bench/debian13_host.py [--work DIR] [--root DIR] [--keep] [--carry PATH]...
        [--suite trixie] [--mirror URL] [--json FILE]
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/var/tmp/kvmlab-debian13")
#: What ``make setup`` needs before it can install the rest itself.
BASE_PACKAGES = ("make", "python3", "python3-venv", "ca-certificates")
CHECKOUT = "/root/kvmlab"
STEPS = ("setup", "demo")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A step's output lines shown when it failed.
TAIL = 25


@dataclass
class Step:
    name: str
    command: str
    exit_code: int | None = None
    seconds: float = 0.0
    log: str = ""


@dataclass
class Report:
    root: str
    base_seconds: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(step.exit_code == 0 for step in self.steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=WORK, help=f"where the root and logs go ({WORK})")
    parser.add_argument("--root", type=Path,
                        help="use this existing root as it is (no mmdebstrap; its cache is emptied)")
    parser.add_argument("--keep", action="store_true", help="keep the root afterwards (it is deleted)")
    parser.add_argument("--carry", action="append", default=[], metavar="PATH",
                        help="copy this file of the working tree (changed or new) into the clone: to try a "
                             "fix before it is committed (repeatable)")
    parser.add_argument("--suite", default="trixie")
    parser.add_argument("--mirror", default="http://deb.debian.org/debian")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("debian13_host: needs root (mmdebstrap, mount and chroot)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.root or args.work / f"{args.suite}-root"
    report = Report(root=str(root))
    mounts: list[Path] = []
    try:
        if args.root is None:
            report.base_seconds = make_root(root, args.suite, args.mirror)
        prepare(root, args.carry)
        mount_all(root, mounts)
        report.versions.update(versions(root, ("debian", "python3")))
        for name in STEPS:
            step = run_step(root, name, args.work)
            report.steps.append(step)
            if step.exit_code != 0:
                break
        report.versions.update(versions(root, ("mmdebstrap", "qemu")))
        report.versions.update(kvmlab_qemu(report.steps))
    finally:
        end_processes(root)
        unmount(mounts)
        if not args.keep and args.root is None and not still_mounted(root):
            shutil.rmtree(root, ignore_errors=True)
    show(report)
    if args.json:
        args.json.write_text(json.dumps(asdict(report) | {"passed": report.passed}, indent=2) + "\n")
    return 0 if report.passed else 1


def make_root(root: Path, suite: str, mirror: str) -> float:
    """A fresh ``suite`` root with apt and what ``make setup`` needs to start; its seconds."""
    if root.exists():
        if still_mounted(root):
            sys.exit(f"debian13_host: {root} still has mounts from an earlier run; umount them first")
        shutil.rmtree(root)
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    command = ["mmdebstrap", "--quiet", "--mode=root", "--variant=apt", "--format=directory",
               f"--include={','.join(BASE_PACKAGES)}", *host_apt_options(),
               suite, str(root), f"deb [signed-by={keyring}] {mirror} {suite} main"]
    print(f"debian13_host: making the {suite} root with mmdebstrap in {root}", flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True)
    return time.monotonic() - started


def host_apt_options() -> list[str]:
    """The host's apt policy on expired Release files, for the root's apt as well: a host
    on a frozen mirror sets ``Acquire::Check-Valid-Until "false"`` (kvmlab carries the
    same into the roots it makes)."""
    done = subprocess.run(["apt-config", "shell", "VALID", "Acquire::Check-Valid-Until/b"],
                          capture_output=True, text=True, check=False)
    return ['--aptopt=Acquire::Check-Valid-Until "false"'] if "'false'" in done.stdout else []


def prepare(root: Path, carry: list[str]) -> None:
    """Name resolution, the host's CA certificates and pip configuration, a clean clone,
    and an empty kvmlab cache."""
    for name in ("resolv.conf", "hosts"):
        if Path("/etc", name).exists():
            shutil.copy(Path("/etc", name), root / "etc" / name)
    extra_cas = Path("/usr/local/share/ca-certificates")
    if extra_cas.is_dir() and any(extra_cas.iterdir()):
        shutil.copytree(extra_cas, root / extra_cas.relative_to("/"), dirs_exist_ok=True)
        subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, capture_output=True)
    for conf in pip_config_files():
        target = root / conf.resolve().relative_to("/")  # HOME is /root on both sides
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(conf, target)
    for path in filter(Path.is_file, pip_named_paths()):
        if not (root / path.relative_to("/")).exists():
            (root / path.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, root / path.relative_to("/"))
    checkout = root / CHECKOUT.lstrip("/")
    shutil.rmtree(checkout, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
    for name in carry:
        shutil.copy(REPO / name, checkout / name)
    shutil.rmtree(root / "root/.cache/kvmlab", ignore_errors=True)


def pip_config_files() -> list[Path]:
    """The pip configuration files the host's pip reads, global and the user's."""
    places = [Path("/etc/pip.conf"), Path("/etc/xdg/pip/pip.conf"), Path.home() / ".config/pip/pip.conf",
              Path.home() / ".pip/pip.conf"]
    if env := os.environ.get("PIP_CONFIG_FILE"):
        places.append(Path(env))
    return [p for p in places if p.is_file()]


def pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_")}


def pip_named_paths() -> list[Path]:
    """Local paths the host's pip configuration or environment names (find-links and
    file:// indexes, constraint files, its CA bundle): directories are bound read-only
    into the root at the same path, files the root lacks are copied there."""
    values = list(pip_env().values())
    for conf in pip_config_files():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(conf)
        values += [v for section in parser.sections() for v in parser[section].values()]
    paths = set()
    for word in " ".join(values).split():
        path = Path(word.removeprefix("file://"))
        if path.name == "simple":  # a PEP 503 index links to its files beside it (../../files/...)
            path = path.parent
        if path.is_absolute() and path.exists() and path.parts[1] not in ("proc", "sys", "dev"):
            paths.add(path)
    return sorted(paths)


def mount_all(root: Path, mounts: list[Path]) -> None:
    """/proc, /sys and /dev (with /dev/pts, /dev/shm and /dev/kvm) from the host, and the
    local pip indexes read-only; each mount point is added to ``mounts`` as it is made, so
    a failure half-way still leaves them all to undo."""

    def bind(source: Path, *options: str) -> None:
        target = root / source.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", *options, str(source), str(target)], check=True)
        mounts.append(target)

    bind(Path("/proc"), "--rbind")
    bind(Path("/sys"), "--rbind")
    bind(Path("/dev"), "--rbind")
    for target in mounts:
        subprocess.run(["mount", "--make-rslave", str(target)], check=True)
    for path in filter(Path.is_dir, pip_named_paths()):
        bind(path, "--bind", "-o", "ro")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(root / path.relative_to("/"))], check=True)


def unmount(mounts: list[Path]) -> None:
    """Lazily, innermost first: a mount still busy goes away once nothing uses it."""
    for target in reversed(mounts):
        subprocess.run(["umount", "-R", "-l", str(target)], check=False)


def still_mounted(root: Path) -> bool:
    inside = str(root.resolve()) + "/"
    return any(line.split()[4].startswith(inside) for line in Path("/proc/self/mountinfo").open())


def end_processes(root: Path) -> None:
    """End what a step left running in the root (a QEMU, say): they hold its mounts."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "root") == str(root.resolve()):
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def chroot(root: Path, script: str, **kwargs) -> subprocess.CompletedProcess:
    """``script`` run by bash as root in the root, with a clean environment plus the
    host's ``PIP_*`` variables."""
    env = {"HOME": "/root", "PATH": PATH, "LANG": "C.UTF-8", "TERM": "dumb", **pip_env()}
    return subprocess.run(["chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           "bash", "-c", script], text=True, check=False, **kwargs)


def run_step(root: Path, name: str, work: Path) -> Step:
    """``make NAME`` in the clone, timed, its output in WORK/NAME.log and on the terminal."""
    step = Step(name, f"make {name}", log=str(work / f"{name}.log"))
    print(f"debian13_host: make {name} ...", flush=True)
    started = time.monotonic()
    with open(step.log, "w") as log:
        done = chroot(root, f"cd {CHECKOUT} && make {name}", stdout=log, stderr=subprocess.STDOUT)
    step.seconds = time.monotonic() - started
    step.exit_code = done.returncode
    print(f"debian13_host: make {name}: exit {step.exit_code} after {step.seconds:.0f} s", flush=True)
    return step


def versions(root: Path, which: tuple[str, ...]) -> dict[str, str]:
    """What the root has of each, or "absent"."""
    probes = {
        "debian": "cat /etc/debian_version",
        "python3": "python3 --version",
        "mmdebstrap": "mmdebstrap --version",
        "qemu": "qemu-system-x86_64 --version | head -1; dpkg-query -W -f='${Version}' qemu-system-x86",
    }
    found = {}
    for name in which:
        done = chroot(root, probes[name], capture_output=True)
        text = " ".join(done.stdout.split())
        found[name if name != "qemu" else "distribution qemu"] = text if done.returncode == 0 and text \
            else "absent"
    return found


def kvmlab_qemu(steps: list[Step]) -> dict[str, str]:
    """The QEMU kvmlab ran the demo with, as its accelerator line names it."""
    for step in steps:
        text = Path(step.log).read_text(errors="replace") if Path(step.log).exists() else ""
        if match := re.search(r"(QEMU \d[\d.]* \([^)]*\))", text):
            return {"kvmlab qemu": match.group(1)}
    return {}


def show(report: Report) -> None:
    if report.base_seconds is not None:
        print(f"\nroot: mmdebstrap {report.base_seconds:.0f} s ({report.root})")
    for name, version in report.versions.items():
        print(f"{name}: {version}")
    for step in report.steps:
        print(f"{step.command}: exit {step.exit_code}, {step.seconds:.0f} s wall ({step.log})")
        if step.exit_code != 0:
            lines = Path(step.log).read_text(errors="replace").splitlines()[-TAIL:]
            print("\n".join(f"  | {line}" for line in lines))
    missing = [name for name in STEPS if name not in {s.name for s in report.steps}]
    if missing:
        print(f"not run: {', '.join(f'make {name}' for name in missing)}")
    print("PASS" if report.passed else "FAIL")


if __name__ == "__main__":
    sys.exit(main())
