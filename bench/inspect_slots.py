"""Dump plus invariant checks of a VM holding the kernel's maximum of memslots, over QMP
(target: <= 3 s for 32764 slots on debian:bookworm).

Boots the kernel with ``--keep``, has kselftest_py.hold_memslots create a VM with every
slot the kernel allows, then times ``kvmlab.inspect.attach.Inspector.snapshot(check=True)``,
which is what ``kvmlab inspect --check`` and each ``--check-invariants-every`` check do:
QMP stop, the drgn read of every VM, cont, and the checks. drgn's one-time attach
(loading the DWARF) is timed apart.

    python bench/inspect_slots.py [--kernel debian:bookworm] [--repeat 5] [--json FILE]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kvmlab.inspect import attach  # noqa: E402


def kept_vm(kernel: str) -> tuple[str, int]:
    """Boot ``kernel`` holding a VM with its maximum of slots; the run's name and the count."""
    done = subprocess.run(
        [sys.executable, "-m", "kvmlab.cli", "run", kernel, "--keep", "--",
         "python3", "-m", "kselftest_py.hold_memslots", "--detach", "-n", "max"],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"kvmlab run failed ({done.returncode}):\n{done.stderr[-2000:]}")
    run = re.search(r"kvmlab stop (\S+)\)", done.stderr).group(1)
    return run, len(json.loads(done.stdout.splitlines()[-1])["slots"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="debian:bookworm")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    run, slots = kept_vm(args.kernel)
    try:
        inspector = attach.Inspector(attach.target(run))
        started = time.monotonic()
        inspector.attach()
        attach_s = time.monotonic() - started
        totals, reads, paused = [], [], []
        for _ in range(args.repeat):
            started = time.monotonic()
            snapshot = inspector.snapshot(check=True)
            totals.append(time.monotonic() - started)
            reads.append(snapshot.read_s)
            paused.append(snapshot.paused_s)
            seen = max(len(space.slots) for vm in snapshot.vms for space in vm.address_spaces)
            if seen != slots or snapshot.violations:
                raise SystemExit(f"read {seen} of {slots} slots, {len(snapshot.violations)} violations")
    finally:
        subprocess.run([sys.executable, "-m", "kvmlab.cli", "stop", run], capture_output=True, check=False)
    result = {"kernel": args.kernel, "slots": slots, "attach_s": attach_s,
              "total_s": statistics.median(totals), "read_s": statistics.median(reads),
              "paused_s": statistics.median(paused), "repeat": args.repeat}
    print(f"{args.kernel}: {slots} slots; drgn attach {attach_s:.2f} s once; per snapshot "
          f"(medians of {args.repeat}): read {result['read_s']:.2f} s, guest paused "
          f"{result['paused_s']:.2f} s, read + checks {result['total_s']:.2f} s (target <= 3 s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
