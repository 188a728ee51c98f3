"""The vmcore plumbing without a guest: the panic line seen on a real console file as
QEMU writes it, the disk-room rule on a real small file system, and the QEMU devices."""

import subprocess
import time

import pytest
from conftest import mounted_tmpfs

from kvmlab.vm import accel, clock, emulator, lifecycle, qemu, vmcore


@pytest.fixture
def process():
    """A live process standing in for QEMU (the Liveness only asks whether it lives)."""
    sleeper = subprocess.Popen(["sleep", "60"])
    yield sleeper
    sleeper.kill()
    sleeper.wait()


def test_the_panic_line_is_seen_even_when_cut_between_two_reads(tmp_path, process):
    console = tmp_path / "console.log"
    liveness = lifecycle.Liveness(process, tmp_path, timeout_s=600, stall_s=0, started=time.monotonic())
    console.write_bytes(b"[    1.0] booting\n" * 1000 + b"[    9.9] Kernel pan")
    assert not liveness.over() and not liveness.status.panicked
    with open(console, "ab") as more:
        more.write(b"ic - not syncing: sysrq triggered crash\n")
    assert liveness.over() and liveness.status.panicked
    assert process.poll() is None  # over because of the panic, not because QEMU ended


def test_a_console_without_a_panic_keeps_the_run_going(tmp_path, process):
    (tmp_path / "console.log").write_bytes(b"Kernel panic - not sync\n" + b"x" * 100_000)
    liveness = lifecycle.Liveness(process, tmp_path, timeout_s=600, stall_s=0, started=time.monotonic())
    assert not liveness.over() and not liveness.status.panicked


@pytest.fixture
def small_fs(tmp_path):
    """A 64 MiB tmpfs: a real file system with too little room for a 4 GiB guest's dump."""
    with mounted_tmpfs(tmp_path / "small", "64m") as mount_point:
        yield mount_point


def test_no_room_for_the_dump_is_said_in_one_line(small_fs):
    problem = vmcore.room_problem(small_fs, 4096)
    assert problem is not None and "\n" not in problem
    assert "MiB free" in problem and "4096 MiB guest's dump may need up to 4352 MiB" in problem
    # The margin counts too: even a 1 MiB guest needs 257 MiB here.
    assert "1 MiB guest's dump may need up to 257 MiB" in vmcore.room_problem(small_fs, 1)


def test_room_enough_is_no_problem(tmp_path):
    with mounted_tmpfs(tmp_path / "big", "512m") as big:
        assert vmcore.room_problem(big, 128) is None
        assert vmcore.room_problem(big, 400) is not None


def test_a_skipped_dump_and_a_saved_one_say_what_they_are(tmp_path):
    skipped = vmcore.Dump(skipped="no room")
    assert skipped.to_json() == {"vmcore_skipped": "no room"} and skipped.describe() == "no vmcore: no room"
    saved = vmcore.Dump(tmp_path / "vmcore", 4096 * 2**20, 1.26, disk_bytes=3 * 2**20)
    assert saved.to_json()["vmcore_format"] == "elf" and saved.to_json()["vmcore_s"] == 1.26
    assert saved.describe().startswith(f"vmcore: {tmp_path / 'vmcore'} (4096 MiB, 3 MiB on disk, 1.3 s; "
                                       "kvmlab inspect")


def test_qemu_gets_the_pvpanic_device_that_pauses_at_a_panic(tmp_path):
    chosen = accel.choose("tcg")
    binary = emulator.choose()
    machine = qemu.Machine(vmlinuz=tmp_path / "vmlinuz", initrd=tmp_path / "initrd", run_dir=tmp_path,
                           accel=chosen, emulator=binary,
                           clock=clock.choose("icount", chosen, binary, clock.WALL))
    argv = qemu.command(machine)
    pairs = list(zip(argv, argv[1:], strict=False))
    assert ("-device", "pvpanic") in pairs and ("-action", "panic=pause") in pairs
    assert "-no-reboot" in argv  # a kernel without the driver still ends QEMU
