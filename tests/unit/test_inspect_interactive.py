"""kvmlab inspect -i refused in one line before any shell starts (no VM, no debuginfo,
options it does not take), and the banner that lists its helpers."""

import socket
import threading

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab.inspect import interactive


@pytest.fixture
def greeting_qmp(tmp_path):
    """A UNIX socket that greets like QEMU's QMP, for as many clients as come."""
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn = server.accept()[0]
            except TimeoutError:
                continue
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join()
    server.close()


def test_nothing_to_attach_to_is_one_line(tmp_path):
    done = kvmlab("inspect", "-i", env={"KVMLAB_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(done, "no kept VM is running", "kvmlab run --keep")


def test_a_kernel_without_debuginfo_is_one_line_before_the_shell(tmp_path, greeting_qmp):
    """A built tree with no vmlinux: said after the socket answered, before drgn starts."""
    tree = tmp_path / "tree"
    (tree / "arch" / "x86" / "boot").mkdir(parents=True)
    (tree / "arch" / "x86" / "boot" / "bzImage").write_bytes(b"\0" * 512)
    (tree / "include" / "config").mkdir(parents=True)
    (tree / "include" / "config" / "kernel.release").write_text("6.1.0-test\n")
    done = kvmlab("inspect", "-i", str(greeting_qmp), "--kernel", f"local:{tree}",
                  env={"KVMLAB_CACHE": str(tmp_path / "cache")}, timeout=120)
    assert_one_line_error(done, "no vmlinux in", "so no debuginfo")


@pytest.mark.parametrize("extra", [["--check"], ["--json"], ["--pid", "1"]])
def test_options_of_the_one_shot_dump_are_refused(extra, tmp_path):
    done = kvmlab("inspect", "-i", *extra, env={"KVMLAB_CACHE": str(tmp_path / "cache")})
    assert_one_line_error(done, "--interactive takes no")


def test_the_banner_lists_every_helper_once_with_its_line():
    class Kernel:
        release = "6.1.0-50-cloud-amd64"

    class Where:
        name, kernel_spec, run_dir = "run-1", "debian:bookworm", None
        control_socket, debug_socket = "/x", "/y"

    class Inspector:
        kernel, where = Kernel(), Where()

    text = interactive.banner(interactive.Helpers(Inspector()))
    lines = text.splitlines()
    assert lines[0].startswith("kvmlab inspect: run-1, kernel 6.1.0-50-cloud-amd64 (debian:bookworm)")
    listed = [line.strip().split("(")[0] for line in lines[2:]]
    assert listed == list(interactive.Helpers.NAMES)
    assert "  lookup(gfn, vm=0, as_id=0): Find gfn's memslot as KVM does" in text
    for name in interactive.Helpers.NAMES:
        assert callable(getattr(interactive.Helpers, name))
