"""Templates for real: a guest booted once, saved, and restored by ``kvmlab run``.

The rest of the VM suite runs in restored guests too (``kvmlab run`` restores by
default): memslot_perf, the drgn checks, traces and a panic's vmcore all come from
them. Here: that two restores of one template measure the same, that a damaged
template costs one line and a boot, and that ``--fresh-boot`` boots.
"""

import hashlib
import json
import os
import re
import sys

import pytest
from conftest import kvmlab

from kvmlab.vm import template

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

#: Memory sizes no other test uses: these tests damage their templates, and must not
#: damage those of the tests that run after them.
OWN_MEMORY = {"damaged": "3072", "failing": "3584"}
CELL = ["python3", "-m", "kselftest_py.memslot_perf", "-s", "50", "-f", "3", "-e", "3", "-r", "1",
        "-l", "0.3",
        "--json", "/results/perf.json"]


def restored_from(stderr: str) -> str | None:
    match = re.search(r"restored from template (\S+):", stderr)
    return match.group(1) if match else None


#: What a guest can see of its own past: its clock, the interrupts it took, its switches.
FIRST_VIEW = ["sh", "-c", "cat /proc/uptime /proc/interrupts /proc/softirqs; grep ^ctxt /proc/stat"]


def test_restores_of_one_template_reach_their_command_in_the_same_state():
    """Under icount every restore of a template reaches its first command at the same
    instruction, having taken the same interrupts: its uptime, interrupt counts and
    context switches read the same in 8 restores. While kvmlab connected the control port
    after the restore, one restore in four to twelve had taken one virtqueue interrupt
    more (docs/benchmarks.md, determinism)."""
    seen = set()
    for _ in range(8):
        done = kvmlab("run", "debian:bookworm", "--clock", "icount", "--cpus", "1", "--", *FIRST_VIEW)
        assert done.returncode == 0 and restored_from(done.stderr), done.stderr
        seen.add(done.stdout)
    assert len(seen) == 1, "\n---\n".join(seen)


def test_two_restores_of_one_template_measure_the_same(tmp_path):
    """Under icount a restored guest goes on from its template's instruction count: the same
    memslot_perf cell, run in two restores, gives the same figures to the nanosecond
    (16 restores of two templates in a row did, docs/benchmarks.md)."""
    figures = []
    for attempt in range(2):
        out = tmp_path / f"r{attempt}"
        done = kvmlab("run", "debian:bookworm", "--clock", "icount", "--cpus", "1", "--out", str(out), "--",
                      *CELL, timeout=600)
        assert done.returncode == 0, done.stderr
        assert restored_from(done.stderr), done.stderr
        run = json.loads((out / "perf.json").read_text())["runs"][0]
        figures.append((run["iteration_ns"], run["slot_setup_ns"], run["iterations"],
                        restored_from(done.stderr)))
    (first, setup_a, count_a, made_a), (second, setup_b, count_b, made_b) = figures
    assert made_a == made_b
    assert (first, setup_a, count_a) == (second, setup_b, count_b), figures


def _template_of(stderr: str):
    name = restored_from(stderr)
    assert name, stderr
    return template.area() / name


def test_a_damaged_template_is_one_line_and_a_fresh_boot():
    """A record that is no JSON, or a memory file cut short: said in one line, the guest
    boots to make the template again, and the command still runs."""
    memory = OWN_MEMORY["damaged"]
    first = kvmlab("run", "debian:bookworm", "--memory", memory, "--", "uname", "-r")
    assert first.returncode == 0, first.stderr
    directory = _template_of(first.stderr)
    for damage, said in (
        (lambda: (directory / template.RECORD).write_text("{not json"), "is damaged (template.json"),
        (lambda: open(directory / template.RAM, "r+b").truncate(4096), "is damaged (ram holds 4096 bytes"),
    ):
        damage()
        done = kvmlab("run", "debian:bookworm", "--memory", memory, "--", "uname", "-r")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().startswith("6.1.")
        lines = [line for line in done.stderr.splitlines() if said in line]
        assert len(lines) == 1 and "booting afresh" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
        assert restored_from(done.stderr) == directory.name  # made again, then restored
        assert template.load(directory, json.loads((directory / template.RECORD).read_text())["inputs"])[0]


def test_a_template_that_fails_to_restore_is_one_line_and_a_fresh_boot():
    """Device state that QEMU cannot load (the right size, the wrong bytes): the restore
    fails, is said in one line, the template goes, and the guest boots afresh."""
    memory = OWN_MEMORY["failing"]
    first = kvmlab("run", "debian:bookworm", "--memory", memory, "--", "true")
    assert first.returncode == 0, first.stderr
    directory = _template_of(first.stderr)
    state = directory / template.STATE
    state.write_bytes(b"\0" * state.stat().st_size)
    done = kvmlab("run", "debian:bookworm", "--memory", memory, "--", "uname", "-r")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("6.1.")
    lines = [line for line in done.stderr.splitlines() if "restoring template" in line]
    assert len(lines) == 1 and "failed" in lines[0] and "booting afresh" in lines[0], done.stderr
    assert "booting: 6.1." in done.stderr
    assert not directory.exists()


