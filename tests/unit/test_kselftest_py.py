"""kselftest_py: ioctl numbers and struct layouts, the KTAP writer, and the smoke check."""

import ast
import ctypes
import io
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from kselftest_py import ioctls, ktap

PACKAGE = REPO / "kselftest_py"

# Values produced by the kernel headers (x86-64) for these requests.
KNOWN_IOCTLS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_SET_CPUID2": 0x4008AE90,
}


@pytest.mark.parametrize("name,value", sorted(KNOWN_IOCTLS.items()))
def test_ioctl_numbers_match_kernel_headers(name, value):
    assert getattr(ioctls, name) == value
    assert ioctls.IOCTL_NAMES[value] == name


def test_ioctl_encoding_rejects_oversized_struct():
    with pytest.raises(ValueError, match="14 bits"):
        ioctls.IOW(ioctls.KVMIO, 0x46, 1 << 14)


@pytest.mark.parametrize(
    "struct,size",
    [(ioctls.KvmRegs, 144), (ioctls.KvmSregs, 312), (ioctls.KvmUserspaceMemoryRegion, 32),
     (ioctls.KvmCpuidEntry2, 40), (ioctls.KvmCpuid2Header, 8), (type(ioctls.kvm_cpuid2(3)), 8 + 3 * 40)],
)
def test_struct_sizes(struct, size):
    assert ctypes.sizeof(struct) == size


def test_sregs_field_offsets():
    # cs first, 8 segments of 24 bytes, 2 dtables of 16, 7 u64 registers, bitmap
    assert ioctls.KvmSregs.gdt.offset == 8 * 24
    assert ioctls.KvmSregs.cr0.offset == 8 * 24 + 2 * 16
    assert ioctls.KvmSregs.interrupt_bitmap.offset == 280


def test_capability_and_exit_constants():
    assert (ioctls.KVM_CAP_USER_MEMORY, ioctls.KVM_CAP_NR_VCPUS) == (3, 9)
    assert (ioctls.KVM_CAP_NR_MEMSLOTS, ioctls.KVM_CAP_MAX_VCPUS) == (10, 66)
    assert ioctls.exit_reason_name(2) == "KVM_EXIT_IO"
    assert ioctls.exit_reason_name(5) == "KVM_EXIT_HLT"
    assert ioctls.exit_reason_name(8) == "KVM_EXIT_SHUTDOWN"
    assert ioctls.exit_reason_name(9) == "KVM_EXIT_FAIL_ENTRY"
    assert ioctls.exit_reason_name(17) == "KVM_EXIT_INTERNAL_ERROR"
    assert "unknown" in ioctls.exit_reason_name(999)


def test_package_imports_only_the_standard_library():
    stdlib = sys.stdlib_module_names
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in stdlib or top in ("kselftest_py", "__future__"), (path, name)


# --- KTAP ------------------------------------------------------------------------


def test_ktap_writer_output():
    out = io.StringIO()
    writer = ktap.KtapWriter(out)
    writer.header()
    writer.plan(4)
    writer.diag("nr_memslots: 509\nsecond line")
    writer.ok("map")
    writer.not_ok("unmap # with a hash")
    writer.skip("move", "needs 8194 slots\nhas 509")
    writer.xfail("rw", "2 s alarm under TCG")
    assert out.getvalue().splitlines() == [
        "KTAP version 1",
        "1..4",
        "# nr_memslots: 509",
        "# second line",
        "ok 1 map",
        "not ok 2 unmap with a hash",
        "ok 3 move # SKIP needs 8194 slots has 509",
        "ok 4 rw # XFAIL 2 s alarm under TCG",
    ]
    assert writer.results == [("map", "pass"), ("unmap # with a hash", "fail"),
                              ("move", "skip"), ("rw", "xfail")]  # fmt: skip
    assert writer.finish() == ktap.KSFT_FAIL
    assert out.getvalue().splitlines()[-1] == (
        "# Totals: pass:1 fail:1 xfail:1 xpass:0 skip:1 error:0"
    )


