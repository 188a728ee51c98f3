"""Templates on plain data: what keys one, and what ``load`` trusts (no VM: files written by hand
as ``template.save`` writes them). tests/vm/test_template.py restores real ones."""

import json
import os
import time
from pathlib import Path

import pytest

from kvmlab.errors import KvmlabError
from kvmlab.kernels.model import Kernel
from kvmlab.vm import boot, image, template
from kvmlab.vm.accel import Accel
from kvmlab.vm.clock import Clock
from kvmlab.vm.emulator import Emulator


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))


def settings(tmp_path: Path, **changes) -> boot.Settings:
    vmlinuz = tmp_path / "vmlinuz"
    if not vmlinuz.exists():
        vmlinuz.write_bytes(b"kernel")
    kernel = Kernel(spec="debian:bookworm", pinned="debian:linux-image-6.1", release="6.1.0-50-cloud-amd64",
                    vmlinuz=vmlinuz, config=None, system_map=None, modules_root=None)
    fields = dict(kernel=kernel, accel=Accel("tcg", "EPYC,+svm", "test"),
                  emulator=Emulator("/usr/bin/qemu-system-x86_64", "10.0.2"), clock=Clock("icount", "test"),
                  cpus=1, memory_mb=1, append="kvm.tdp_mmu=0", env={"PYTHONHASHSEED": "0"},
                  recipe=image.recipe(), modules=["kvm_amd"], panic_driver=None)
    return boot.Settings(**{**fields, **changes})


def saved(key: dict, ram_bytes: int | None = None, state: bytes = b"state") -> Path:
    """A template directory for ``key`` as ``template.save`` leaves it."""
    directory = template.directory_for(key)
    directory.mkdir(parents=True)
    with open(directory / template.RAM, "wb") as ram:
        ram.truncate(key["memory_mb"] << 20 if ram_bytes is None else ram_bytes)
    (directory / template.STATE).write_bytes(state)
    record = {"inputs": key, "boot": "20261207-120000-abcdef", "ready_s": 11.2, "state_bytes": len(state)}
    (directory / template.RECORD).write_text(json.dumps(record))
    return directory


def test_everything_that_shapes_the_guest_makes_another_template(tmp_path):
    base = template.inputs(settings(tmp_path), "qualify-base-round0")
    assert template.directory_for(base) == template.directory_for(dict(base))
    others = [
        template.inputs(settings(tmp_path), "qualify-base-round1"),
        template.inputs(settings(tmp_path), "qualify-patched-round0"),
        template.inputs(settings(tmp_path, cpus=2), "qualify-base-round0"),
        template.inputs(settings(tmp_path, memory_mb=2), "qualify-base-round0"),
        template.inputs(settings(tmp_path, append=""), "qualify-base-round0"),
        template.inputs(settings(tmp_path, clock=Clock("wall", "test")), "qualify-base-round0"),
        template.inputs(settings(tmp_path, emulator=Emulator("/usr/bin/qemu-system-x86_64", "9.2.0")),
                        "qualify-base-round0"),
        template.inputs(settings(tmp_path), "qualify-base-round0", {"trace.json": "{}"}),
    ]
    names = {template.directory_for(key).name for key in others}
    assert len(names) == len(others) and template.directory_for(base).name not in names
    (tmp_path / "vmlinuz").write_bytes(b"a rebuilt kernel")  # the same path, other contents
    assert template.inputs(settings(tmp_path), "qualify-base-round0")["vmlinuz"] != base["vmlinuz"]


def test_a_template_is_named_for_its_kernel_and_role(tmp_path):
    key = template.inputs(settings(tmp_path), "qualify base/round 0")
    name = template.directory_for(key).name
    assert name.startswith("6.1.0-50-cloud-amd64-qualify-base-round-0-") and "/" not in name


