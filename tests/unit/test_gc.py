"""``kvmlab gc`` on real run directories in a private cache (``$KVMLAB_CACHE``), with real
processes standing in for QEMU and for a running ``kvmlab qualify``."""

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab import cache
from kvmlab.cli.gc import size
from kvmlab.vm import gc, runs
from kvmlab.vm.session import AGENT

DAY = 86400.0
JOB = ["uname", "-r"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache; the user's ~/.cache/kvmlab is never looked at."""
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))
    return cache.area("runs")


@pytest.fixture
def processes():
    """Start real processes for a test; all are killed after it."""
    started: list[subprocess.Popen] = []

    def start(argv: list[str], executable: str | None = None) -> subprocess.Popen:
        process = subprocess.Popen(argv, executable=executable, stdin=subprocess.DEVNULL)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def make_run(when: float, argv=JOB, keep: bool = False, payload: int = 0) -> Path:
    """A run directory named for ``when``, with run.json as ``boot.start`` first writes it."""
    name = time.strftime("%Y%m%d-%H%M%S-", time.localtime(when)) + secrets.token_hex(3)
    path = cache.area("runs") / name
    path.mkdir(mode=0o700)
    runs.record(path, kernel="debian:bookworm", kernel_exact="debian:linux-image-6.1.0-50-cloud-amd64",
                release="6.1.0-50-cloud-amd64", argv=list(argv), keep=keep, state="preparing")
    (path / "console.log").write_bytes(os.urandom(payload))
    changed(path, when)
    return path


def booted(path: Path, pid: int, when: float, **ending) -> Path:
    """Record QEMU's start as ``boot.start`` does, then how the run ended (``ending``)."""
    runs.record(path, qemu_pid=pid, qmp=str(path / "qmp.sock"), debug_qmp=str(path / "drgn.sock"),
                state="running")
    if ending:
        runs.record(path, **ending)
    changed(path, when)
    return path


def finished(when: float, argv=JOB, payload: int = 0) -> Path:
    """A run whose QEMU came and went long ago."""
    path = make_run(when, argv, payload=payload)
    return booted(path, 999_999_999, when, state="ok", exit_code=0)


def changed(path: Path, when: float) -> None:
    os.utime(path / "run.json", (when, when))


def fake_qemu(start, run_dir: Path) -> int:
    """A real process standing in for the run's QEMU: its program is named qemu-system-x86_64
    and it names the run's QMP socket as QEMU's command line does (python sleeping, with
    that argv)."""
    process = start(qemu_argv(run_dir), executable=sys.executable)
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes().startswith(b"qemu-system"):
        assert time.monotonic() < deadline, "the stand-in QEMU never started"
        time.sleep(0.01)  # a command line reads empty for a moment after exec
    return process.pid


def qemu_argv(run_dir: Path) -> list[str]:
    """What /proc/PID/cmdline of a stand-in QEMU reads: QEMU's program name and socket argument,
    python's -c keeping it asleep."""
    return ["qemu-system-x86_64", "-c", "import time; time.sleep(600)",
            "-qmp", f"unix:{run_dir}/qmp.sock,server=on,wait=off"]


def reasons(plan: gc.Plan) -> dict[str, str | None]:
    """Run name → why it is kept (None: it would go)."""
    kept = {run.path.name: reason for run, reason in plan.kept}
    return {**kept, **{run.path.name: None for run in plan.removable}}


def test_gc_keeps_the_newest_and_removes_the_rest(private_cache):
    now = time.time()
    paths = [finished(now - age * DAY, payload=64 << 10) for age in (5, 4, 3, 2, 1)]
    freeing = sum(gc.disk_usage(path) for path in paths[:3])
    done = kvmlab("gc", "--keep", "2")
    assert done.returncode == 0, done.stderr
    assert [path.exists() for path in paths] == [False, False, False, True, True]
    assert freeing >= 3 * (64 << 10)
    assert done.stdout.splitlines() == [
        f"kvmlab gc: removed 3 of 5 run directories in {private_cache}, freed {size(freeing)}; "
        "kept 2 (2 newest)"
    ]


def test_default_keeps_the_newest_twenty():
    now = time.time()
    paths = [finished(now - minutes * 60) for minutes in range(22, 0, -1)]
    plan = gc.plan()
    assert sorted(run.path for run in plan.removable) == paths[:2]
    assert plan.reasons() == {gc.NEWEST: 20}


def test_kept_and_running_vms_survive_whatever_their_age(processes):
    long_ago = time.time() - 30 * DAY
    kept_vm = make_run(long_ago, keep=True)
    booted(kept_vm, fake_qemu(processes, kept_vm), long_ago, state="kept", exit_code=0)
    running = make_run(long_ago)
    booted(running, fake_qemu(processes, running), long_ago)
    gone = processes(["true"])
    gone.wait()
    kept_dead = booted(make_run(long_ago, keep=True), gone.pid, long_ago, state="kept", exit_code=0)
    unrelated = processes(["sleep", "600"])  # alive, but not this run's QEMU: a recycled pid
    recycled = booted(make_run(long_ago, keep=True), unrelated.pid, long_ago, state="kept", exit_code=0)
    watched = make_run(long_ago, keep=True)  # a recycled pid that names the run: not QEMU either
    tail = processes(["tail", "-f", str(watched / "console.log")])
    booted(watched, tail.pid, long_ago, state="kept", exit_code=0)

    plan = gc.plan(keep=0)
    assert reasons(plan) == {kept_vm.name: gc.KEPT_VM, running.name: gc.RUNNING,
                             kept_dead.name: None, recycled.name: None, watched.name: None}
    gc.remove(plan.removable)
    assert kept_vm.exists() and running.exists()
    assert not kept_dead.exists() and not recycled.exists() and not watched.exists()
    assert [vm.run_dir for vm in runs.kept()] == [kept_vm]