def test_kselftest_exit_code_values():
    assert (ktap.KSFT_PASS, ktap.KSFT_FAIL, ktap.KSFT_XFAIL, ktap.KSFT_XPASS, ktap.KSFT_SKIP) == (
        0, 1, 2, 3, 4,
    )  # fmt: skip


@pytest.mark.parametrize(
    "results,planned,code",
    [
        (["pass", "pass"], 2, ktap.KSFT_PASS),
        (["pass", "skip"], 2, ktap.KSFT_PASS),
        (["pass", "xfail"], None, ktap.KSFT_PASS),
        (["skip", "fail"], 2, ktap.KSFT_FAIL),
        (["pass"], 2, ktap.KSFT_FAIL),  # a test point went missing
        (["skip", "skip"], 2, ktap.KSFT_SKIP),
        ([], None, ktap.KSFT_SKIP),
    ],
)
def test_suite_exit_code(results, planned, code):
    assert ktap.suite_exit_code(results, planned) == code


def test_suite_exit_code_rejects_unknown_result():
    with pytest.raises(ValueError, match="unknown test results"):
        ktap.suite_exit_code(["passed"])


# --- smoke check -----------------------------------------------------------------


def run_smoke(tmp_path, *args):
    json_path = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "kselftest_py.smoke", "--json", str(json_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, json.loads(json_path.read_text())


def kvm_unusable_reason():
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as err:
        return f"/dev/kvm does not open: {err}"
    os.close(fd)
    return None


@pytest.mark.skipif(kvm_unusable_reason() is not None, reason=str(kvm_unusable_reason()))
def test_smoke_on_this_host(tmp_path):
    proc, record = run_smoke(tmp_path)
    lines = proc.stdout.splitlines()
    assert proc.returncode == ktap.KSFT_PASS, proc.stdout + proc.stderr
    assert lines[:2] == ["KTAP version 1", "1..5"]
    assert [line for line in lines if line.startswith(("ok ", "not ok "))] == [
        "ok 1 api_version",
        "ok 2 nr_memslots",
        "ok 3 memslot_add_delete",
        "ok 4 vcpu_real_mode",
        "ok 5 vcpu_long_mode",
    ]
    assert "# api_version: 12" in lines
    nr_memslots = [line for line in lines if line.startswith("# nr_memslots: ")]
    assert len(nr_memslots) == 1
    assert record["api_version"] == 12
    assert record["nr_memslots"] == int(nr_memslots[0].split(": ")[1]) > 0
    assert record["kernel_release"] == os.uname().release
    assert record["results"] == [
        {"name": name, "result": "pass"}
        for name in ("api_version", "nr_memslots", "memslot_add_delete", "vcpu_real_mode", "vcpu_long_mode")
    ]


def test_smoke_without_kvm_device_skips_everything(tmp_path):
    proc, record = run_smoke(tmp_path, "--device", str(tmp_path / "no-kvm"))
    assert proc.returncode == ktap.KSFT_SKIP
    results = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "not ok"))]
    assert len(results) == 5
    assert all(" # SKIP " in line and "no-kvm unavailable" in line for line in results)
    assert record["api_version"] is None and record["nr_memslots"] is None
    assert {r["result"] for r in record["results"]} == {"skip"}


@pytest.mark.skipif(kvm_unusable_reason() is not None, reason=str(kvm_unusable_reason()))
def test_failed_ioctl_names_ioctl_arguments_and_errno():
    from kselftest_py.kvm import KvmError, KvmSystem

    with KvmSystem() as kvm, kvm.create_vm() as vm:
        memory = vm.add_memslot(0, gpa=0, size=0x1000)
        with pytest.raises(KvmError) as caught:
            vm.set_memslot(3, 0x1001, 0x1000, memory.hva)  # gpa not page-aligned
    assert str(caught.value) == (
        "KVM_SET_USER_MEMORY_REGION(slot=3, gpa=0x1001, size=0x1000) failed: EINVAL"
    )
    assert caught.value.errno == 22
