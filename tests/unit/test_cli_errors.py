"""Bad input ends in one clear line and exit code 2, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab import apt
from kvmlab.errors import KvmlabError


def test_unknown_scheme():
    done = kvmlab("run", "fedora:40", "--", "true")
    assert_one_line_error(done, "unknown kernel spec 'fedora:40'", "debian:<suite>")


def test_unknown_debian_suite():
    assert_one_line_error(kvmlab("kernel", "fetch", "debian:buster"), "buster", "not served")


def test_unknown_debian_package():
    done = kvmlab("kernel", "fetch", "debian:linux-image-0.0.0-0-cloud-amd64")
    assert_one_line_error(done, "no Debian package 'linux-image-0.0.0-0-cloud-amd64'")


def test_missing_debuginfo_package():
    image = apt.Package("linux-image-0.0.0-0-cloud-amd64", "0", "0" * 64, 0, "bookworm")
    with pytest.raises(KvmlabError, match="no debuginfo package linux-image-0.0.0-0-cloud-amd64-dbg"):
        apt.debuginfo_package(image)


def test_run_without_command():
    assert_one_line_error(kvmlab("run", "debian:bookworm"), "no command given")


def test_qemu_not_installed():
    done = kvmlab("run", "debian:bookworm", "--", "true", env={"KVMLAB_QEMU": "qemu-system-none"})
    assert_one_line_error(done, "qemu-system-none not found")


def test_unknown_local_tree(tmp_path):
    assert_one_line_error(kvmlab("run", f"local:{tmp_path}", "--", "true"), "not a built kernel tree")




def test_inspect_unknown_run():
    assert_one_line_error(kvmlab("inspect", "no-such-run"), "no kvmlab run 'no-such-run'")


def test_inspect_foreign_socket_needs_a_kernel(tmp_path):
    import socket

    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        assert_one_line_error(kvmlab("inspect", str(path)), "not in a kvmlab run directory", "--kernel")
    finally:
        server.close()


def test_check_interval_must_be_positive():
    done = kvmlab("run", "debian:bookworm", "--check-invariants-every", "0", "--", "true")
    assert_one_line_error(done, "--check-invariants-every wants a positive number")


def test_trace_report_on_a_truncated_trace(tmp_path):
    """A cut trace.dat: one line naming the file and the offset; --partial reports what came before."""
    import json
    import lzma

    sample = REPO / "traces/samples/bookworm-lookup-v6.dat.xz"
    data = lzma.decompress(sample.read_bytes())
    run = tmp_path / "run"
    run.mkdir()
    (run / "trace.dat").write_bytes(data[: len(data) - 50000])
    (run / "capture.json").write_text(json.dumps({"set": "memslot-lookup", "release": "6.1"}))
    assert_one_line_error(kvmlab("trace", "report", str(run), "-o", str(tmp_path / "out")),
                          f"{run / 'trace.dat'}: truncated at offset")
    done = kvmlab("trace", "report", str(run), "--partial", "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "truncated at offset" in done.stderr
    assert (tmp_path / "out" / "latency.csv").exists()


def test_trace_report_needs_a_traced_run(tmp_path):
    assert_one_line_error(kvmlab("trace", "report", str(tmp_path)), "no capture.json")


def test_unknown_probe_set():
    done = kvmlab("run", "debian:bookworm", "--trace", "no-such-set", "--", "true")
    assert_one_line_error(done, "no probe set 'no-such-set'", "memslot-lookup")


def test_malformed_probe_set(tmp_path):
    probe_set = tmp_path / "broken.toml"
    probe_set.write_text("functions = [\n")
    assert_one_line_error(kvmlab("run", "debian:bookworm", "--trace", str(probe_set), "--", "true"),
                          f"probe set {probe_set}")


def test_an_internal_error_has_its_own_exit_code_and_keeps_its_traceback(monkeypatch, capsys):
    """A bug in kvmlab exits 70, never 1: qualify's 1 means "regressed"."""
    from kvmlab import cli
    from kvmlab.kernels import debian

    def broken(damaged=None):
        return 1 / 0

    monkeypatch.setattr(debian, "cached", broken)
    assert cli.main(["kernel", "list"]) == 70
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("kvmlab: internal error: ZeroDivisionError: division by zero (a bug in kvmlab; ")
    saved = line.rsplit("traceback in ", 1)[1].rstrip(")")
    assert "ZeroDivisionError" in open(saved).read() and "broken" in open(saved).read()
    os.unlink(saved)


def test_a_damaged_cache_entry_is_named_and_the_others_still_listed(tmp_path):
    kernels = tmp_path / "kernels"
    (kernels / "damaged").mkdir(parents=True)
    (kernels / "damaged" / "kernel.json").write_text('{"release": ')
    (kernels / "partial").mkdir()
    (kernels / "partial" / "kernel.json").write_text('{"release": "6.1.0-50-cloud-amd64"}')
    (kernels / "good").mkdir()
    good = {"release": "6.1.0-50-cloud-amd64", "package": "linux-image-6.1.0-50-cloud-amd64",
            "version": "6.1.176-1"}
    (kernels / "good" / "kernel.json").write_text(json.dumps(good))
    done = kvmlab("kernel", "list", env={"KVMLAB_CACHE": str(tmp_path)})
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "6.1.0-50-cloud-amd64" in done.stdout and "6.1.176-1" in done.stdout
    warnings = done.stderr.splitlines()
    assert len(warnings) == 2 and all(w.startswith("kvmlab: warning: ") for w in warnings)
    assert any(f"{kernels / 'damaged' / 'kernel.json'} is damaged" in w for w in warnings)
    assert any("no package, version" in w and f"delete {kernels / 'partial'}" in w for w in warnings)


def test_a_damaged_run_json_blocks_neither_stop_nor_inspect_of_the_others(tmp_path):
    runs = tmp_path / "runs"
    damaged, alive = runs / "20261201-000000-aaaaaa", runs / "20261201-000001-bbbbbb"
    damaged.mkdir(parents=True)
    (damaged / "run.json").write_text("\0\0\0")
    alive.mkdir()
    qemu = subprocess.Popen(["qemu-system-x86_64", "-c", "import time; time.sleep(60)",
                             "-pidfile", str(alive / "qemu.pid")], executable=sys.executable)
    (alive / "run.json").write_text(json.dumps({"state": "kept", "qemu_pid": qemu.pid, "argv": ["true"]}))
    env = {"KVMLAB_CACHE": str(tmp_path)}
    try:
        assert_one_line_error(kvmlab("stop", damaged.name, env=env), f"{damaged / 'run.json'} is damaged")
        assert_one_line_error(kvmlab("inspect", damaged.name, env=env), f"{damaged / 'run.json'} is damaged")
        done = kvmlab("stop", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"stopped {alive.name} (pid {qemu.pid})"
        assert qemu.wait(timeout=10) is not None
        assert json.loads((alive / "run.json").read_text())["state"] == "stopped"
    finally:
        qemu.kill()
