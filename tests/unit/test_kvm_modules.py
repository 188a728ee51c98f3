"""kvm-modules: specs: Debian's KVM modules rebuilt from Debian's source, with a patch or
without, booted in the lab, read by drgn, refused clearly when they cannot be built."""


import pytest
from conftest import REPO, assert_one_line_error, kvmlab

from kvmlab import kernels
from kvmlab.errors import KvmlabError
from kvmlab.kernels import kvm_modules

DATA = REPO / "tests" / "data"
HELLO = f"kvm-modules:debian:bookworm+{DATA / 'kvm-hello.patch'}"


def test_a_patch_that_does_not_apply_names_its_first_failing_hunk():
    done = kvmlab("kernel", "fetch", f"kvm-modules:debian:bookworm+{DATA / 'kvm-stale.patch'}")
    assert_one_line_error(done, "patch kvm-stale.patch does not apply", "virt/kvm/kvm_main.c:5915")


def test_a_patch_outside_the_kvm_directories_is_refused_by_name():
    done = kvmlab("kernel", "fetch", f"kvm-modules:debian:bookworm+{DATA / 'kvm-outside.patch'}")
    assert_one_line_error(done, "kvm-outside.patch changes include/linux/kvm_host.h", "whole kernel")


def test_bad_kvm_modules_specs():
    assert_one_line_error(kvmlab("kernel", "fetch", "kvm-modules:local:/tmp+x.patch"), "debian: kernel")
    assert_one_line_error(kvmlab("kernel", "fetch", "kvm-modules:debian:bookworm+/nonexistent.patch"),
                          "/nonexistent.patch does not exist")


def test_a_module_for_another_kernel_is_caught_before_boot(tmp_path):
    bookworm, bullseye = kernels.fetch("debian:bookworm"), kernels.fetch("debian:bullseye")
    foreign = bullseye.modules_root / "lib" / "modules" / bullseye.release / kvm_modules.MODULE_DIR
    with pytest.raises(KvmlabError, match=r"vermagic '5\.10\.0-\d+-cloud-amd64 SMP mod_unload"):
        kvm_modules._check_vermagic(foreign, bookworm)
