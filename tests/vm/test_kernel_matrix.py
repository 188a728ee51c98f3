"""Every Debian kernel kvmlab lists, in one guest each: every kselftest_py test briefly,
drgn's invariant checks while memslot_stress churns the memslots, a trace of the
memslot lookups read back into a latency report, and a dump of a held VM that must
equal the layout the guest created. A 6.12 and a 7.x kernel run under each clock.

bullseye (5.10, the array) and bookworm (6.1, the trees) are booted by test_inspect.py,
test_trace.py and the qualify tests, with more than this; this file boots the rest:
Debian's current stable 6.12 (trixie), bookworm-backports' 6.12, and the 7.x kernels of
trixie-backports (split into linux-binary, -modules and -base packages) and sid.
"""

import json
import re
import time

import pandas as pd
import pytest
from conftest import emulator_failed, kvmlab, kvmlab_retrying

from drgn_scripts.memslot_model import VmMemslots
from kvmlab import apt
from vm.test_inspect import KERNEL_LIMITS

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

#: Per suite: the start of its cloud kernel's release, KVM's memslot limit there, and the
#: clock its guest runs under here (both clocks, each on a 6.12 and a 7.x kernel).
EXPECTED = {
    "bullseye": ("5.10.", 509, None),
    "bookworm": ("6.1.", 32764, None),
    "trixie": ("6.12.", 32764, "wall"),
    "bookworm-backports": ("6.12.", 32764, "icount"),
    "trixie-backports": ("7.", 32764, "wall"),
    "sid": ("7.", 32764, "icount"),
}
ELSEWHERE = [suite for suite in apt.KNOWN_SUITES if f"debian:{suite}" in KERNEL_LIMITS]
HELD = 40
PERF_TESTS = ["map", "unmap", "unmap chunked", "move active area", "move inactive area", "RW"]
#: Every kselftest_py test, briefly: 8 MiB areas keep unmap and RW to seconds when traced,
#: dirty_log_perf dirties 4 MiB over 4 memslots.
#: memslot_stress runs before memslot_perf: under icount its 6 s are enough lookups to
#: fill the 128 MiB trace buffer (sid's 7.2 lost 358659 events on one CPU), and the
#: buffer keeps the newest events, which must be memslot_perf's.
#: A guest that stops answering at a sync is stopped and located on every kernel: its run
#: must fail (exit 1), and its lines stay out of stdout, where they would read as the
#: emulator's. (Not one that does not exit when told: under icount that froze the L1
#: kernel, docs/known-problems.md; test_memslot_perf covers it under the wall clock.)
HANG = ("{ python3 -m kselftest_py.memslot_perf -s 10 -f 2 -e 2 -l 0.2 --sync-timeout 3 --inject-hang "
        '--json "$KVMLAB_RESULTS/hang.json" > /dev/null; [ $? -eq 1 ]; }')
JOB = " && ".join([
    HANG,
    'python3 -m kselftest_py.smoke --json "$KVMLAB_RESULTS/smoke.json"',
    'python3 -m kselftest_py.dirty_log_perf -x 4 -b 4M -i 2 --json "$KVMLAB_RESULTS/dirty.json"',
    'python3 -m kselftest_py.memslot_stress -v 1 -b 4 -s 40 -t 6 --json "$KVMLAB_RESULTS/stress.json"',
    "python3 -m kselftest_py.memslot_perf -s 10 -f 0 -e 5 -l 0.2 -r 1 -d --mem-size-mib 8 "
    '--map-size-mib 8 --unmap-size-mib 8 --json "$KVMLAB_RESULTS/perf.json"',
    f"python3 -m kselftest_py.hold_memslots --detach -n {HELD}",
])


def _stopped_if_emulator_failed(done) -> bool:
    """Retry only what nested TCG failed (conftest.emulator_failed), with the kept VM
    of the failed attempt stopped first."""
    if not emulator_failed(done):
        return False
    kept = re.search(r"kvmlab stop (\S+)\)", done.stderr)
    if kept:
        kvmlab("stop", kept.group(1))
    return True


def test_every_listed_suite_is_booted_by_a_test():
    assert set(EXPECTED) == set(apt.KNOWN_SUITES) and len(ELSEWHERE) == 2


