"""What a guest kernel's KVM runs with, as the guest sees it: ``python3 -m kvmlab_guest.conditions``.

An A/B of two kernels is only as good as the conditions of each side. The same patch
measured under the legacy MMU on one side and the TDP MMU on the other is two changes,
so ``kvmlab qualify`` asks every guest it boots for this and puts the two sides next
to each other. Prints one JSON object of flat ``name: value`` strings:

- ``kvm.<param>``, ``kvm_amd.<param>``, ``kvm_intel.<param>``: every readable module
  parameter (a module not loaded has none);
- ``cmdline``: ``/proc/cmdline``;
- ``cpu.model`` and ``cpu.virt_flags``: the L1 CPU's model name and which of its flags
  are about virtualisation (SVM's or VMX's features, as /proc/cpuinfo lists them);
- ``l1.vcpus`` and ``l1.memory_mib``: what the guest was given (RAM as the firmware's
  memory map has it).

Kernel configuration is the host's to read (it has every kernel's config file); guests
of Debian kernels have no /proc/config.gz. Standard library only: this runs in the guest.
"""

import json
import os
import sys

MODULES = ("kvm", "kvm_amd", "kvm_intel")
#: /proc/cpuinfo flags that say what hardware virtualisation the guest's CPU offers:
#: AMD's SVM and its features, Intel's VMX and its features, and the hypervisor bit.
VIRT_FLAGS = frozenset(
    "svm npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid decodeassists pausefilter "
    "pfthreshold avic v_vmsave_vmload vgif x2avic v_spec_ctrl vmx ept vpid ept_ad "
    "flexpriority tpr_shadow vnmi hypervisor".split()
)


def module_parameters(sys_module="/sys/module"):
    found = {}
    for module in MODULES:
        directory = os.path.join(sys_module, module, "parameters")
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            try:
                with open(os.path.join(directory, name)) as handle:
                    found[f"{module}.{name}"] = handle.read().strip()
            except OSError:
                continue  # write-only parameters
    return found


def cpu(cpuinfo_text):
    """The first CPU's model name and virtualisation flags, from /proc/cpuinfo's text."""
    model, flags = "", []
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "vmx flags") and value:
            flags += [flag for flag in value.split() if flag in VIRT_FLAGS or key == "vmx flags"]
        elif not line.strip() and model:
            break
    return {"cpu.model": model, "cpu.virt_flags": " ".join(sorted(set(flags)))}


def memory_mib(memmap="/sys/firmware/memmap", meminfo_text=""):
    """The RAM the firmware handed the kernel (its e820 "System RAM" ranges), in MiB.

    Not MemTotal: what the kernel reserves for itself differs between kernels, and two
    sides given the same memory must read the same here. MemTotal only without a memmap."""
    total = 0
    try:
        entries = os.listdir(memmap)
    except OSError:
        entries = []
    for entry in entries:
        base = os.path.join(memmap, entry)
        if _read(os.path.join(base, "type")).strip() == "System RAM":
            start, end = (int(_read(os.path.join(base, name)).strip() or "0", 16)
                          for name in ("start", "end"))
            total += end - start + 1
    if total:
        return str(round(total / 2**20))
    for line in meminfo_text.splitlines():
        if line.startswith("MemTotal:"):
            return str(int(line.split()[1]) // 1024)
    return ""


def _read(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return ""


def collect():
    found = module_parameters()
    found["cmdline"] = _read("/proc/cmdline").strip()
    found.update(cpu(_read("/proc/cpuinfo")))
    found["l1.vcpus"] = str(os.cpu_count() or 0)
    found["l1.memory_mib"] = memory_mib(meminfo_text=_read("/proc/meminfo"))
    return found


def main():
    json.dump(collect(), sys.stdout, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
