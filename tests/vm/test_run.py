"""The lab for real: Debian kernels booted under QEMU, KVM used inside the guest."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import built_tree, kvmlab, kvmlab_retrying, qemu_pids

from kvmlab import kernels
from kvmlab.vm import qmp

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

EXPECTED = {
    "debian:bullseye": ("5.10.", 509),
    "debian:bookworm": ("6.1.", 32764),
}


@pytest.mark.parametrize("spec", EXPECTED)
def test_uname_in_guest(spec):
    done = kvmlab_retrying("run", spec, "--timeout", "300", "--", "uname", "-r")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(EXPECTED[spec][0])
    assert re.search(r"accelerator (tcg|kvm)", done.stderr)


def test_exit_code_output_and_results_come_back(tmp_path):
    script = 'echo to-stdout; echo to-stderr >&2; mkdir -p "$KVMLAB_RESULTS/sub"; ' \
             'echo payload > "$KVMLAB_RESULTS/sub/file.txt"; exit 7'
    done = kvmlab("run", "debian:bookworm", "--out", str(tmp_path), "--", "sh", "-c", script)
    assert done.returncode == 7
    assert "to-stdout" in done.stdout and "to-stdout" not in done.stderr
    assert "to-stderr" in done.stderr
    assert (tmp_path / "sub" / "file.txt").read_text() == "payload\n"


def test_missing_command_is_127():
    done = kvmlab("run", "debian:bookworm", "--", "no-such-command-here")
    assert done.returncode == 127
    assert "cannot run no-such-command-here" in done.stderr


@pytest.mark.parametrize("spec", EXPECTED)
def test_panic_is_reported_with_excerpt_and_keeps_settled_results(spec, tmp_path):
    """A result written well before the panic (two heartbeats) comes back; one written
    just before it cannot, and the host says which files it kept."""
    script = ('seq 1 50000 > "$KVMLAB_RESULTS/before.txt"; sleep 7; '
              'echo too-late > "$KVMLAB_RESULTS/after.txt"; echo c > /proc/sysrq-trigger')
    done = kvmlab("run", spec, "--timeout", "300", "--out", str(tmp_path), "--", "sh", "-c", script)
    assert done.returncode == 125, done.stderr
    assert "guest kernel reported a panic" in done.stderr
    assert "sysrq" in done.stderr
    assert (tmp_path / "before.txt").read_text() == "".join(f"{n}\n" for n in range(1, 50001))
    assert not (tmp_path / "after.txt").exists()
    assert "the job did not end: kept the 1 result files the guest had sent" in done.stderr


def test_hang_is_killed_after_timeout():
    done = kvmlab("run", "debian:bookworm", "--timeout", "20", "--", "sleep", "1000")
    assert done.returncode == 124, done.stderr
    assert "guest hang: no exit within the 20 s timeout" in done.stderr
    assert "console tail" in done.stderr


def test_keep_then_stop():
    done = kvmlab("run", "debian:bookworm", "--keep", "--", "true")
    assert done.returncode == 0, done.stderr
    socket = re.search(r"QMP socket (\S+)", done.stderr).group(1)
    run_name = re.search(r"kvmlab stop (\S+)\)", done.stderr).group(1)
    try:
        assert qmp.execute(Path(socket), "query-status")["status"] == "running"
        assert Path(socket).parent.stat().st_mode & 0o777 == 0o700
    finally:
        stopped = kvmlab("stop", run_name)
    assert stopped.returncode == 0 and f"stopped {run_name}" in stopped.stdout
    assert not [pid for pid in qemu_pids() if run_name in open(f"/proc/{pid}/cmdline").read()]


def test_local_tree_with_modules_in_tree(tmp_path):
    """A kernel tree laid out as after `make`: bzImage, .config, .ko files in place."""
    real = kernels.fetch("debian:bookworm")
    tree = built_tree(tmp_path / "linux", real)
    modules = real.modules_root / "lib/modules" / real.release
    shutil.copytree(modules / "kernel", tree, dirs_exist_ok=True)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        shutil.copy(modules / name, tree / name)
    done = kvmlab_retrying("run", f"local:{tree}", "--", "sh", "-c", "uname -r; lsmod")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == real.release
    assert "kvm_amd" in done.stdout


def test_debuginfo_fetch():
    done = kvmlab("kernel", "fetch", "--debuginfo", "--json", "debian:bullseye")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    sections = subprocess.run(["readelf", "-S", "-W", info["vmlinux"]], capture_output=True, text=True).stdout
    assert ".debug_info" in sections
    listing = kvmlab("kernel", "list").stdout.splitlines()
    line = next(ln for ln in listing if ln.startswith(info["release"]))
    column = listing[0].index("DEBUGINFO")
    assert line[column:].split()[0] == "yes" and "debian:bullseye" in line


def _start_sleeping_run() -> tuple[subprocess.Popen, int]:
    """Start `kvmlab run ... sleep 1000` and return it with its QEMU pid once booting."""
    import sys
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "kvmlab.cli", "run", "debian:bookworm", "--", "sleep", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = qemu_pids()
        mine = [pid for pid in new if _parent(pid) == process.pid]
        if mine:
            return process, mine[0]
        time.sleep(0.2)
    process.kill()
    raise AssertionError("kvmlab never started QEMU")


def _parent(pid: int) -> int | None:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_qemu_dies_with_an_interrupted_kvmlab(how):
    import signal
    import time

    process, qemu_pid = _start_sleeping_run()
    time.sleep(2)
    process.send_signal(getattr(signal, how))
    process.communicate(timeout=60)
    if how == "SIGINT":
        assert process.returncode == 130
    deadline = time.monotonic() + 10
    while qemu_pid in qemu_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pid not in qemu_pids()


def test_added_files_reach_the_guest(tmp_path):
    payload = tmp_path / "payload.sh"
    payload.write_text("#!/bin/sh\necho added-file-ran\n")
    payload.chmod(0o755)
    done = kvmlab("run", "debian:bookworm", "--add", str(payload), "--", "/opt/kvmlab/add/payload.sh")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "added-file-ran"
    missing = kvmlab("run", "debian:bookworm", "--add", str(tmp_path / "absent"), "--", "true")
    assert missing.returncode == 2 and "absent does not exist" in missing.stderr


@pytest.mark.parametrize("how", ["restored", "fresh-boot"])
def test_frozen_guest_is_a_hang_long_before_the_timeout(how):
    """A guest whose kernel stops (here: paused over QMP) sends no heartbeat: hang in ~stall time,
    whether it was restored or booted.

    The stall time counts from QEMU's start until the first heartbeat, so it must exceed
    the slowest boot seen here (13.4 s under load; 10 s once declared a boot a hang)."""
    import sys
    import time

    from kvmlab import cache

    runs = cache.area("runs")
    before = {p.name for p in runs.iterdir()}
    kvmlab("run", "debian:bookworm", "--", "true")  # its template exists: no boot to save one below
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmlab.cli", "run", "debian:bookworm", "--timeout", "600",
         "--stall-timeout", "20", *(["--fresh-boot"] if how == "fresh-boot" else []), "--", "sleep", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    run_dir = None
    while time.monotonic() < deadline and run_dir is None:
        for new in (p for p in runs.iterdir() if p.name not in before):
            info = (new / "run.json").read_text() if (new / "run.json").exists() else ""
            status = (new / "status.jsonl").read_text() if (new / "status.jsonl").exists() else ""
            if ('"ready"' in status) or ('"restored": true' in info and '"running"' in info and status):
                run_dir = new
        time.sleep(0.2)
    assert run_dir is not None, "guest never became ready"
    qmp.execute(run_dir / "qmp.sock", "stop")
    paused = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 124, stderr
    assert "stopped responding (no heartbeat for 20 s" in stderr
    assert time.monotonic() - paused < 60


def test_a_guest_silent_since_boot_is_a_hang():
    """The stall rule counts from QEMU's start until the first heartbeat: a boot that
    takes longer than --stall-timeout (here made shorter than any boot) is a hang."""
    done = kvmlab("run", "debian:bookworm", "--fresh-boot", "--stall-timeout", "1.5", "--", "true")
    assert done.returncode == 124, done.stderr
    assert "never finished booting" in done.stderr
