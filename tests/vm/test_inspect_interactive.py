"""kvmlab inspect -i on live lab guests of both memslot layouts: drgn's shell driven
through its standard input, its helpers checked against the layout hold_memslots made,
and the VM stopped mid-session."""

import ast
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, kvmlab

pytestmark = pytest.mark.vm

HOLD = "python3 -m kselftest_py.hold_memslots --detach -n 40"
PAGE = 4096


def _session(run_name: str, lines: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvmlab.cli", "inspect", "-i", run_name], cwd=REPO,
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("spec, layout", [("debian:bookworm", "tree"), ("debian:bullseye", "array")])
def test_the_helpers_answer_as_the_guest_made_its_memslots(spec, layout, no_leaked_qemu):
    started = kvmlab("run", spec, "--keep", "--", "sh", "-c", HOLD)
    assert started.returncode == 0, started.stderr
    run_name = re.search(r"kvmlab stop (\S+)\)", started.stderr).group(1)
    holder = next(json.loads(line) for line in started.stdout.splitlines() if line.startswith("{"))
    slots = holder["slots"]
    target = slots[17]
    inside = target["gpa"] // PAGE + target["size"] // PAGE - 1  # the slot's last page
    past = max(s["gpa"] + s["size"] for s in slots) // PAGE + 10  # beyond every slot
    try:
        done = _session(run_name, [
            "vms()",
            "records = memslots()",
            "print('ids', [(s.id, s.base_gfn * 4096, s.npages * 4096) for s in records])",
            f"print('found', lookup({inside}).id)",
            f"lookup({past})",
            "gfn_tree()",
            "check()",
            "pause()",
            "print('pid', kvm().userspace_pid.value_())",
            "resume()",
            "lookup(1, vm=5)",
            "import subprocess, sys",
            f"subprocess.run([sys.executable, '-m', 'kvmlab.cli', 'stop', '{run_name}'])",
            "vms()",
            "memslots()",
            "print('still', len(records))",
        ])
    finally:
        kvmlab("stop", run_name)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err[-3000:]
    assert "Traceback" not in out + err, out + err
    # drgn's shell (Python's code.InteractiveConsole) writes its banner to stderr.
    assert f"kvmlab inspect: {run_name}, kernel" in err and "guest running" in err
    assert all(f"  {name}(" in err for name in ("vms", "memslots", "lookup", "gfn_tree", "pause"))
    assert re.search(rf"\[0\] VM 0x[0-9a-f]+ pid {holder['pid']}: {layout} layout, slots as 0: 40", out), out
    ids = re.search(r"ids (\[.*\])", out).group(1)
    assert ast.literal_eval(ids) == [(s["id"], s["gpa"], s["size"]) for s in slots]
    assert f"found {target['id']}" in out
    assert re.search(rf"gfn {past:#x}: no slot; {layout} layout", out), out
    assert "40 slots, depth" in out and "1 VMs checked, no violations" in out
    assert f"{run_name}: paused" in out and f"{run_name}: running" in out
    assert f"pid {holder['pid']}" in out
    assert "kvmlab: lookup: KvmlabError: no VM number 5: vms() lists 1" in err
    gone = [line for line in err.splitlines() if "has gone away" in line]
    assert len(gone) == 2 and "its QEMU ended" in gone[0], err
    assert "still 40" in out  # the records read before stay in the session


def test_a_session_on_a_vm_booted_for_it_stops_it_at_the_end(no_leaked_qemu):
    done = subprocess.run([sys.executable, "-m", "kvmlab.cli", "inspect", "-i", "--boot", "debian:bookworm",
                           "--", "python3", "-m", "kselftest_py.hold_memslots", "--detach", "-n", "5"],
                          cwd=REPO, input="vms()\ncheck()\n", capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"\[0\] VM 0x[0-9a-f]+ pid \d+: tree layout, slots as 0: 5", done.stdout), done.stdout
    assert "1 VMs checked, no violations" in done.stdout
    run_name = re.search(r"kvmlab: stopped (\S+)", done.stderr).group(1)
    assert f"kvmlab inspect: {run_name}, kernel" in done.stderr
