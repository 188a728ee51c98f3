"""Templates: a guest booted once to its agent, paused and saved, then restored in place of a boot.

A TCG boot costs ~10–25 s of one host core; a restore costs a fraction of a second.
A template is made by booting the guest with its RAM in a file (``memory-backend-file``,
``share=on``) on tmpfs, waiting for the agent's ``agent-ready`` (KVM modules loaded,
/dev/kvm there, no L2 VM yet), pausing it and migrating its device state to a file with
the ``x-ignore-shared`` capability, which leaves the RAM out of the stream: the RAM file
already is the memory. Both files then move into the cache. A restore maps the RAM file
``share=off`` (copy-on-write: any number of guests share one template's pages) and
loads the device state with ``-incoming defer`` and ``migrate-incoming``. Under icount
the instruction counter is part of that state, so a restored guest goes on counting
from where its template stopped: two restores of one template run the same work to
the same nanosecond, or within 0.05 % (docs/benchmarks.md).

A template is keyed by everything that shapes the saved guest (``inputs``): the
kernel, the image, the guest code, QEMU, accelerator, CPU model, clock, vCPUs,
memory, kernel arguments, the agent's environment, and a ``role``, which keeps apart
guests that must be distinct boots (a qualification's rounds, and its two sides).
What a template cannot be trusted for is said in one line by ``load``, and the
caller boots afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlab import cache
from kvmlab.errors import KvmlabError
from kvmlab.vm import boot, layer, qmp

FORMAT = 3
"""2: QEMU connects the control port as it starts and handles the guest's kicks as it
makes them, the guest has a mailbox for its first request (``qemu.command``), and its
random numbers come from ``-seed`` under icount (``clock.ICOUNT_ARGS``). 3: the guest is
saved where its agent paused it (``kvmlab_guest.hold``), not where the host's ``stop``
found it."""
RECORD = "template.json"
RAM = "ram"
STATE = "state"
USED = "used"
"""Touched at every restore: ``kvmlab gc`` prunes templates by when they were last used."""
LIVE_RAM = Path("/dev/shm")
"""Where a template's memory lives while it boots (tmpfs: the guest's writes stay in memory)."""
MIGRATE_TIMEOUT_S = 120.0
CAPABILITIES = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


class RestoreFailed(KvmlabError):
    """A template could not be saved or restored; the guest boots afresh."""


@dataclass(frozen=True)
class Template:
    directory: Path
    record: dict

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def ram(self) -> Path:
        return self.directory / RAM

    @property
    def state(self) -> Path:
        return self.directory / STATE

    @property
    def boot(self) -> str:
        """The run directory of the boot the template was saved from."""
        return self.record["boot"]

    @property
    def boot_s(self) -> float:
        """That boot's time, QEMU start to agent ready."""
        return self.record["ready_s"]

    def describe(self) -> dict:
        """What a restored guest's run.json and a qualification's run records say of it."""
        return {"template": self.name, "template_boot": self.boot, "template_boot_s": self.boot_s}


def area() -> Path:
    return cache.area("templates")


def inputs(settings: boot.Settings, role: str, files: dict[str, str] | None = None) -> dict:
    """Everything that shapes a saved guest's state, as its key (``files``: the small files
    its layer carries, ``boot.RunOptions.files``)."""
    kernel = settings.kernel
    return {
        "format": FORMAT, "role": role, "kernel": kernel.pinned, "release": kernel.release,
        "vmlinuz": _identity(kernel.vmlinuz), "kvm_modules": _kvm_modules(kernel),
        "image": settings.recipe.key, "guest_code": layer.code_digest(),
        "qemu": settings.emulator.to_json(), "accel": settings.accel.name, "cpu": settings.accel.cpu,
        "clock": settings.clock.name, "cpus": settings.cpus, "memory_mb": settings.memory_mb,
        "append": settings.append, "env": settings.env, "modules": settings.modules, "files": files or {},
    }


def directory_for(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    role = "".join(c if c.isalnum() or c in "-_." else "-" for c in key["role"])
    return area() / f"{key['release']}-{role}-{digest}"


def load(directory: Path, key: dict) -> tuple[Template | None, str | None]:
    """The template in ``directory`` (None if there is none), or what is wrong with it."""
    if not directory.exists():
        return None, None
    try:
        record = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError) as err:
        return None, f"is damaged ({RECORD}: {getattr(err, 'strerror', None) or err})"
    if not isinstance(record, dict) or not isinstance(record.get("inputs"), dict):
        return None, f"is damaged ({RECORD} is not a template record)"
    if record["inputs"] != key:
        changed = sorted(k for k in set(key) | set(record["inputs"]) if key.get(k) != record["inputs"].get(k))
        return None, f"is stale (made with another {', '.join(changed)})"
    template = Template(directory, record)
    for path, size in ((template.ram, key["memory_mb"] << 20), (template.state, record.get("state_bytes"))):
        try:
            found = path.stat().st_size
        except OSError:
            return None, f"is damaged ({path.name} is missing)"
        if found != size:
            return None, f"is damaged ({path.name} holds {found} bytes, {size} expected)"
    (directory / USED).touch()  # before its guest maps the memory: ``over_budget`` spares it
    return template, None


