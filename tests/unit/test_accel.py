import pytest

from kvmlab.errors import KvmlabError
from kvmlab.vm.accel import TCG_CPU, decide, host_virt_flag

INTEL = "processor : 0\nflags\t\t: fpu vme de pse vmx ept\n"
AMD = "processor : 0\nflags\t\t: fpu vme svm npt\n"
PLAIN = "processor : 0\nflags\t\t: fpu vme hypervisor\n"


def test_virt_flag_from_cpuinfo():
    assert host_virt_flag(INTEL) == "vmx"
    assert host_virt_flag(AMD) == "svm"
    assert host_virt_flag(PLAIN) is None


def test_kvm_only_with_nesting_on():
    assert decide(None, "vmx", "Y\n", True).name == "kvm"
    assert decide(None, "svm", "1\n", True).cpu == "host"
    off = decide(None, "vmx", "N\n", True)
    assert (off.name, off.cpu) == ("tcg", TCG_CPU)
    assert "nesting is off" in off.reason


def test_tcg_without_hardware_virtualisation_or_dev_kvm():
    assert decide(None, None, None, True).name == "tcg"
    assert decide("auto", "svm", "1", False).name == "tcg"


def test_override():
    assert decide("tcg", "vmx", "Y", True).name == "tcg"
    assert decide("kvm", None, None, True).name == "kvm"
    with pytest.raises(KvmlabError, match="not usable"):
        decide("kvm", None, None, False)
    with pytest.raises(KvmlabError, match="Available: auto, kvm, tcg"):
        decide("hvf", None, None, True)
