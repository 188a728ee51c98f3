"""Hostile input: every bad value, path or cache file below is refused in one line (exit 2)
before anything is fetched, booted, stopped or written, never a traceback or a hang.

Each test uses a private cache (``$KVMLAB_CACHE``). Where kvmlab runs in this process,
the steps that must not be reached (fetching a kernel, booting) are replaced by ones
that fail the test loudly."""

import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import assert_one_line_error, kvmlab

from kvmlab import apt, cli, kernels
from kvmlab.errors import KvmlabError
from kvmlab.inspect import attach
from kvmlab.kernels import debian
from kvmlab.vm import emulator, qmp, runner, runs
from kvmlab.vm.accel import Accel
from kvmlab.vm.clock import Clock
from kvmlab.vm.qemu import Machine, command

NO_USER = "~kvmlab-no-such-user"
RELEASE = "6.1.0-test"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, not yet created cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("KVMLAB_CACHE", str(path))
    return path


@pytest.fixture
def main(capsys, cache):
    """``kvmlab ARGS`` in this process: its exit code, stdout and stderr. main() takes
    SIGINT and SIGTERM over for Ctrl-C; they are given back afterwards."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def run(*args: str) -> SimpleNamespace:
        code = cli.main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    yield run
    for number, handler in saved.items():
        signal.signal(number, handler)


def unreachable(what: str):
    def step(*args, **kwargs):
        raise AssertionError(f"{what} was reached: the refusal did not come first")
    return step


@pytest.fixture
def nothing_boots(monkeypatch):
    """Fetching a kernel or booting one fails the test."""
    monkeypatch.setattr(kernels, "fetch", unreachable("kernels.fetch"))
    monkeypatch.setattr(runner, "run", unreachable("runner.run"))


def fake_tree(path: Path, release: bytes = RELEASE.encode(), module: bool = False) -> Path:
    """A kernel tree as ``local:`` reads it after ``make``: a bzImage (not a real one: nothing
    boots it here), kernel.release and, with ``module``, a built kvm.ko."""
    (path / "arch/x86/boot").mkdir(parents=True)
    (path / "arch/x86/boot/bzImage").write_bytes(b"not a kernel")
    (path / "include/config").mkdir(parents=True)
    (path / "include/config/kernel.release").write_bytes(release)
    if module:
        (path / "arch/x86/kvm").mkdir(parents=True)
        (path / "arch/x86/kvm/kvm.ko").write_bytes(b"not a module")
    return path


def symlink_loop(directory: Path) -> Path:
    """``loopA`` → ``loopB`` → ``loopA``."""
    (directory / "loopA").symlink_to(directory / "loopB")
    (directory / "loopB").symlink_to(directory / "loopA")
    return directory / "loopA"


def stand_in_qemu(run_dir: Path, seconds: int = 600) -> subprocess.Popen:
    """A real process whose command line reads as the run's QEMU: the program qemu-system-x86_64
    naming the run's QMP socket (python, sleeping)."""
    argv = ["qemu-system-x86_64", "-c", f"import time; time.sleep({seconds})",
            "-qmp", f"unix:{run_dir}/qmp.sock,server=on,wait=off"]
    process = subprocess.Popen(argv, executable=sys.executable, stdin=subprocess.DEVNULL)
    started(process.pid, b"qemu-system")
    return process


def started(pid: int, program: bytes) -> None:
    """Wait for ``pid``'s command line to show ``program``: it reads empty for a moment after exec."""
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(program):
        assert time.monotonic() < deadline, f"{program!r} never started"
        time.sleep(0.01)


def kept_run(cache: Path, name: str, pid: int, **fields) -> Path:
    """A run directory whose run.json says its VM was kept and QEMU is ``pid``."""
    run_dir = cache / "runs" / name
    run_dir.mkdir(parents=True)
    info = {"state": "kept", "argv": ["true"], "kernel": "debian:bookworm", "qemu_pid": pid,
            "qmp": str(run_dir / "qmp.sock"), "debug_qmp": str(run_dir / "drgn.sock"), **fields}
    (run_dir / "run.json").write_text(json.dumps({k: v for k, v in info.items() if v is not ...}))
    (run_dir / "console.log").write_text("")
    return run_dir