def discard(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


#: A template unused this long whose guest code a newer one of the same role replaced
#: goes when that one is saved (``superseded``).
SUPERSEDED_IDLE_S = 3600.0


def _lasting(key: dict) -> dict:
    """``key`` without what a newer kvmlab changes: the guest code and the template format."""
    return {name: value for name, value in key.items() if name not in ("guest_code", "format")}


def superseded(key: dict, idle_s: float = SUPERSEDED_IDLE_S) -> list[Path]:
    """The templates that ``key``'s replaces: the same role and inputs but for the guest
    code or the template format, unused for ``idle_s``. Every change to kselftest_py or
    the agent makes new templates; without this a day of work on them left 49 GB of old
    ones (about 0.4 GB each) until ``kvmlab gc``'s 14 days."""
    found = []
    now = time.time()
    for directory in area().glob(f"{key['release']}-*"):
        try:
            record = json.loads((directory / RECORD).read_text())
            other = record["inputs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not isinstance(other, dict) or other == key or _lasting(other) != _lasting(key):
            continue
        try:
            last_used = max(path.stat().st_mtime for path in (directory / USED, directory / RECORD)
                            if path.exists())
        except (OSError, ValueError):
            continue
        if now - last_used >= idle_s:
            found.append(directory)
    return found


# -- what the templates take on disk ------------------------------------------------------
BUDGET_ENV = "KVMLAB_TEMPLATES_GIB"
BUDGET_GIB = 8.0
"""What the templates may take on disk together (about 20 of a 4 GiB guest) before the
least recently used go as a new one is saved. Unbounded, one ``make test`` left ~55
templates (~0.4 GB each) and ran a CI machine's disk full."""
IN_USE_S = 300.0
"""A template loaded this recently is never removed for room: its guest may be about to
map its memory (a guest that has mapped it keeps it, as a removed file, until it ends)."""


@dataclass(frozen=True)
class Stored:
    """A template directory as the cache holds it, for pruning."""

    directory: Path
    last_used: float
    disk_bytes: int


def stored() -> list[Stored]:
    """Every template directory in the cache, least recently used first."""
    found = []
    for entry in os.scandir(area()):
        if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
            continue  # a template being made, or a lock
        directory = Path(entry.path)
        try:
            used = (directory / USED).stat().st_mtime
        except OSError:
            used = entry.stat(follow_symlinks=False).st_mtime
        found.append(Stored(directory, used, cache.disk_usage(directory)))
    return sorted(found, key=lambda one: one.last_used)


def budget_bytes() -> int:
    """The templates' budget: ``$KVMLAB_TEMPLATES_GIB`` GiB (0: keep only the newest), else
    ``BUDGET_GIB``."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return int(BUDGET_GIB * 2**30)
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not 0 <= gib < 2**20:
        raise KvmlabError(f"{BUDGET_ENV}={raw!r} is not a size in GiB (a number from 0)")
    return int(gib * 2**30)


def over_budget(made: Path, budget: int) -> list[Stored]:
    """The templates to remove, least recently used first, until all of them take at most
    ``budget`` bytes; never ``made`` nor one loaded within ``IN_USE_S``, so the
    templates may stay over budget while those alone exceed it."""
    now = time.time()
    everything = stored()
    total = sum(one.disk_bytes for one in everything)
    doomed = []
    for one in everything:
        if total <= budget:
            break
        if one.directory != made and now - one.last_used >= IN_USE_S:
            doomed.append(one)
            total -= one.disk_bytes
    return doomed


def live_ram(directory: Path, memory_mb: int) -> Path:
    """The file a template's memory is booted in before it moves to ``directory``: on
    tmpfs where it has room for the whole memory (a guest writing past a full tmpfs would
    take QEMU down with SIGBUS), else beside the template on disk."""
    name = f"kvmlab-{directory.name}-{os.getpid()}.ram"
    try:
        roomy = shutil.disk_usage(LIVE_RAM).free > (memory_mb << 20)
    except OSError:
        roomy = False
    return LIVE_RAM / name if roomy else directory.parent / f".{name}"


def save(booted: boot.Booted, directory: Path, key: dict, ready_s: float) -> Template:
    """Pause the guest of ``booted`` (booted with its RAM in ``live_ram``), save its device
    state, end its QEMU and publish both files as the template in ``directory``."""
    socket = booted.machine.qmp_socket
    started = time.monotonic()
    with cache.building(directory) as scratch:
        try:
            qmp.execute(socket, "stop")
            qmp.execute(socket, "migrate-set-capabilities", CAPABILITIES)
            qmp.execute(socket, "migrate", {"uri": f"file:{scratch / STATE}"})
            _wait_migration(socket, booted.process)
            qmp.execute(socket, "quit")
            booted.process.wait(timeout=30)
        except (KvmlabError, subprocess.TimeoutExpired) as err:
            raise RestoreFailed(f"saving the template failed: {err}") from None
        ram = booted.machine.ram_file
        _sparse_move(ram, scratch / RAM)
        record = {
            "inputs": key, "boot": booted.run_dir.name, "ready_s": round(ready_s, 3),
            "save_s": round(time.monotonic() - started, 3), "created": time.time(),
            "state_bytes": (scratch / STATE).stat().st_size,
        }
        (scratch / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        (scratch / USED).touch()
    return Template(directory, record)


def incoming(socket: Path, process: subprocess.Popen, template: Template) -> None:
    """Load ``template``'s device state into a QEMU started with ``-incoming defer``; it
    stays paused (it was saved paused)."""
    try:
        _await_socket(socket, process)
        qmp.execute(socket, "migrate-set-capabilities", CAPABILITIES)
        qmp.execute(socket, "migrate-incoming", {"uri": f"file:{template.state}"})
        _wait_migration(socket, process)
    except KvmlabError as err:
        raise RestoreFailed(f"restoring template {template.name} failed: {err}") from None


def _wait_migration(socket: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + MIGRATE_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise KvmlabError(f"QEMU ended during the migration (exit {process.returncode})")
        status = qmp.execute(socket, "query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise KvmlabError(f"the migration {status}")
        if time.monotonic() > deadline:
            raise KvmlabError(f"the migration did not finish within {MIGRATE_TIMEOUT_S:g} s")
        time.sleep(0.02)


def _await_socket(socket: Path, process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Wait until QEMU greets on ``socket``. The file appears when QEMU binds it, a moment
    before it listens: a connection then is refused (one restore in about twelve, while
    the host was busy), so a refused connection is tried again until the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise KvmlabError(f"QEMU ended before it listened on {socket.name} (exit {process.returncode})")
        try:
            qmp.await_greeting(socket, max(deadline - time.monotonic(), 0.01), "restore")
            return
        except KvmlabError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _sparse_move(source: Path, target: Path) -> None:
    """Move the RAM file from tmpfs to the cache, keeping its never-touched pages as holes."""
    done = subprocess.run(["cp", "--sparse=always", str(source), str(target)],
                          capture_output=True, text=True, check=False)
    source.unlink(missing_ok=True)
    if done.returncode != 0:
        raise RestoreFailed(f"moving the template's memory failed: {done.stderr.strip()}")


def _kvm_modules(kernel) -> list[str]:
    """The KVM modules the guest loads, as files: a kernel rebuilt with other modules under
    the same spec (a local tree, kvm-modules) must not restore a guest holding the old ones."""
    if kernel.modules_root is None:
        return []
    kvm = kernel.modules_root / "lib" / "modules" / kernel.release / "kernel" / "arch" / "x86" / "kvm"
    return [_identity(path) for path in sorted(kvm.glob("kvm*.ko*"))] if kvm.is_dir() else []


def _identity(path: Path) -> str:
    """A file as far as a key needs it: its path, size and modification time."""
    stat = path.stat()
    return f"{path}:{stat.st_size}:{int(stat.st_mtime)}"


SCRATCH_STALE_S = 3600.0
"""A template's scratch directory this old belongs to a kvmlab that died saving it."""


def leftovers() -> list[Path]:
    """What a kvmlab killed while making a template leaves: the memory file it booted the
    template in (named for its pid, which is gone) and its half-written scratch directory."""
    found = []
    for directory in (LIVE_RAM, area()):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            name = entry.name.lstrip(".")
            if name.startswith("kvmlab-") and name.endswith(".ram"):
                pid = name.removesuffix(".ram").rsplit("-", 1)[-1]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    found.append(Path(entry.path))
            elif directory == area() and entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > SCRATCH_STALE_S:
                    found.append(Path(entry.path))
    return found


def unusable(directory: Path) -> str | None:
    """Why a stored template can never be restored again (None: it may be): no readable
    record, or its kernel file has changed or gone since it was saved."""
    try:
        record = json.loads((directory / RECORD).read_text())
        vmlinuz = record["inputs"]["vmlinuz"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"damaged (no readable {RECORD})"
    path = Path(str(vmlinuz).rsplit(":", 2)[0])
    try:
        current = _identity(path)
    except OSError:
        return f"stale (its kernel {path} is gone)"
    return None if current == vmlinuz else f"stale (its kernel {path} has changed)"