def test_fresh_boot_boots(tmp_path):
    """``--fresh-boot`` boots the kernel, whatever templates there are, and says so."""
    kvmlab("run", "debian:bookworm", "--", "true")  # a template exists now
    done = kvmlab("run", "debian:bookworm", "--fresh-boot", "--out", str(tmp_path), "--", "sh", "-c",
                  'uname -r; echo kept > "$KVMLAB_RESULTS/result.txt"')
    assert done.returncode == 0, done.stderr
    assert restored_from(done.stderr) is None
    assert "booting: 6.1." in done.stderr and "userspace at" in done.stderr
    assert (tmp_path / "result.txt").read_text() == "kept\n"
    run_dir = re.search(r"run directory (\S+)", done.stderr).group(1)
    record = json.loads(open(f"{run_dir}/run.json").read())
    assert "template" not in record and record["argv"][:1] == ["sh"]


@pytest.mark.parametrize("spec", ["debian:bullseye", "debian:bookworm"])
def test_a_booted_agent_pauses_its_vm_where_it_is_ready(spec):
    """The agent of a booted guest pauses its VM itself once ready (``kvmlab_guest.hold``):
    QEMU holds it as ``guest-panicked`` with no panic on the console, its first request
    comes through the mailbox, and the guest is judged by its work, not as a panic."""
    from kvmlab import kernels
    from kvmlab.vm import qmp
    from kvmlab.vm.boot import RunOptions
    from kvmlab.vm.guest import Guest

    guest = Guest(kernels.fetch(spec), RunOptions(argv=[], clock="icount", cpus=1, fresh_boot=True),
                  open(os.devnull, "w"), role=None)
    guest.start()
    try:
        assert qmp.execute(guest.machine.qmp_socket, "query-status")["status"] == "guest-panicked"
        reply = guest.request(["sh", "-c", "cat /proc/uptime; echo $((6 * 7))"])
        assert reply.code == 0 and reply.stdout.splitlines()[-1] == "42", reply
        assert qmp.execute(guest.machine.qmp_socket, "query-status")["status"] == "running"
        assert "Kernel panic" not in guest.machine.console_log.read_text(errors="replace")
    finally:
        result = guest.close()
    assert result.outcome == "ok", result.message


def test_a_hold_that_qemu_never_makes_is_one_line_and_no_template(tmp_path):
    """A QEMU that does nothing on the agent's hold (kvmlab's own QEMU, told ``panic=none``
    by a wrapper given as $KVMLAB_QEMU) leaves the guest running: kvmlab says so in one
    line after HOLD_WAIT_S, ends the VM as lost, and saves no template of it."""
    from kvmlab.vm import emulator
    from kvmlab.vm.guest import HOLD_WAIT_S

    pinned = emulator.fetch()
    wrapper = tmp_path / "qemu-no-hold"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "args = ['panic=none' if a == 'panic=pause' else a for a in sys.argv[1:]]\n"
        f"extra = [] if '--version' in args else ['-L', {pinned.data_dir!r}]\n"
        f"lib = {pinned.library_path!r}\n"
        "os.environ.update({'LD_LIBRARY_PATH': lib} if lib else {})\n"
        f"os.execv({pinned.binary!r}, [{pinned.binary!r}, *extra, *args])\n")
    wrapper.chmod(0o755)
    done = kvmlab("run", "debian:bookworm", "--", "uname", "-r", env={"KVMLAB_QEMU": str(wrapper)})
    assert done.returncode == 126, done.stderr
    said = f"kvmlab: the agent said it paused the guest; QEMU says running after {HOLD_WAIT_S:g} s"
    assert said in done.stderr.splitlines(), done.stderr
    made = re.search(r"making template (\S+) ", done.stderr).group(1)
    assert not (template.area() / made).exists()


def test_a_restored_run_records_its_template(tmp_path):
    done = kvmlab("run", "debian:bookworm", "--env", "ANSWER=42", "--out", str(tmp_path), "--", "sh", "-c",
                  'echo "$ANSWER" > "$KVMLAB_RESULTS/answer"; echo out; echo err >&2; exit 3')
    assert done.returncode == 3, done.stderr
    assert done.stdout == "out\n" and "err" in done.stderr
    assert (tmp_path / "answer").read_text() == "42\n"
    name = restored_from(done.stderr)
    run_dir = re.search(r"run directory (\S+)", done.stderr).group(1)
    record = json.loads(open(f"{run_dir}/run.json").read())
    assert record["restored"] is True and record["template"] == name
    assert record["template_boot_s"] > 1 and record["template_boot"]
    assert record["command"][:2] == ["sh", "-c"] and record["state"] == "failed"


def test_a_restored_guest_takes_files_larger_than_the_socket_holds(tmp_path):
    """``--add`` of a few MB goes inside the first command of a guest held paused: the part
    the socket's buffers cannot hold must wait for the guest to run, not hang kvmlab."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    digest = hashlib.sha256(big.read_bytes()).hexdigest()
    done = kvmlab("run", "debian:bookworm", "--timeout", "120", "--add", str(big), "--", "sh", "-c",
                  "sha256sum /opt/kvmlab/add/big.bin", timeout=300)
    assert done.returncode == 0, done.stderr
    assert restored_from(done.stderr) and done.stdout.split()[0] == digest