def test_load_trusts_a_whole_template_and_says_what_is_wrong_with_another(tmp_path):
    key = template.inputs(settings(tmp_path), "run")
    assert template.load(template.directory_for(key), key) == (None, None)  # none yet: no complaint
    directory = saved(key)
    found, problem = template.load(directory, key)
    assert problem is None and found.boot == "20261207-120000-abcdef" and found.boot_s == 11.2
    assert found.describe() == {"template": directory.name, "template_boot": "20261207-120000-abcdef",
                                "template_boot_s": 11.2}

    other = {**key, "append": "kvm.tdp_mmu=1"}
    assert template.load(directory, other) == (None, "is stale (made with another append)")

    (directory / template.STATE).write_bytes(b"stat")
    assert template.load(directory, key)[1] == "is damaged (state holds 4 bytes, 5 expected)"
    (directory / template.STATE).unlink()
    assert template.load(directory, key)[1] == "is damaged (state is missing)"
    (directory / template.RECORD).write_text("[1, 2")
    assert template.load(directory, key)[1].startswith("is damaged (template.json: ")
    (directory / template.RECORD).write_text("[]")
    assert template.load(directory, key)[1] == "is damaged (template.json is not a template record)"


def test_a_memory_file_cut_short_is_damage(tmp_path):
    key = template.inputs(settings(tmp_path), "run")
    directory = saved(key, ram_bytes=4096)
    assert template.load(directory, key) == (None, f"is damaged (ram holds 4096 bytes, {1 << 20} expected)")


def test_unusable_names_a_changed_or_removed_kernel(tmp_path):
    key = template.inputs(settings(tmp_path), "run")
    directory = saved(key)
    assert template.unusable(directory) is None
    os.utime(tmp_path / "vmlinuz", (1, 1))
    assert template.unusable(directory) == f"stale (its kernel {tmp_path / 'vmlinuz'} has changed)"
    (tmp_path / "vmlinuz").unlink()
    assert template.unusable(directory) == f"stale (its kernel {tmp_path / 'vmlinuz'} is gone)"
    (directory / template.RECORD).write_text("{")
    assert template.unusable(directory) == "damaged (no readable template.json)"


def test_live_memory_goes_to_disk_when_tmpfs_has_no_room(tmp_path, monkeypatch):
    directory = template.area() / "6.1-run-0123"
    assert template.live_ram(directory, 1).parent == template.LIVE_RAM
    monkeypatch.setattr(template, "LIVE_RAM", tmp_path / "no-such-tmpfs")
    assert template.live_ram(directory, 1).parent == template.area()


def test_rebuilt_kvm_modules_make_another_template(tmp_path):
    """A local tree or kvm-modules: rebuilt under the same spec, its KVM modules change."""
    root = tmp_path / "root"
    kvm = root / "lib/modules/6.1.0-50-cloud-amd64/kernel/arch/x86/kvm"
    kvm.mkdir(parents=True)
    (kvm / "kvm.ko").write_bytes(b"kvm")
    (kvm / "kvm-amd.ko").write_bytes(b"kvm-amd")
    base = settings(tmp_path)
    kernel = Kernel(**{**base.kernel.__dict__, "modules_root": root})
    before = template.inputs(settings(tmp_path, kernel=kernel), "run")
    assert len(before["kvm_modules"]) == 2
    (kvm / "kvm.ko").write_bytes(b"kvm, patched")
    after = template.inputs(settings(tmp_path, kernel=kernel), "run")
    assert template.directory_for(after) != template.directory_for(before)


def test_a_restore_waits_for_qmp_to_listen_not_for_its_socket_file(tmp_path):
    """QEMU binds its QMP socket a moment before it listens; a connection in between is
    refused. A restore waits for the greeting, trying again while it is refused."""
    import socket
    import subprocess
    import sys
    import threading
    import time

    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))  # the file exists; nothing listens yet
    greeted = []

    def listen_later():
        time.sleep(0.3)
        server.listen(1)
        connection, _ = server.accept()
        greeted.append(time.monotonic())
        connection.sendall(b'{"QMP": {"version": {}}}\n')
        connection.close()

    thread = threading.Thread(target=listen_later)
    thread.start()
    qemu = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        template._await_socket(path, qemu, timeout_s=10)
        assert greeted and time.monotonic() >= greeted[0]
    finally:
        qemu.kill()
        thread.join()
        server.close()


