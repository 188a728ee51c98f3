"""``kvmlab gc`` on real run directories in a private cache (``$KVMLAB_CACHE``), with real
processes standing in for QEMU and for a running ``kvmlab qualify``."""

import json
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
from kvmlab.vm import gc, runs, template
from kvmlab.vm.guest import AGENT

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


def reasons(plan: gc.Survey) -> dict[str, str | None]:
    """Run name → why it is kept (None: it would go)."""
    kept = {run.path.name: reason for run, reason in plan.kept}
    return {**kept, **{run.path.name: None for run in plan.removable}}


def test_gc_keeps_the_newest_and_removes_the_rest(private_cache):
    now = time.time()
    paths = [finished(now - age * DAY, payload=64 << 10) for age in (5, 4, 3, 2, 1)]
    freeing = sum(cache.disk_usage(path) for path in paths[:3])
    done = kvmlab("gc", "--keep", "2")
    assert done.returncode == 0, done.stderr
    assert [path.exists() for path in paths] == [False, False, False, True, True]
    assert freeing >= 3 * (64 << 10)
    assert done.stdout.splitlines() == [
        f"kvmlab gc: removed 3 of 5 run directories in {private_cache}, freed {size(freeing)}; "
        "kept 2 (2 newest)",
        f"kvmlab gc: removed 0 of 0 templates in {template.area()}, freeing 0 B; kept 0 (0 B on disk)",
    ]


def test_default_keeps_the_newest_twenty():
    now = time.time()
    paths = [finished(now - minutes * 60) for minutes in range(22, 0, -1)]
    plan = gc.survey()
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

    plan = gc.survey(keep=0)
    assert reasons(plan) == {kept_vm.name: gc.KEPT_VM, running.name: gc.RUNNING,
                             kept_dead.name: None, recycled.name: None, watched.name: None}
    gc.remove(plan.removable)
    assert kept_vm.exists() and running.exists()
    assert not kept_dead.exists() and not recycled.exists() and not watched.exists()
    assert [vm.run_dir for vm in runs.kept()] == [kept_vm]


def test_guests_of_a_qualification_in_progress_survive(tmp_path, processes):
    """A guest is a qualification's when its run.json names that process (pid and start
    time): kept while it runs, free to go once it ended or its pid was reused."""
    qualifying = processes([sys.executable, "-c", "import time; time.sleep(600)"])
    ended = processes([sys.executable, "-c", "pass"])
    ended.wait()
    now, label = time.time(), runs.owner(tmp_path / "out")
    alive = {**label, "pid": qualifying.pid, "start_ticks": runs._start_ticks(qualifying.pid)}
    recycled = {**alive, "start_ticks": alive["start_ticks"] - 1}  # the same pid, another process
    during = booted(make_run(now - DAY, AGENT), 999_999_999, now - DAY, state="finished", qualify=alive)
    after = booted(make_run(now - DAY, AGENT), 999_999_999, now - DAY, state="finished",
                   qualify={**label, "pid": ended.pid, "start_ticks": 1})
    reused = booted(make_run(now - DAY, AGENT), 999_999_999, now - DAY, state="finished", qualify=recycled)
    damaged = booted(make_run(now - DAY, AGENT), 999_999_999, now - DAY, state="finished", qualify="yes")
    not_qualify = finished(now - DAY)

    plan = gc.survey(keep=0)
    assert reasons(plan) == {during.name: gc.QUALIFYING, after.name: None, reused.name: None,
                             damaged.name: None, not_qualify.name: None}


def test_a_boot_still_preparing_survives_for_an_hour():
    now = time.time()
    preparing = make_run(now)
    stale = make_run(now - 2 * 3600)  # refused while preparing: it stays "preparing" for ever
    assert reasons(gc.survey(keep=0)) == {preparing.name: gc.BOOTING, stale.name: None}


def test_older_than_keeps_what_changed_recently():
    now = time.time()
    old = finished(now - 3 * DAY)
    stopped_lately = finished(now - 3 * DAY)  # e.g. a kept VM stopped an hour ago
    changed(stopped_lately, now - 3600)
    young = finished(now - 3600)
    plan = gc.survey(keep=0, older_than_s=DAY)
    assert reasons(plan) == {old.name: None, stopped_lately.name: gc.RECENT, young.name: gc.RECENT}


