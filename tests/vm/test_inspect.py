"""drgn on live lab guests: the host's memslot dump against what the guest created, and
invariant checks that pause the guest while memslots churn. Both memslot layouts: the
array of 5.10 (bullseye) and the trees of 6.1 (bookworm)."""

import json
import re

import pytest
from conftest import emulator_failed, kvmlab, kvmlab_retrying

from drgn_scripts.memslot_model import VmMemslots

pytestmark = pytest.mark.vm

KERNEL_LIMITS = {"debian:bookworm": 32764, "debian:bullseye": 509}
HOLD = "python3 -m kselftest_py.hold_memslots --detach -n"


@pytest.mark.parametrize("spec", KERNEL_LIMITS)
def test_dump_equals_created_layout(spec, tmp_path, no_leaked_qemu):
    """Also the smoke check of these two suites (tests/vm/test_kernel_matrix.py boots the others)."""
    smoke = 'ls -l /dev/kvm && python3 -m kselftest_py.smoke --json "$KVMLAB_RESULTS/smoke.json"'
    done = kvmlab("run", spec, "--keep", "--out", str(tmp_path), "--", "sh", "-c",
                  f"{smoke} && {HOLD} 40 && {HOLD} max")
    assert done.returncode == 0, done.stderr
    assert "/dev/kvm" in done.stdout
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["nr_memslots"] == KERNEL_LIMITS[spec]
    assert [r["result"] for r in report["results"]] == ["pass"] * 5
    run_name = re.search(r"kvmlab stop (\S+)\)", done.stderr).group(1)
    try:
        created = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        inspected = kvmlab("inspect", run_name, "--check", "--json")
        table = kvmlab("inspect", run_name)
    finally:
        kvmlab("stop", run_name)
    assert [len(holder["slots"]) for holder in created] == [40, KERNEL_LIMITS[spec]]
    assert inspected.returncode == 0, inspected.stderr
    record = json.loads(inspected.stdout)
    assert record["violations"] == []
    vms = {vm.pid: vm for vm in map(VmMemslots.from_json, record["vms"])}
    for holder in created:
        vm = vms[holder["pid"]]
        dumped = [{"id": s.id, "gpa": s.base_gfn * 4096, "size": s.npages * 4096,
                   "hva": s.userspace_addr, "flags": s.flags} for s in vm.address_spaces[0].slots]
        assert dumped == holder["slots"]
        assert all(not space.slots for space in vm.address_spaces[1:])  # SMM: none created
    assert table.returncode == 0, table.stderr
    assert f"address space 0: {KERNEL_LIMITS[spec]} slots" in table.stdout
    layout = "tree layout" if spec == "debian:bookworm" else "array layout"
    assert layout in table.stdout


def stress_with_checks(spec: str):
    """memslot_stress (one vCPU: the heavier stress wedges nested TCG guests often)
    under periodic checks, retried while the emulator fails it. An invariant violation
    (exit 123) is never retried."""
    return kvmlab_retrying("run", spec, "--check-invariants-every", "3", "--timeout", "150", "--",
                           "python3", "-m", "kselftest_py.memslot_stress", "-v", "1", "-b", "4", "-s", "40",
                           "-t", "20", retry_if=emulator_failed, timeout=400)


@pytest.mark.parametrize("spec", KERNEL_LIMITS)
def test_periodic_checks_during_modification_stress(spec, tmp_path, no_leaked_qemu):
    done = stress_with_checks(spec)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = re.search(r"invariant checks: (\d+) ran, (\d+) saw a VM \(up to (\d+) slots\)", done.stderr)
    assert summary, done.stderr[-3000:]
    ran, with_vms, slots = map(int, summary.groups())
    assert with_vms >= 3 and ran >= with_vms
    assert slots >= 40
    assert "no violations" in done.stderr
    run_dir = re.search(r"console log (\S+)/console.log", done.stderr).group(1)
    with open(f"{run_dir}/invariants.jsonl") as journal:
        checks = [json.loads(line) for line in journal]
    assert len(checks) == ran and all(check["violations"] == [] for check in checks)
