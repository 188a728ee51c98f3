"""Which accelerator runs the L1 guest so that KVM works inside it.

Real KVM only helps if the host CPU has VMX/SVM *and* the host's kvm_intel/kvm_amd
allows nesting; otherwise the L1 guest would have no usable /dev/kvm. Everything
else gets TCG emulating an AMD CPU with SVM and nested paging, which Debian's
kernels drive with kvm_amd.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from kvmlab.errors import KvmlabError

TCG_CPU = "EPYC,+svm"
NESTED_PARAMS = {
    "vmx": Path("/sys/module/kvm_intel/parameters/nested"),
    "svm": Path("/sys/module/kvm_amd/parameters/nested"),
}


@dataclass(frozen=True)
class Accel:
    name: str
    cpu: str
    reason: str

    def describe(self) -> str:
        return f"accelerator {self.name} (-cpu {self.cpu}): {self.reason}"


def host_virt_flag(cpuinfo: str) -> str | None:
    """'vmx' or 'svm' if /proc/cpuinfo's flags show hardware virtualisation."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            for flag in ("vmx", "svm"):
                if flag in flags:
                    return flag
            return None
    return None


def nested_enabled(value: str | None) -> bool:
    return value is not None and value.strip() in ("Y", "1")


def choose(requested: str | None = None) -> Accel:
    """The accelerator for this host, or the one ``requested`` (``kvm``/``tcg``)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flag = host_virt_flag(cpuinfo)
    nested = None
    if flag and NESTED_PARAMS[flag].exists():
        nested = NESTED_PARAMS[flag].read_text()
    kvm_ok = os.access("/dev/kvm", os.R_OK | os.W_OK)
    return decide(requested, flag, nested, kvm_ok)


def decide(requested: str | None, flag: str | None, nested: str | None, kvm_ok: bool) -> Accel:
    """The choice itself, on plain facts so that it can be tested on any machine."""
    if requested == "tcg":
        return Accel("tcg", TCG_CPU, "requested with --accel tcg")
    if requested == "kvm":
        if not kvm_ok:
            raise KvmlabError("--accel kvm: /dev/kvm is not usable on this host")
        return Accel("kvm", "host", "requested with --accel kvm")
    if requested not in (None, "auto"):
        raise KvmlabError(f"unknown accelerator {requested!r}. Available: auto, kvm, tcg")
    if flag is None:
        return Accel("tcg", TCG_CPU, "host CPU shows no vmx/svm, so nested KVM is impossible")
    if not nested_enabled(nested):
        module = "kvm_intel" if flag == "vmx" else "kvm_amd"
        return Accel("tcg", TCG_CPU, f"host has {flag} but {module} nesting is off")
    if not kvm_ok:
        return Accel("tcg", TCG_CPU, "host /dev/kvm is not usable")
    return Accel("kvm", "host", f"host has {flag} with nesting enabled")
