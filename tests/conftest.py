"""Shared fixtures: the kvmlab command as a user runs it, and a QEMU process census."""

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def kvmlab(*args: str, env: dict[str, str] | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the installed ``kvmlab`` CLI exactly as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "kvmlab.cli", *args], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=timeout, check=False,
    )


def assert_one_line_error(done, *fragments: str) -> None:
    """kvmlab refused in one line (exit 2, no traceback) naming every fragment."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("kvmlab: error:")]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def hung(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 124


#: How nested TCG fails an L2 vCPU (docs/known-problems.md): a triple fault, or a vCPU
#: that stayed in KVM_RUN without doing its part until kselftest_py stopped it.
L2_FAILURES = re.compile(
    r"unexpected exit KVM_EXIT_SHUTDOWN|guest did not (sync|exit) within [0-9.]+ s; its vCPU")


def l2_failed(done: subprocess.CompletedProcess) -> bool:
    """A job that failed on one of nested TCG's L2 faces. Exit 0 counts too (``sh -c "a; b"``
    has b's code while a's results fail the test); an invariant violation (123) never does."""
    return done.returncode in (0, 1) and bool(L2_FAILURES.search(done.stdout))


def emulator_failed(done: subprocess.CompletedProcess) -> bool:
    """A hung guest, or an L2 face of nested TCG's trouble."""
    return hung(done) or l2_failed(done)


def kvmlab_retrying(*args: str, retry_if=hung, attempts: int = 3,
                    timeout: float = 900) -> subprocess.CompletedProcess:
    """``kvmlab(*args)``, run again (with a warning) while ``retry_if`` says the emulator
    failed it (default: a hung guest).

    Nested KVM under multi-threaded TCG occasionally wedges the L1 guest (see the
    docs/known-problems.md): the whole kernel freezes, an L2 vCPU never exits, or an IPI
    is never answered. It is the emulator, not the code under test, and it hits
    upstream's C selftests too; a failure on the last attempt still fails the test.
    """
    import warnings

    for attempt in range(1, attempts + 1):
        done = kvmlab(*args, timeout=timeout)
        if not retry_if(done) or attempt == attempts:
            return done
        warnings.warn(f"nested TCG failed the run (attempt {attempt}, exit {done.returncode}), retrying: "
                      f"kvmlab {' '.join(args)}", stacklevel=2)
    raise AssertionError("unreachable")


def qemu_pids() -> set[int]:
    """Every running qemu-system process on this machine."""
    done = subprocess.run(["pgrep", "-f", "qemu-system-x86_64"], capture_output=True, text=True)
    return {int(pid) for pid in done.stdout.split()}


def qemu_pids_of_runs(run_names: set[str]) -> set[int]:
    """The running QEMU processes that belong to the named kvmlab runs."""
    pids = set()
    for pid in qemu_pids():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(name in cmdline for name in run_names):
            pids.add(pid)
    return pids


@pytest.fixture
def no_leaked_qemu():
    """Fail the test if a run it started leaves its QEMU behind (other runs are not ours)."""
    from kvmlab import cache

    runs = cache.area("runs")
    before = {p.name for p in runs.iterdir()}
    yield
    mine = {p.name for p in runs.iterdir()} - before
    leaked = qemu_pids_of_runs(mine)
    assert not leaked, f"QEMU processes left behind: {sorted(leaked)}"


def built_tree(dest: Path, kernel, config: str | None = None) -> Path:
    """A kernel tree laid out as after `make` (bzImage, .config, kernel.release), from a
    real kernel's files; ``config`` replaces its .config text."""
    import shutil

    (dest / "arch/x86/boot").mkdir(parents=True)
    (dest / "include/config").mkdir(parents=True)
    shutil.copy(kernel.vmlinuz, dest / "arch/x86/boot/bzImage")
    (dest / "include/config/kernel.release").write_text(kernel.release + "\n")
    (dest / ".config").write_text(config if config is not None else kernel.config.read_text())
    return dest


VM_TESTS = Path(__file__).resolve().parent / "vm"


def pytest_collection_modifyitems(config, items):
    """A VM test is known by where it lives: everything under tests/vm/ is marked ``vm``,
    and a ``vm`` mark anywhere else is a mistake."""
    for item in items:
        inside = VM_TESTS in Path(item.fspath).resolve().parents
        if inside:
            item.add_marker(pytest.mark.vm)
        elif item.get_closest_marker("vm") is not None:
            raise pytest.UsageError(f"{item.nodeid} is marked vm but lives outside tests/vm/")


@contextlib.contextmanager
def mounted_tmpfs(mount_point: Path, size: str):
    """A tmpfs of ``size`` (mount's ``4m``, ``1g``) at ``mount_point``, made here and
    unmounted afterwards: a real small file system to fill. Skips where none can be mounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                              capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no mount(8) on this host")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # busy: detach it all the same