def test_a_template_of_older_guest_code_goes_when_its_replacement_is_saved(tmp_path, monkeypatch):
    """The same role and inputs but for the guest code or the template format, unused for
    an hour: superseded. Another role, other inputs, or one used a minute ago: kept."""
    monkeypatch.setenv("KVMLAB_CACHE", str(tmp_path / "cache"))
    new = template.inputs(settings(tmp_path), "qualify-base-round0")
    old = saved({**new, "guest_code": "0" * 16})
    old_format = saved({**new, "format": template.FORMAT - 1})
    recent = saved({**new, "guest_code": "1" * 16})
    other_role = saved({**template.inputs(settings(tmp_path), "qualify-base-round1"), "guest_code": "0" * 16})
    other_inputs = saved({**template.inputs(settings(tmp_path, cpus=2), "qualify-base-round0"),
                          "guest_code": "0" * 16})
    current = saved(new)
    hour_ago = time.time() - 2 * 3600
    for directory in (old, old_format, other_role, other_inputs, current):
        os.utime(directory / template.RECORD, (hour_ago, hour_ago))
    (recent / template.USED).touch()
    os.utime(recent / template.RECORD, (hour_ago, hour_ago))
    assert sorted(template.superseded(new)) == sorted([old, old_format])


def stored_template(name: str, disk_bytes: int, used_s_ago: float) -> Path:
    """A template directory whose memory takes ``disk_bytes`` on disk, last loaded ``used_s_ago``."""
    directory = template.area() / name
    directory.mkdir()
    (directory / template.RAM).write_bytes(os.urandom(disk_bytes))
    (directory / template.USED).touch()
    when = time.time() - used_s_ago
    os.utime(directory / template.USED, (when, when))
    return directory


def test_templates_over_budget_go_least_recently_used_first(tmp_path):
    """Four templates of 1 MiB, budget 2.5 MiB: the two used longest ago go, oldest first;
    the one just made and one loaded within IN_USE_S stay even when that leaves more."""
    mib = 2**20
    oldest = stored_template("oldest", mib, 3 * 3600)
    old = stored_template("old", mib, 2 * 3600)
    recent = stored_template("recent", mib, 3600)
    made = stored_template("made", mib, 0)
    doomed = [one.directory for one in template.over_budget(made, int(2.5 * mib))]
    assert doomed == [oldest, old]
    assert template.over_budget(made, 4 * mib + 64 * 1024) == []

    loading = stored_template("loading", mib, template.IN_USE_S / 2)
    doomed = [one.directory for one in template.over_budget(made, 0)]
    assert doomed == [oldest, old, recent] and loading not in doomed and made not in doomed


def test_loading_a_template_marks_it_used(tmp_path):
    """``over_budget`` spares a template a guest is about to map: ``load`` marks it."""
    key = template.inputs(settings(tmp_path), "run")
    directory = saved(key)
    week_ago = time.time() - 7 * 86400
    (directory / template.USED).touch()
    os.utime(directory / template.USED, (week_ago, week_ago))
    found, problem = template.load(directory, key)
    assert problem is None and found is not None
    assert time.time() - (directory / template.USED).stat().st_mtime < 60


@pytest.mark.parametrize("raw, expected", [("", 8 * 2**30), ("0", 0), ("1.5", 3 * 2**29), (" 2 ", 2**31)])
def test_the_templates_budget_comes_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(template.BUDGET_ENV, raw)
    assert template.budget_bytes() == expected


@pytest.mark.parametrize("raw", ["lots", "-1", "nan", "inf", "1e9"])
def test_a_budget_that_is_no_size_is_refused_in_one_line(monkeypatch, raw):
    monkeypatch.setenv(template.BUDGET_ENV, raw)
    with pytest.raises(KvmlabError, match=rf"^KVMLAB_TEMPLATES_GIB='{raw}' is not a size in GiB"):
        template.budget_bytes()
