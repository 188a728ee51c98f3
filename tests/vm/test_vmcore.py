"""A guest kernel panicked on purpose while a VM holds memslots: QEMU pauses it at the
panic, kvmlab saves a sparse ELF vmcore, and drgn finds that VM's memslots in it,
through kvmlab inspect and through drgn's own command line. Both memslot layouts."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, kvmlab

from drgn_scripts.memslot_model import VmMemslots
from kvmlab import cache, kernels
from kvmlab.inspect import attach
from kvmlab.vm import runs

pytestmark = pytest.mark.vm

HOLD = "python3 -m kselftest_py.hold_memslots --detach -n 40"


@pytest.mark.parametrize("spec, how", [("debian:bookworm", "restored"), ("debian:bullseye", "restored"),
                                       ("debian:bookworm", "fresh-boot")])
def test_a_panic_leaves_a_vmcore_in_which_drgn_finds_the_vms_memslots(spec, how, no_leaked_qemu):
    """A guest restored from its template (``kvmlab run``'s default) and one booted afresh
    leave the same kind of vmcore."""
    panic = f"{HOLD} && echo c > /proc/sysrq-trigger"
    fresh = ["--fresh-boot"] if how == "fresh-boot" else []
    done = kvmlab("run", spec, "--timeout", "300", *fresh, "--", "sh", "-c", panic)
    assert done.returncode == 125, done.stderr[-3000:]
    assert "guest kernel reported a panic" in done.stderr and "sysrq" in done.stderr
    run_dir = cache.area("runs") / re.search(r"run directory \S*/runs/(\S+)", done.stderr).group(1)
    info = runs.read(run_dir)
    assert info.get("restored", False) is (how == "restored"), info
    assert info["vmcore"] == str(run_dir / "vmcore") and info["vmcore_format"] == "elf", info
    assert f"vmcore: {run_dir / 'vmcore'} (" in done.stderr
    # The whole 4 GiB of guest memory, but on disk only what the guest had touched.
    stat = (run_dir / "vmcore").stat()
    assert info["vmcore_bytes"] == stat.st_size > 4 * 2**30
    assert 0 < info["vmcore_disk_bytes"] == stat.st_blocks * 512 < 2**30
    holder = next(json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))

    inspected = kvmlab("inspect", run_dir.name, "--check", "--json")
    assert inspected.returncode == 0, inspected.stderr
    record = json.loads(inspected.stdout)
    assert record["violations"] == []
    vm = next(VmMemslots.from_json(v) for v in record["vms"] if v["pid"] == holder["pid"])
    dumped = [{"id": s.id, "gpa": s.base_gfn * 4096, "size": s.npages * 4096,
               "hva": s.userspace_addr, "flags": s.flags} for s in vm.address_spaces[0].slots]
    assert dumped == holder["slots"]
    table = kvmlab("inspect", run_dir.name)
    assert table.returncode == 0 and "address space 0: 40 slots" in table.stdout, table.stderr
    assert f"guest as it panicked (from {run_dir / 'vmcore'})" in table.stderr

    # drgn's own command line on the same file, as the README shows it.
    kernel = kernels.fetch(spec, debuginfo=True)
    symbols = [arg for path in attach.debug_files(kernel) for arg in ("-s", str(path))]
    drgn = subprocess.run([sys.executable, "-m", "drgn", "-c", str(run_dir / "vmcore"),
                           "--no-default-symbols", *symbols,
                           "drgn_scripts/memslots.py", "--pid", str(holder["pid"]), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert drgn.returncode == 0, drgn.stderr[-2000:]
    assert [VmMemslots.from_json(v) for v in json.loads(drgn.stdout)] == [vm]
