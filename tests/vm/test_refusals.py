"""Refusals that need a real kernel's files: a kernel without KVM is refused before boot."""

import pytest
from conftest import assert_one_line_error, built_tree, kvmlab

from kvmlab import kernels


@pytest.mark.vm
def test_kernel_without_kvm(tmp_path):
    """A real kernel whose config says KVM is off is refused before boot."""
    real = kernels.fetch("debian:bookworm")
    config = real.config.read_text().replace("CONFIG_KVM=m", "# CONFIG_KVM is not set")
    tree = built_tree(tmp_path / "tree", real, config)
    done = kvmlab("run", f"local:{tree}", "--", "true")
    assert_one_line_error(done, "has no KVM support")



@pytest.mark.vm
def test_linux_6_12_under_qemu_7_2_is_refused_before_boot():
    """Debian's 6.12 double-faults under bookworm's QEMU 7.2: kvmlab says so instead."""
    done = kvmlab("run", "debian:trixie", "--", "true", env={"KVMLAB_QEMU": "/usr/bin/qemu-system-x86_64"})
    assert_one_line_error(done, "6.12.", "double-faults", "QEMU 7.2", "needs QEMU 10.0")


@pytest.mark.vm
def test_a_templates_budget_that_is_no_size_is_refused_before_boot(no_leaked_qemu):
    """``$KVMLAB_TEMPLATES_GIB`` is read before a guest is restored or booted: one line, exit 2."""
    done = kvmlab("run", "debian:bookworm", "--", "true", env={"KVMLAB_TEMPLATES_GIB": "lots"})
    assert_one_line_error(done, "KVMLAB_TEMPLATES_GIB='lots' is not a size in GiB")
    assert "booting" not in done.stderr and "restored" not in done.stderr