@pytest.mark.parametrize("suite", [suite for suite in apt.KNOWN_SUITES if suite not in ELSEWHERE])
def test_listed_kernel_runs_every_test_in_one_guest(suite, tmp_path):
    release, limit, clock = EXPECTED[suite]  # a suite listed without an expectation fails here
    out = tmp_path / "results"
    started = time.monotonic()
    done = kvmlab_retrying("run", f"debian:{suite}", "--clock", clock, "--keep",
                           "--check-invariants-every", "3", "--trace", "memslot-lookup", "--timeout", "400",
                           "--out", str(out), "--", "sh", "-c", JOB,
                           retry_if=_stopped_if_emulator_failed, timeout=900)
    run_name = re.search(r"kvmlab stop (\S+)\)", done.stderr)
    try:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        inspected = kvmlab("inspect", run_name.group(1), "--check", "--json")
    finally:
        if run_name:
            kvmlab("stop", run_name.group(1))
    took = time.monotonic() - started
    print(f"debian:{suite}: one guest under the {clock} clock, every test, {took:.0f} s")
    assert f"clock {clock}" in done.stderr

    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["kernel_release"].startswith(release)
    assert smoke["nr_memslots"] == limit
    assert [r["result"] for r in smoke["results"]] == ["pass"] * 5

    perf = json.loads((out / "perf.json").read_text())
    assert perf["verify"] and perf["exit_code"] == 0
    assert [(t["test"], t["result"]) for t in perf["tests"]] == [(name, "pass") for name in PERF_TESTS]
    dirty = json.loads((out / "dirty.json").read_text())
    assert [(t["test"], t["result"]) for t in dirty["tests"]] == [("dirty log", "pass")], dirty.get("reason")
    assert dirty["manual_protect"] and len(dirty["get_dirty_log_ns"]) == 2
    assert dirty["runs"][0]["populate_ns"] > 0 and dirty["runs"][0]["clear_dirty_log_ns"] > 0
    stress = json.loads((out / "stress.json").read_text())
    assert stress["exit_code"] == 0 and stress["modifications"] > 0 and stress["pages_checked"] > 0
    hang = json.loads((out / "hang.json").read_text())
    assert [t["test"] for t in hang["tests"]] == ["unmap chunked"]
    assert all("; its vCPU was stopped in hang" in t["reason"] for t in hang["tests"]), hang["tests"]

    # drgn checked the memslots while they churned, and found them sound
    summary = re.search(r"invariant checks: (\d+) ran, (\d+) saw a VM \(up to (\d+) slots\)", done.stderr)
    assert summary, done.stderr[-3000:]
    assert int(summary.group(2)) >= 1 and int(summary.group(3)) >= HELD
    assert "no violations" in done.stderr

    # ... and a dump of the held VM is the layout the guest made
    assert inspected.returncode == 0, inspected.stderr
    record = json.loads(inspected.stdout)
    assert record["violations"] == []
    held = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    vms = {vm.pid: vm for vm in map(VmMemslots.from_json, record["vms"])}
    slots = vms[held[0]["pid"]].address_spaces[0].slots
    assert [(s.id, s.base_gfn * 4096, s.npages * 4096, s.userspace_addr, s.flags) for s in slots] == \
        [(s["id"], s["gpa"], s["size"], s["hva"], s["flags"]) for s in held[0]["slots"]]

    # the trace: what the probe set named and the kernel lacks is said in one line
    capture = json.loads((out / "capture.json").read_text())
    assert {"kvm_mmu_page_fault", "kvm_vcpu_gfn_to_memslot"} <= set(capture["functions"])
    assert "kvm_handle_hva_range" in capture["skipped_functions"]  # 5.10's name
    skipped = [line for line in done.stderr.splitlines() if "not in this kernel:" in line]
    assert len(skipped) == 1 and "kvm_handle_hva_range" in skipped[0]
    report = kvmlab("trace", "report", str(out), "-o", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr
    latency = pd.read_csv(tmp_path / "report" / "latency.csv")
    faults = latency[latency["function"] == "kvm_mmu_page_fault"]
    assert set(faults["test"]) >= {"move active area", "RW"}
    assert (faults["calls"] > 0).all()
