"""Bad input ends in one clear line and exit code 2, never a traceback."""

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