def test_boots_of_a_qualification_in_progress_survive(tmp_path, processes):
    others = gc.qualifying_since()  # a qualification someone else runs on this machine
    script = tmp_path / "bin" / "kvmlab"  # as the console script runs: python .../bin/kvmlab qualify
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(600)\n")
    processes([sys.executable, str(script), "qualify", "--base", "debian:bullseye",
               "--patched", "debian:bookworm", "-o", str(tmp_path / "out")])
    now = time.time()
    earlier = min(others or now, now) - DAY
    before = booted(make_run(earlier, AGENT), 999_999_999, earlier, state="finished")
    during = booted(make_run(now + 30, AGENT), 999_999_999, now + 30, state="finished")
    not_qualify = finished(now + 30)

    plan = gc.plan(keep=0)
    assert reasons(plan) == {before.name: None, during.name: gc.QUALIFYING, not_qualify.name: None}


@pytest.mark.parametrize("argv, qualifies", [
    (["/w/.venv/bin/python", "/w/.venv/bin/kvmlab", "qualify", "-o", "out"], True),
    (["python3", "-m", "kvmlab.cli", "qualify", "--resume", "-o", "out"], True),
    (["python3", "-m", "kvmlab.cli", "gc"], False),
    (["kvmlab", "run", "debian:bookworm", "--", "qualify"], False),
    (["make", "qualify"], False),
])
def test_which_processes_run_a_qualification(argv, qualifies):
    assert gc.runs_qualify(argv) is qualifies


def test_a_boot_still_preparing_survives_for_an_hour():
    now = time.time()
    preparing = make_run(now)
    stale = make_run(now - 2 * 3600)  # refused while preparing: it stays "preparing" for ever
    assert reasons(gc.plan(keep=0)) == {preparing.name: gc.BOOTING, stale.name: None}


def test_older_than_keeps_what_changed_recently():
    now = time.time()
    old = finished(now - 3 * DAY)
    stopped_lately = finished(now - 3 * DAY)  # e.g. a kept VM stopped an hour ago
    changed(stopped_lately, now - 3600)
    young = finished(now - 3600)
    plan = gc.plan(keep=0, older_than_s=DAY)
    assert reasons(plan) == {old.name: None, stopped_lately.name: gc.RECENT, young.name: gc.RECENT}


def test_dry_run_removes_nothing_and_lists_what_would_go():
    now = time.time()
    paths = [finished(now - age * DAY, payload=16 << 10) for age in (4, 3, 2, 1)]
    freeing = sum(gc.disk_usage(path) for path in paths[:3])
    done = kvmlab("gc", "--keep", "1", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert all(path.exists() for path in paths)
    *listed, summary = done.stdout.splitlines()
    assert [line.split()[2] for line in listed] == [path.name for path in reversed(paths[:3])]
    assert all(line.startswith("would remove ") for line in listed)
    assert summary.startswith("kvmlab gc: would remove 3 of 4 run directories")
    assert f"freeing {size(freeing)}; would keep 1 (1 newest)" in summary

    assert kvmlab("gc", "--keep", "1").returncode == 0
    assert [path.exists() for path in paths] == [False, False, False, True]


def test_damaged_run_json_is_kept_and_does_not_block_gc():
    long_ago = time.time() - 10 * DAY
    damaged = {}
    for damage, text in {"not JSON": '{"state": "runn', "a list": "[1, 2]",
                         "no state": '{"kernel": "debian:bookworm"}',
                         "pid not a number": '{"state": "kept", "argv": ["true"], "qemu_pid": "12x"}',
                         "no run.json": None}.items():
        path = make_run(long_ago)
        if text is None:
            (path / "run.json").unlink()
        else:
            (path / "run.json").write_text(text)
        damaged[damage] = path
    healthy = [finished(long_ago), finished(long_ago)]

    dry = kvmlab("gc", "--keep", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for path in damaged.values():
        assert any(line.startswith(f"keeping {path.name}: ") for line in dry.stdout.splitlines()), dry.stdout
    done = kvmlab("gc", "--keep", "0")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert all(path.exists() for path in damaged.values())
    assert not any(path.exists() for path in healthy)
    assert done.stdout.startswith("kvmlab gc: removed 2 of 7 run directories")
    assert done.stdout.rstrip().endswith("kept 5 (5 with a damaged run.json)")


@pytest.mark.parametrize("option, value", [
    ("--keep", "-1"), ("--keep", "many"), ("--keep", "²"), ("--keep", "9" * 5000), ("--keep", ""),
    ("--older-than", "-2"), ("--older-than", "nan"),
    ("--older-than", "soon"),
])
def test_bad_options_are_one_line_and_exit_2(option, value):
    old = finished(time.time() - 10 * DAY)
    done = kvmlab("gc", "--keep", "0", option, value)
    assert_one_line_error(done, option, repr(value))
    assert old.exists()
