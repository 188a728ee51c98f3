"""Every Debian suite kvmlab lists, booted for real: KVM in the guest answers the smoke
check, and drgn reads a live VM's memslots from the host and finds them sound.
bullseye and bookworm, the two layouts' reference kernels, get the same and more in
test_inspect.py's dump test; the others are booted here."""

import json
import re

import pytest
from conftest import kvmlab

from drgn_scripts.memslot_model import VmMemslots
from kvmlab import apt
from vm.test_inspect import KERNEL_LIMITS

pytestmark = [pytest.mark.vm, pytest.mark.usefixtures("no_leaked_qemu")]

#: Per suite: the start of its cloud kernel's release and KVM's memslot limit there.
EXPECTED = {
    "bullseye": ("5.10.", 509),
    "bookworm": ("6.1.", 32764),
    "trixie": ("6.12.", 32764),
    "bookworm-backports": ("6.", 32764),
}
HELD = 40
ELSEWHERE = [suite for suite in apt.KNOWN_SUITES if f"debian:{suite}" in KERNEL_LIMITS]


def test_every_listed_suite_is_booted_by_a_test():
    assert set(EXPECTED) == set(apt.KNOWN_SUITES) and len(ELSEWHERE) == 2


@pytest.mark.parametrize("suite", [suite for suite in apt.KNOWN_SUITES if suite not in ELSEWHERE])
def test_listed_suite_boots_runs_kvm_and_inspects(suite, tmp_path):
    release, limit = EXPECTED[suite]  # a suite listed without an expectation fails here
    script = ('ls -l /dev/kvm && python3 -m kselftest_py.smoke --json "$KVMLAB_RESULTS/smoke.json" && '
              f"python3 -m kselftest_py.hold_memslots --detach -n {HELD}")
    done = kvmlab("run", f"debian:{suite}", "--keep", "--timeout", "300", "--out", str(tmp_path), "--",
                  "sh", "-c", script)
    run_name = re.search(r"kvmlab stop (\S+)\)", done.stderr)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        inspected = kvmlab("inspect", run_name.group(1), "--check", "--json")
    finally:
        if run_name:
            kvmlab("stop", run_name.group(1))
    assert "/dev/kvm" in done.stdout
    smoke = json.loads((tmp_path / "smoke.json").read_text())
    assert smoke["kernel_release"].startswith(release)
    assert smoke["nr_memslots"] == limit
    assert [r["result"] for r in smoke["results"]] == ["pass"] * 5
    assert inspected.returncode == 0, inspected.stderr
    record = json.loads(inspected.stdout)
    assert record["violations"] == []
    held = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    vms = {vm.pid: vm for vm in map(VmMemslots.from_json, record["vms"])}
    slots = vms[held[0]["pid"]].address_spaces[0].slots
    assert [(s.base_gfn * 4096, s.npages * 4096) for s in slots] == \
        [(s["gpa"], s["size"]) for s in held[0]["slots"]]