def alive(process: subprocess.Popen) -> bool:
    return process.poll() is None


# ------------------------------------------------------------------ 1. kvmlab run's options

@pytest.mark.parametrize("option, value, said", [
    ("--timeout", "nan", "--timeout wants a positive number of seconds"),
    ("--timeout", "-1", "--timeout wants a positive number of seconds"),
    ("--timeout", "inf", "--timeout wants a positive number of seconds"),
    ("--stall-timeout", "-5", "--stall-timeout wants a number of seconds"),
    ("--stall-timeout", "nan", "--stall-timeout wants a number of seconds"),
    ("--cpus", "0", "--cpus wants a positive number"),
    ("--memory", "-1", "--memory wants a positive size"),
    ("--check-invariants-every", "nan", "--check-invariants-every wants a positive number"),
    ("--check-invariants-every", "inf", "--check-invariants-every wants a positive number"),
    ("--trace-compression", "bogus", "--trace-compression wants one of zstd, zlib, any, none, got 'bogus'"),
    ("--out", "/etc/passwd", "--out /etc/passwd exists and is not a directory"),
])
def test_run_refuses_a_bad_option_before_fetching_anything(main, nothing_boots, cache, tmp_path,
                                                           option, value, said):
    tree = fake_tree(tmp_path / "tree")
    done = main("run", f"local:{tree}", option, value, "--", "true")
    assert_one_line_error(done, said)
    assert not cache.exists(), "a refused run wrote to the cache"


