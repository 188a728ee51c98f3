"""Boot-speed benchmark (its numbers are in docs/benchmarks.md, not in tests).

Measures, on this machine, with the default accelerator:

- boot to guest userspace with the Debian image (QEMU start → the guest init's first
  console line), target ≤ 5 s under TCG;
- ``kvmlab run debian:bookworm --fresh-boot -- true`` end to end with warm caches,
  target ≤ 8 s (without ``--fresh-boot`` the guest is restored: bench/restore.py);
- the same with a cold cache (apt lists, kernel download, image build);
- the peer: the same kernel in bare QEMU with a busybox-only initramfs that powers off
  at once — the floor any lab built on QEMU pays — so kvmlab's overhead is a ratio.

    python bench/boot.py [--runs N] [--skip-cold] [--json FILE]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmlab import kernels
from kvmlab.kernels.model import Kernel
from kvmlab.vm import accel, emulator, initramfs
from kvmlab.vm.boot import RunOptions
from kvmlab.vm.runner import run

SPEC = "debian:bookworm"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, **(env or {})})
    return time.monotonic() - started


def kvmlab_true(env: dict[str, str] | None = None) -> float:
    return timed([sys.executable, "-m", "kvmlab.cli", "run", SPEC, "--fresh-boot", "--", "true"], env)


def bare_initrd(scratch: Path) -> Path:
    """A busybox-only initramfs whose /init powers off at once."""
    tree = scratch / "bare"
    (tree / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", tree / "bin" / "busybox")
    (tree / "init").write_text("#!/bin/busybox sh\n/bin/busybox poweroff -f\n")
    (tree / "init").chmod(0o755)
    initrd = scratch / "bare.cpio"
    initramfs.from_tree(tree, initrd)
    return initrd


def bare_boot(kernel: Kernel, initrd: Path) -> float:
    """Bare QEMU, the same binary, kernel, CPU model and size: the floor of any QEMU-based lab."""
    chosen, qemu = accel.choose(), emulator.choose()
    return timed([
        qemu.binary, *qemu.firmware_args(), "-nodefaults", "-display", "none", "-no-reboot",
        "-accel", chosen.name, "-cpu", chosen.cpu, "-smp", "2", "-m", "4096M",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 loglevel=5 panic=-1", "-serial", "null",
    ])


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
            "runs": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    kernel = kernels.fetch(SPEC)
    kvmlab_true()  # warm every cache
    boots, warm, bare = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        initrd = bare_initrd(Path(scratch))
        for _ in range(args.runs):  # interleaved, so drift hits all three alike
            bare.append(bare_boot(kernel, initrd))
            warm.append(kvmlab_true())
            options = RunOptions(argv=["true"], stream=False, fresh_boot=True)
            result = run(kernel, options, log=open(os.devnull, "w"))
            boots.append(result.boot_s)
        cold = None
        if not args.skip_cold:
            cold = kvmlab_true({"KVMLAB_CACHE": str(Path(scratch) / "cold-cache")})
    report = {
        "accelerator": accel.choose().name,
        "kernel": kernel.release,
        "boot_to_userspace": summary(boots),
        "kvmlab_run_true_warm": summary(warm),
        "bare_qemu_busybox_poweroff": summary(bare),
        "ratio_warm_run_to_bare": statistics.median(warm) / statistics.median(bare),
        "kvmlab_run_true_cold_s": cold,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
