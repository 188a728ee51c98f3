"""The clock choice and the emulator's version, on plain facts (no QEMU started)."""

import pytest

from kvmlab.errors import KvmlabError
from kvmlab.vm.accel import TCG_CPU, Accel
from kvmlab.vm.clock import ICOUNT, WALL, choose
from kvmlab.vm.emulator import Emulator, probe_version

TCG = Accel("tcg", TCG_CPU, "test")
KVM = Accel("kvm", "host", "test")
QEMU10 = Emulator("/q10", "10.0.2")
QEMU7 = Emulator("/q7", "7.2.19")


def test_icount_is_the_measurement_default_under_tcg_only():
    assert choose(None, TCG, QEMU10).name == ICOUNT
    assert choose("auto", KVM, QEMU10).name == WALL
    assert choose(None, TCG, QEMU10, default=WALL).name == WALL
    fallback = choose(None, TCG, QEMU7)
    assert fallback.name == WALL and "7.2.19" in fallback.reason


def test_icount_refused_under_kvm_and_with_an_old_qemu():
    with pytest.raises(KvmlabError, match="--accel kvm"):
        choose(ICOUNT, KVM, QEMU10)
    with pytest.raises(KvmlabError, match="QEMU >= 10.0.*7.2.19"):
        choose(ICOUNT, TCG, QEMU7)
    with pytest.raises(KvmlabError, match="unknown clock"):
        choose("tsc", TCG, QEMU10)
    assert choose(WALL, KVM, QEMU10).name == WALL


def test_version_tuple_compares_numerically():
    assert Emulator("/q", "10.0.2").version_tuple == (10, 0, 2)
    assert Emulator("/q", "9.10").version_tuple < (10, 0)


def test_probe_version_reads_what_qemu_prints(tmp_path):
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)'\n")
    fake.chmod(0o755)
    assert probe_version(str(fake)) == "10.0.2"
    fake.write_text("#!/bin/sh\necho hello\n")
    with pytest.raises(KvmlabError, match="no QEMU version"):
        probe_version(str(fake))