def test_run_refuses_an_out_it_could_not_create(main, nothing_boots, cache, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    done = main("run", "debian:bookworm", "--out", str(afile / "results"), "--", "true")
    assert_one_line_error(done, f"--out {afile / 'results'} cannot be created: {afile} is not a writable")
    loop = symlink_loop(tmp_path)
    assert_one_line_error(main("run", "debian:bookworm", "--out", str(loop), "--", "true"),
                          f"--out {loop} exists and is not a directory")
    assert not cache.exists()


def test_run_refuses_compression_of_a_version_6_trace(main, nothing_boots):
    done = main("run", "debian:bookworm", "--trace", "memslot-update", "--trace-file-version", "6",
                "--trace-compression", "zstd", "--", "true")
    assert_one_line_error(done, "--trace-compression needs --trace-file-version 7")


def test_run_refusal_as_typed_on_a_local_tree(tmp_path, cache):
    """The whole command line, as a user types it: nothing of the tree reaches the cache."""
    tree = fake_tree(tmp_path / "tree", module=True)
    env = {"KVMLAB_CACHE": str(cache), "KVMLAB_QEMU": "qemu-system-none"}  # and no QEMU could start
    assert_one_line_error(kvmlab("run", f"local:{tree}", "--cpus", "0", "--", "true", env=env),
                          "--cpus wants a positive number of vCPUs, got 0")
    assert not cache.exists()


# ------------------------------------------------------------------ 2. kvmlab stop, and which pid is QEMU

def test_stop_with_an_empty_name_stops_nothing(cache):
    placeholder = cache / "runs" / "20261201-000000-aaaaaa"
    qemu = stand_in_qemu(placeholder)
    try:
        run_dir = kept_run(cache, placeholder.name, qemu.pid)
        done = kvmlab("stop", "", env={"KVMLAB_CACHE": str(cache)})
        assert_one_line_error(done, "no kvmlab run ''")
        assert alive(qemu), "kvmlab stop '' stopped a kept VM"
        assert json.loads((run_dir / "run.json").read_text())["state"] == "kept"
        assert runs.qemu_alive(run_dir, qemu.pid)
    finally:
        qemu.kill()
        qemu.wait()


def test_a_program_that_names_the_run_is_not_its_qemu(cache):
    """The pid in run.json is a ``tail -f RUN/console.log`` (a recycled pid): stop must not kill it."""
    run_dir = cache / "runs" / "20261201-000000-bbbbbb"
    run_dir.mkdir(parents=True)
    (run_dir / "console.log").write_text("")
    tail = subprocess.Popen(["tail", "-f", str(run_dir / "console.log")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    started(tail.pid, b"tail")
    try:
        (run_dir / "run.json").write_text(json.dumps({"state": "kept", "argv": ["true"], "qemu_pid": tail.pid,
                                                      "qmp": str(run_dir / "qmp.sock")}))
        assert not runs.qemu_alive(run_dir, tail.pid)
        env = {"KVMLAB_CACHE": str(cache)}
        done = kvmlab("stop", env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "no kept VMs running"
        assert_one_line_error(kvmlab("stop", run_dir.name, env=env), f"run {run_dir.name} has no VM running")
        assert alive(tail), "kvmlab stop killed a tail of the run's console"
    finally:
        tail.kill()
        tail.wait()


def lab_machine(run_dir: Path) -> Machine:
    return Machine(vmlinuz=Path("/k/vmlinuz"), initrd=Path("/k/initrd"), run_dir=run_dir,
                   accel=Accel("tcg", "EPYC,+svm", "test"), clock=Clock("wall", "test"),
                   emulator=emulator.Emulator("/usr/bin/qemu-system-x86_64", "10.0.2"))


def test_qemu_is_told_by_its_own_command_line(tmp_path):
    run_dir, other = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    argv = command(lab_machine(run_dir))
    assert runs.is_qemu_of(run_dir, argv, "/")
    assert not runs.is_qemu_of(other, argv, "/"), "another run's QEMU"
    assert not runs.is_qemu_of(run_dir, ["tail", "-f", f"{run_dir}/console.log"], "/")
    assert not runs.is_qemu_of(run_dir, ["less", "-pidfile", f"{run_dir}/qemu.pid"], "/")
    assert not runs.is_qemu_of(run_dir, ["qemu-system-x86_64", "-display", "none"], "/")
    the_directory_itself = ["qemu-system-x86_64", "-L", str(run_dir)]
    assert not runs.is_qemu_of(run_dir, the_directory_itself, "/")
    relative = ["qemu-system-x86_64", "-pidfile", "runs/a/qemu.pid"]  # kvmlab started it in tmp_path
    assert runs.is_qemu_of(run_dir, relative, str(tmp_path))
    assert not runs.is_qemu_of(run_dir, relative, "/")
    assert not runs.is_qemu_of(run_dir, relative, None), "where another user's QEMU runs is unknown"
    assert runs.is_qemu_of(run_dir, argv, None)
    assert not runs.is_qemu_of(run_dir, [], "/")


# ------------------------------------------------------------------ 4. paths pathlib cannot resolve

@pytest.fixture
def source_tree(tmp_path) -> Path:
    """Enough of a Linux source tree for ``kernel build`` to take it for one."""
    tree = tmp_path / "linux"
    (tree / "arch/x86").mkdir(parents=True)
    (tree / "Makefile").write_text("all:\n")
    return tree


def paths_cases(tmp_path: Path, source_tree: Path) -> list[tuple[list[str], str]]:
    loop = symlink_loop(tmp_path)
    built = fake_tree(tmp_path / "built")
    return [
        (["kernel", "fetch", f"local:{loop}"], f"{loop}: a symlink loop"),
        (["kernel", "fetch", f"local:{NO_USER}/linux"], f"{NO_USER} names no home directory"),
        (["kernel", "fetch", f"local:{built},modules={loop}"], f"modules directory {loop}: a symlink loop"),
        (["kernel", "build", str(loop)], f"kernel tree {loop}: a symlink loop"),
        (["kernel", "build", f"{NO_USER}/x"], f"kernel tree {NO_USER}/x: {NO_USER} names no home"),
        (["kernel", "build", str(source_tree), "--config", f"{NO_USER}/x"],
         f"config fragment {NO_USER}/x: {NO_USER} names no home"),
        (["kernel", "build", str(source_tree), "--base-config", f"{NO_USER}/x"],
         f"base config {NO_USER}/x: {NO_USER} names no home"),
        (["kernel", "build", str(source_tree), "--patch", f"{NO_USER}/p"],
         f"patch {NO_USER}/p: {NO_USER} names no home"),
        (["kernel", "build", str(source_tree), "-o", str(loop)], f"build directory {loop}: a symlink loop"),
        (["kernel", "fetch", f"kvm-modules:debian:bookworm+{NO_USER}/p"], f"patch {NO_USER}/p: {NO_USER}"),
    ]


def test_paths_pathlib_cannot_resolve_are_one_line(main, tmp_path, source_tree, cache, monkeypatch):
    monkeypatch.setattr(debian, "fetch", unreachable("debian.fetch"))
    for argv, said in paths_cases(tmp_path, source_tree):
        assert_one_line_error(main(*argv), said)
    assert sorted(p.name for p in source_tree.iterdir()) == ["Makefile", "arch"], "a refused build left files"


# ------------------------------------------------------------------ 5. a local tree's kernel.release

@pytest.mark.parametrize("release", [b"\xff\xfe", b"../../../../escaped", b".", b"..", b"a/b", b"", b"\n",
                                     b"6.1 test", b"6.1\x07", b"6.1\nx"])
def test_a_kernel_release_that_is_no_plain_name_is_refused_before_writing(main, tmp_path, cache, release):
    tree = fake_tree(tmp_path / "tree", release, module=True)
    done = main("kernel", "fetch", f"local:{tree}")
    assert_one_line_error(done, f"local:{tree}: {tree / 'include/config/kernel.release'}")
    assert not cache.exists(), "a refused tree was written to the cache"


def test_kernel_fetch_says_a_local_kernel_is_a_local_build(main, tmp_path):
    tree = fake_tree(tmp_path / "tree")
    done = main("kernel", "fetch", f"local:{tree}")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first == f"local:{tree}: {RELEASE} (a local build)"


# ------------------------------------------------------------------ 7. a damaged apt memo

CONTROL = (f"Package: linux-image-cloud-amd64\nVersion: 6.1.176-1\nSHA256: {'ab' * 32}\nSize: 1234\n"
           "Depends: linux-image-6.1.0-50-cloud-amd64\n\n")


@pytest.mark.parametrize("memo", [
    "{bad", "[1, 2]", '{"linux-image-cloud-amd64": "str"}', '{"linux-image-cloud-amd64": null}',
    '{"linux-image-cloud-amd64": {"Package": "linux-image-cloud-amd64", "Version": "1", "SHA256": "x", '
    '"Size": "x"}}',
    '{"linux-image-cloud-amd64": {"SHA256": "x"}}', '{"linux-image-cloud-amd64": {"Package": 5}}',
    "\udcff",
])
def test_a_damaged_apt_memo_is_asked_again_and_rewritten(cache, monkeypatch, memo):
    asked = []

    def apt_cache(self, tool, *args, cwd=None):
        asked.append(args)
        return CONTROL

    monkeypatch.setattr(apt.AptRoot, "update", lambda self, force=False: None)
    monkeypatch.setattr(apt.AptRoot, "_apt", apt_cache)
    memo_path = cache / "apt" / "bookworm" / "show.json"
    memo_path.parent.mkdir(parents=True)
    memo_path.write_bytes(memo.encode(errors="surrogateescape"))
    package = apt.AptRoot("bookworm").package("linux-image-cloud-amd64")
    assert package == apt.Package("linux-image-cloud-amd64", "6.1.176-1", "ab" * 32, 1234, "bookworm")
    assert len(asked) == 1
    rewritten = json.loads(memo_path.read_text())
    assert rewritten == {"linux-image-cloud-amd64": apt._control_fields(CONTROL)}
    assert apt.AptRoot("bookworm").package("linux-image-cloud-amd64") == package
    assert len(asked) == 1, "the rewritten memo was not used"


# ------------------------------------------------------------------ 8. a damaged emulator.json

@pytest.mark.parametrize("record, said", [
    ({"binary": 5, "version": 7}, "binary 5 is not an executable file"),
    ({"binary": "/nonexist", "version": "abc"}, "binary '/nonexist' is not an executable file"),
    ({"binary": sys.executable, "version": "abc"}, "version 'abc' is not a QEMU version"),
    ({"binary": sys.executable, "version": 10}, "version 10 is not a QEMU version"),
    ({"binary": sys.executable, "version": "10.0.2", "data_dir": 3}, "data_dir 3 is not text"),
    ({"binary": "/etc/passwd", "version": "10.0.2"}, "is not an executable file"),
    ({"binary": "/usr", "version": "10.0.2"}, "is not an executable file"),
    ({"version": "10.0.2"}, "binary None is not an executable file"),
    ({"binary": sys.executable, "version": "10.0.2", "extra": 1}, "unknown field 'extra'"),
    ([], "not a JSON object"),
])
def test_a_damaged_emulator_record_is_refused(tmp_path, record, said):
    (tmp_path / emulator.RECORD).write_text(json.dumps(record))
    with pytest.raises(KvmlabError) as refusal:
        emulator.load(tmp_path)
    message = str(refusal.value)
    assert message.startswith(f"{tmp_path / emulator.RECORD} is damaged (")
    assert said in message and message.endswith(f"delete {tmp_path} to fetch again")


def test_a_sound_emulator_record_loads(tmp_path):
    record = {"binary": sys.executable, "version": "10.0.2", "package": "qemu-system-x86 1:10.0.2",
              "data_dir": str(tmp_path)}
    (tmp_path / emulator.RECORD).write_text(json.dumps(record))
    assert emulator.load(tmp_path) == emulator.Emulator(**record)


# ------------------------------------------------------------------ 9. inspect: sockets, huge timeouts

@pytest.mark.parametrize("fields, key", [({"debug_qmp": 5}, "debug_qmp"), ({"debug_qmp": None}, "debug_qmp"),
                                         ({"qmp": ...}, "qmp"), ({"qmp": ""}, "qmp")])
def test_inspect_names_a_run_json_without_its_sockets(cache, fields, key):
    placeholder = cache / "runs" / "20261201-000000-cccccc"
    qemu = stand_in_qemu(placeholder)
    try:
        run_dir = kept_run(cache, placeholder.name, qemu.pid, **fields)
        with pytest.raises(KvmlabError) as refusal:
            attach.target(str(run_dir))
        said = f"{run_dir / 'run.json'} is damaged: {key!r} wants a socket path"
        assert str(refusal.value).startswith(said)
    finally:
        qemu.kill()
        qemu.wait()


@pytest.mark.parametrize("timeout_s", [math.inf, 1e300])
def test_a_timeout_beyond_the_sockets_range_waits_without_a_limit(tmp_path, timeout_s):
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def greet_late():
        conn, _ = server.accept()
        time.sleep(0.3)
        conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        conn.close()

    greeter = threading.Thread(target=greet_late, daemon=True)
    greeter.start()
    try:
        qmp.await_greeting(path, timeout_s, "test")
    finally:
        greeter.join(10)
        server.close()


def test_a_greeting_deadline_still_holds(tmp_path):
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        with pytest.raises(KvmlabError, match="sent no QMP greeting within 0.2 s"):
            qmp.await_greeting(path, 0.2, "test")
    finally:
        server.close()


def test_stand_in_qemu_is_alive_only_for_its_run(cache):
    """The stand-in the tests above rely on passes for its own run's QEMU and no other's."""
    mine, other = cache / "runs" / "mine", cache / "runs" / "other"
    qemu = stand_in_qemu(mine, seconds=30)
    try:
        assert runs.qemu_alive(mine, qemu.pid)
        assert not runs.qemu_alive(other, qemu.pid)
    finally:
        qemu.kill()
        qemu.wait()
    assert not runs.qemu_alive(mine, qemu.pid)
