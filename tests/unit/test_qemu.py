from dataclasses import replace
from pathlib import Path

from kvmlab_guest import protocol

from kvmlab.vm.accel import Accel
from kvmlab.vm.clock import Clock
from kvmlab.vm.emulator import Emulator
from kvmlab.vm.qemu import PORT_FILES, Machine, command


def machine(tmp_path: Path, clock: str = "wall") -> Machine:
    data = tmp_path / "share"
    data.mkdir(exist_ok=True)
    (data / "qboot.rom").write_bytes(b"")
    return Machine(
        vmlinuz=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.cpio", run_dir=tmp_path,
        accel=Accel("tcg", "EPYC,+svm", "test"), emulator=Emulator("/x/qemu", "10.0.2", "p", str(data)),
        clock=Clock(clock, "test"), cpus=3, memory_mb=1234, append="nokaslr",
    )


def test_command_runs_the_chosen_emulator_with_its_firmware_and_clock(tmp_path):
    wall = command(machine(tmp_path))
    assert wall[0] == "/x/qemu" and "-icount" not in wall
    assert option_values(wall, "-L") == [str(tmp_path / "share")]
    assert option_values(wall, "-bios") == [str(tmp_path / "share" / "qboot.rom")]
    icount = command(machine(tmp_path, "icount"))
    assert option_values(icount, "-icount") == ["shift=0,sleep=off"]
    assert option_values(icount, "-seed") == ["1"] and "-seed" not in wall


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == option]


def test_command_carries_the_guest_contract(tmp_path):
    argv = command(machine(tmp_path))
    assert option_values(argv, "-accel") == ["tcg"]
    assert option_values(argv, "-cpu") == ["EPYC,+svm"]
    assert option_values(argv, "-smp") == ["3"] and option_values(argv, "-m") == ["1234M"]
    assert "vmcoreinfo" in option_values(argv, "-device")
    assert option_values(argv, "-qmp") == [f"unix:{tmp_path / name},server=on,wait=off"
                                           for name in ("qmp.sock", "drgn.sock")]
    assert "-no-reboot" in argv
    (append,) = option_values(argv, "-append")
    assert {"panic=-1", "oops=panic", f"rdinit={protocol.INIT}", "nokaslr"} <= set(append.split())


def test_qemu_connects_the_control_port_to_kvmlab(tmp_path):
    """The control port is open from the moment its device exists: QEMU is the client."""
    argv = command(machine(tmp_path))
    (control,) = [chardev for chardev in option_values(argv, "-chardev") if chardev.startswith("socket,")]
    assert control == f"socket,id=control,path={tmp_path / 'control.sock'},server=off"
    assert f"chardev=control,name={protocol.PORT_CONTROL}" in " ".join(option_values(argv, "-device"))


def test_kicks_are_handled_as_made_and_the_mailbox_is_shared_only_while_a_template_boots(tmp_path):
    """ioeventfd=off: the guest's virtio kicks are not left to QEMU's main loop. The mailbox
    is shared (and so left out of the saved state) where the guest's RAM is."""
    argv = command(machine(tmp_path))
    assert "virtio-serial-pci,id=vser,ioeventfd=off" in option_values(argv, "-device")
    assert "ivshmem-plain,memdev=mailbox,master=on" in option_values(argv, "-device")
    for shared, share in ((True, "share=on"), (False, "share=off")):
        objects = option_values(command(replace(machine(tmp_path), ram_shared=shared)), "-object")
        (box,) = [spec for spec in objects if spec.startswith("memory-backend-file,id=mailbox,")]
        assert box.endswith(share) and f"mem-path={tmp_path / 'mailbox'}" in box


def test_every_port_is_a_named_virtserialport_writing_a_file(tmp_path):
    argv = command(machine(tmp_path))
    devices = " ".join(option_values(argv, "-device"))
    chardevs = " ".join(option_values(argv, "-chardev"))
    for port, filename in PORT_FILES.items():
        assert f"name={port}" in devices
        assert f"path={tmp_path / filename}" in chardevs


def test_command_gives_an_emulator_its_own_libraries(tmp_path):
    """A QEMU that brought libraries the host lacks starts through ``env``, which execs it:
    the process is still QEMU (runs.is_qemu_of reads its own command line)."""
    base = machine(tmp_path)
    bundled = Emulator("/x/qemu", "10.0.2", "p", base.emulator.data_dir, library_path="/x/libs")
    argv = command(replace(base, emulator=bundled))
    assert argv[:3] == ["env", "LD_LIBRARY_PATH=/x/libs", "/x/qemu"]