def test_dry_run_removes_nothing_and_lists_what_would_go():
    now = time.time()
    paths = [finished(now - age * DAY, payload=16 << 10) for age in (4, 3, 2, 1)]
    freeing = sum(cache.disk_usage(path) for path in paths[:3])
    done = kvmlab("gc", "--keep", "1", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert all(path.exists() for path in paths)
    *listed, summary, templates = done.stdout.splitlines()
    assert templates.startswith("kvmlab gc: would remove 0 of 0 templates")
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
    assert done.stdout.splitlines()[0].endswith("kept 5 (5 with a damaged run.json)")


@pytest.fixture
def immutable():
    """Make files immutable (chattr +i: root cannot remove them either); undone afterwards."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make {path} immutable here: {done.stderr.strip()}")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_a_directory_gc_cannot_remove_is_said_and_exits_2(immutable):
    """An I/O failure is exit 2 (the README's "a full or read-only disk"), never 1, which
    means a regression; the others still go, and the summary counts the failure."""
    now = time.time()
    stuck, gone = finished(now - 3 * DAY), finished(now - 2 * DAY)
    immutable(stuck / "console.log")
    done = kvmlab("gc", "--keep", "0")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    [said] = done.stderr.splitlines()
    assert said.startswith(f"kvmlab: gc: could not remove {stuck}: ") and "Operation not permitted" in said
    assert stuck.exists() and not gone.exists()
    assert done.stdout.splitlines()[0].endswith("; 1 could not be removed")


@pytest.mark.parametrize("option, value", [
    ("--keep", "-1"), ("--keep", "many"), ("--keep", "²"), ("--keep", "9" * 5000), ("--keep", ""),
    ("--older-than", "-2"), ("--older-than", "nan"),
    ("--older-than", "soon"),
])
def test_bad_options_are_one_line_and_exit_2(option, value):
    old = finished(time.time() - 10 * DAY)
    done = kvmlab("gc", "--keep", "0", option, value)
    assert_one_line_error(done, option, repr(value)[:60])  # a long value is cut short in the line
    assert old.exists()


def saved_template(name: str, vmlinuz: Path, used_days_ago: float, ram: int = 1 << 20) -> Path:
    """A template directory as ``template.save`` leaves it, its kernel file named as it is now."""
    directory = template.area() / name
    directory.mkdir()
    key = {"vmlinuz": template._identity(vmlinuz), "memory_mb": 1}
    (directory / template.RECORD).write_text(json.dumps({"inputs": key, "boot": "b", "ready_s": 1.0}))
    with open(directory / template.RAM, "wb") as ram_file:
        ram_file.write(os.urandom(ram))
    (directory / template.USED).touch()
    when = time.time() - used_days_ago * DAY
    os.utime(directory / template.USED, (when, when))
    return directory


def test_gc_prunes_templates_unused_for_long_or_whose_kernel_changed(tmp_path):
    kernel, other = tmp_path / "vmlinuz", tmp_path / "vmlinuz-other"
    kernel.write_bytes(b"kernel")
    other.write_bytes(b"kernel")
    recent = saved_template("recent", kernel, 1)
    idle = saved_template("idle", kernel, 30)
    changed_kernel = saved_template("changed", other, 1)
    other.write_bytes(b"rebuilt kernel")
    removed = tmp_path / "vmlinuz-removed"
    removed.write_bytes(b"kernel")
    gone_kernel = saved_template("gone", removed, 1)
    removed.unlink()
    damaged = saved_template("damaged", kernel, 1)
    (damaged / template.RECORD).write_text("{not json")

    dry = kvmlab("gc", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert all(path.exists() for path in (recent, idle, changed_kernel, gone_kernel, damaged))
    lines = [line for line in dry.stdout.splitlines() if line.startswith("would remove template")]
    assert sorted(line.split()[3] for line in lines) == ["changed", "damaged", "gone", "idle"]
    assert any("idle" in line and "unused for 30 days" in line for line in lines)
    assert any("changed" in line and "has changed" in line for line in lines)
    assert any("gone" in line and "is gone" in line for line in lines)

    done = kvmlab("gc")
    assert done.returncode == 0, done.stderr
    assert recent.exists() and not any(path.exists() for path in (idle, changed_kernel, gone_kernel, damaged))
    summary = done.stdout.splitlines()[-1]
    assert summary.startswith("kvmlab gc: removed 4 of 5 templates") and "kept 1 (1.0 MiB on disk)" in summary

    assert kvmlab("gc", "--templates-older-than", "0").returncode == 0
    assert not recent.exists()
    bad = kvmlab("gc", "--templates-older-than", "soon")
    assert_one_line_error(bad, "--templates-older-than wants a number of days")


def test_gc_removes_what_a_killed_kvmlab_left_while_saving_a_template(processes):
    """A template's memory file named for a pid that is gone, and a scratch directory
    older than an hour, go; those of a kvmlab still saving one stay."""
    ended = processes([sys.executable, "-c", "pass"])
    ended.wait()
    alive = processes([sys.executable, "-c", "import time; time.sleep(600)"])
    area = template.area()
    dead_ram = area / f".kvmlab-6.1-run-0123-{ended.pid}.ram"
    live_ram = area / f".kvmlab-6.1-run-0123-{alive.pid}.ram"
    for ram in (dead_ram, live_ram):
        ram.write_bytes(b"\1" * 8192)
    old_scratch, new_scratch = area / ".6.1-run-0123.abc", area / ".6.1-run-4567.def"
    for scratch in (old_scratch, new_scratch):
        scratch.mkdir()
        (scratch / "state").write_bytes(b"state")
    old = time.time() - 2 * 3600
    os.utime(old_scratch, (old, old))

    done = kvmlab("gc")
    assert done.returncode == 0, done.stderr
    assert not dead_ram.exists() and not old_scratch.exists()
    assert live_ram.exists() and new_scratch.exists()
    assert f"removing {dead_ram}: left by a kvmlab that died saving a template" in done.stdout
