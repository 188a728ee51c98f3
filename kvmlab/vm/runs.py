"""Run directories: one private (0700) directory per ``kvmlab run``.

A run directory keeps the console log, the job's streams, the QMP socket and
``run.json`` (what ran, QEMU's pid, how it ended). Kept VMs (``--keep``) are found
again through it by ``kvmlab stop`` and by drgn users who need the QMP socket.
"""

import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from kvmlab import cache
from kvmlab.errors import KvmlabError
from kvmlab.vm import qmp

SOCKET_PATH_MAX = 107


def new() -> Path:
    """Create a fresh private run directory under the cache's ``runs`` area."""
    name = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    path = cache.area("runs") / name
    path.mkdir(mode=0o700)
    if len(str(path / "control.sock")) > SOCKET_PATH_MAX:  # the longest socket name
        raise KvmlabError(f"run directory path too long for a UNIX socket: {path}")
    return path


def record(run_dir: Path, **fields) -> None:
    """Merge ``fields`` into the run's run.json, replacing it whole: a reader (``kvmlab
    stop``, gc) never sees half a file."""
    path = run_dir / "run.json"
    data = read(run_dir)
    data.update(fields)
    scratch = path.with_name(".run.json.tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(scratch, path)


def read(run_dir: Path) -> dict:
    """The run's run.json ({} before the run wrote one); a damaged one is a KvmlabError."""
    path = run_dir / "run.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise KvmlabError(f"{path} is damaged ({getattr(err, 'strerror', None) or err})") from None
    if not isinstance(data, dict):
        raise KvmlabError(f"{path} is damaged (a JSON object is expected, found {type(data).__name__})")
    return data


def is_pid(value) -> bool:
    """Whether a run.json's ``qemu_pid`` can name a process (JSON also allows true, -1, 1.5)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class KeptVm:
    run_dir: Path
    pid: int
    qmp: Path


def qemu_alive(run_dir: Path, pid: int) -> bool:
    """True if ``pid`` is still this run's QEMU (not a recycled pid, nor another program
    that merely names the run, such as ``tail -f RUN/console.log``)."""
    proc = Path(f"/proc/{pid}")
    try:
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    try:
        cwd: str | None = os.readlink(proc / "cwd")
    except OSError:  # another user's process: its relative paths cannot be placed
        cwd = None
    return is_qemu_of(run_dir, [os.fsdecode(arg) for arg in cmdline.split(b"\0")[:-1]], cwd)


def is_qemu_of(run_dir: Path, argv: list[str], cwd: str | None) -> bool:
    """Whether ``argv``, run in ``cwd``, is a QEMU command line of this run: its program is
    a qemu-system binary and one of its arguments names a file of the run directory, as
    ``qemu.command`` writes them (``-pidfile RUN/qemu.pid``, ``-qmp unix:RUN/qmp.sock,...``,
    ``-chardev file,...,path=RUN/console.log``)."""
    if not argv or not os.path.basename(argv[0]).startswith("qemu-system"):
        return False
    run = os.path.abspath(run_dir)
    named = (_placed(path, cwd) for arg in argv[1:] for path in _paths_in(arg))
    return any(path is not None and os.path.dirname(path) == run for path in named)


def _paths_in(arg: str) -> list[str]:
    """The paths a QEMU argument may name: itself, and each of its comma-separated
    options' values, less a ``unix:`` prefix; only what has a directory part."""
    options = [part.partition("=")[2] or part for part in arg.split(",")]
    candidates = [arg, *(option.removeprefix("unix:") for option in options)]
    return [path for path in candidates if "/" in path]


def _placed(path: str, cwd: str | None) -> str | None:
    """``path`` made absolute from the directory QEMU runs in (None: that is unknown)."""
    if os.path.isabs(path):
        return os.path.normpath(path)
    return None if cwd is None else os.path.normpath(os.path.join(cwd, path))


def kept() -> list[KeptVm]:
    """Every run whose VM was kept and is still running. A run whose run.json is damaged
    cannot be told apart from a finished one and is passed over, so it never stands in
    the way of stopping the others."""
    vms = []
    for run_dir in sorted(cache.area("runs").iterdir()):
        try:
            info = read(run_dir)
        except KvmlabError:
            continue
        pid = info.get("qemu_pid")
        if info.get("state") == "kept" and is_pid(pid) and qemu_alive(run_dir, pid):
            vms.append(KeptVm(run_dir, pid, run_dir / "qmp.sock"))
    return vms


def resolve(name: str) -> Path:
    """A run directory from its name or path (an empty name names none: not the current directory)."""
    if not name:
        raise KvmlabError(f"no kvmlab run {name!r} (see {cache.area('runs')})")
    path = Path(name)
    if not path.is_dir():
        path = cache.area("runs") / name
    if not (path / "run.json").exists():
        raise KvmlabError(f"no kvmlab run {name!r} (see {cache.area('runs')})")
    return path


def stop(vm: KeptVm, grace_s: float = 5.0) -> None:
    """End a kept VM: QMP ``quit`` first, SIGKILL if QEMU does not go in ``grace_s``."""
    try:
        qmp.execute(vm.qmp, "quit")
    except KvmlabError:
        pass  # a monitor that does not answer is handled below, by SIGKILL
    deadline = time.monotonic() + grace_s
    while qemu_alive(vm.run_dir, vm.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if qemu_alive(vm.run_dir, vm.pid):
        os.kill(vm.pid, signal.SIGKILL)
    record(vm.run_dir, state="stopped")


# -- who started a run -------------------------------------------------------------------
QUALIFY = "qualify"
"""The run.json field naming the ``kvmlab qualify`` process a guest works for (``owner``)."""


def owner(output: Path) -> dict:
    """This process, as a guest's run.json names the qualification it works for: its pid,
    its start time (so that a recycled pid is told apart) and its output directory."""
    return {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()), "output": str(output)}


def owner_alive(label) -> bool:
    """Whether the process a run.json's ``owner`` label names is still running."""
    if not isinstance(label, dict) or not is_pid(label.get("pid")):
        return False
    return _start_ticks(label["pid"]) == label.get("start_ticks")


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, the start time in clock ticks since boot (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # the name before it may hold spaces
