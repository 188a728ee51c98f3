"""Restore against boot: what a template saves, and whether its guests repeat.

Measures on this machine, interleaved so that drift hits both sides alike:

- start to agent ready: a guest restored from its template (``Guest.start`` with a
  role) against the same guest booted (``--fresh-boot``), target: restore ≤ 2 s median;
- ``kvmlab run debian:bookworm -- uname -r`` end to end on the wall clock, restored
  against ``--fresh-boot``, target ≤ 3 s restored;
- with ``--determinism``: one memslot_perf cell under icount, run in ``--restores``
  restores of one template (how many different results: 1 is identical), what the
  guest sees of its own past at its first command in as many restores (uptime,
  interrupts, context switches), and the cell in restores of templates from ``--boots``
  different boots (the spread between boots, to set beside docs/benchmarks.md's
  between-boot figures);
- what a template takes: its memory file on disk (allocated), its device state, and
  the resident memory of a restored guest against a booted one.

    python bench/restore.py [--runs 5] [--determinism] [--restores 8] [--boots 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from kvmlab import kernels
from kvmlab.cli.gc import size
from kvmlab.vm import template
from kvmlab.vm.boot import RunOptions
from kvmlab.vm.guest import Guest

SPEC = "debian:bookworm"
CELL = ["python3", "-m", "kselftest_py.memslot_perf", "-s", "100", "-f", "3", "-e", "3", "-r", "1",
        "-l", "0.5", "--json", "/tmp/cell.json"]
FIRST_VIEW = ["sh", "-c", "cat /proc/uptime /proc/interrupts /proc/softirqs; grep ^ctxt /proc/stat"]


def spread(values: list[float]) -> str:
    return (f"median {statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, "
            f"n={len(values)})")


def start_time(kernel, options: RunOptions, role: str, quiet) -> tuple[float, int]:
    """Seconds from nothing to the agent ready, and the guest's resident memory (KiB) then."""
    guest = Guest(kernel, options, quiet, role=role)
    started = time.monotonic()
    guest.start()
    took = time.monotonic() - started
    rss = _rss_kib(guest.process.pid)
    guest.close()
    return took, rss


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def kvmlab_run(*extra: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "kvmlab.cli", "run", SPEC, *extra, "--", "uname", "-r"],
                   check=True, capture_output=True)
    return time.monotonic() - started


def reply_in(kernel, role: str | None, argv: list[str], quiet, files: tuple[str, ...] = ()):
    """``argv``'s reply in an icount guest: restored from ``role``'s template, or booted
    afresh when ``role`` is None."""
    options = RunOptions(argv=[], clock="icount", cpus=1, fresh_boot=role is None)
    guest = Guest(kernel, options, quiet, role=role)
    guest.start()
    try:
        return guest.request(argv, files=files)
    finally:
        guest.close()


def cell_ns(kernel, role: str, quiet) -> tuple[int, int]:
    """memslot_perf's move-active cell at 100 slots in a restored icount guest."""
    reply = reply_in(kernel, role, CELL, quiet, files=("/tmp/cell.json",))
    run = json.loads(reply.files["/tmp/cell.json"])["runs"][0]
    return run["iteration_ns"], run["slot_setup_ns"]


def determinism(kernel, restores: int, boots: int, quiet) -> dict:
    same = [cell_ns(kernel, "bench-determinism-0", quiet) for _ in range(restores)]
    views = [reply_in(kernel, "bench-determinism-0", FIRST_VIEW, quiet).stdout for _ in range(restores)]
    others = [cell_ns(kernel, f"bench-determinism-{number}", quiet) for number in range(boots)]
    booted = [reply_in(kernel, None, FIRST_VIEW, quiet).stdout for _ in range(boots)]
    iteration = [ns for ns, _ in others]
    return {
        "same_template": same,
        "distinct_results": len(set(same)),
        "distinct_first_views": len(set(views)),
        "booted_first_views": booted,
        "distinct_booted_first_views": len(set(booted)),
        "boots": others,
        "between_boots_cv": statistics.stdev(iteration) / statistics.mean(iteration) if boots > 1 else None,
    }


def _count(label: str, view: str) -> int | None:
    """The first number on ``view``'s line that starts with ``label``."""
    for line in view.splitlines():
        if line.strip().startswith(label):
            return int(line.split()[1])
    return None


def footprint() -> list[dict]:
    return [{"template": stored.directory.name, "disk_bytes": stored.disk_bytes,
             "state_bytes": (stored.directory / template.STATE).stat().st_size}
            for stored in template.stored() if (stored.directory / template.STATE).exists()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--determinism", action="store_true")
    parser.add_argument("--restores", type=int, default=8)
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    kernel = kernels.fetch(SPEC)
    quiet = open(os.devnull, "w")
    options = RunOptions(argv=[])
    kvmlab_run()  # the run template exists from here on, and so does the bench's own:
    start_time(kernel, options, "bench-restore", quiet)
    restores, boots, run_restored, run_booted, rss = [], [], [], [], {"restored": [], "booted": []}
    with tempfile.TemporaryDirectory():
        for _ in range(args.runs):
            took, kib = start_time(kernel, options, "bench-restore", quiet)
            restores.append(took)
            rss["restored"].append(kib)
            took, kib = start_time(kernel, replace(options, fresh_boot=True), "bench-restore", quiet)
            boots.append(took)
            rss["booted"].append(kib)
            run_restored.append(kvmlab_run())
            run_booted.append(kvmlab_run("--fresh-boot"))
    report = {
        "kernel": kernel.release, "runs": args.runs,
        "restore_to_agent_s": restores, "boot_to_agent_s": boots,
        "kvmlab_run_restored_s": run_restored, "kvmlab_run_fresh_boot_s": run_booted,
        "rss_kib": rss, "templates": footprint(),
    }
    print(f"{SPEC} ({kernel.release}), wall clock, {args.runs} of each, interleaved:")
    print(f"  to agent ready, restored: {spread(restores)}")
    print(f"  to agent ready, booted:   {spread(boots)}")
    print(f"  ratio of medians: {statistics.median(boots) / statistics.median(restores):.1f}x")
    print(f"  kvmlab run -- uname -r, restored:     {spread(run_restored)}")
    print(f"  kvmlab run -- uname -r, --fresh-boot: {spread(run_booted)}")
    print(f"  QEMU resident at agent ready: restored {statistics.median(rss['restored']) / 1024:.0f} MiB, "
          f"booted {statistics.median(rss['booted']) / 1024:.0f} MiB (medians)")
    stored = report["templates"]
    print(f"  templates in the cache: {len(stored)}, {size(sum(t['disk_bytes'] for t in stored))} on disk; "
          f"each {size(int(statistics.median(t['disk_bytes'] for t in stored)))} (median), device state "
          f"{size(int(statistics.median(t['state_bytes'] for t in stored)))}")
    if args.determinism:
        found = determinism(kernel, args.restores, args.boots, quiet)
        report["determinism"] = found
        figures = sorted(set(found["same_template"]))
        print(f"  icount, move active @100 slots, {args.restores} restores of one template: "
              f"{found['distinct_results']} different result(s), (ns/iteration, slot setup ns): {figures}")
        print(f"  their first command's view of uptime, interrupts and context switches: "
              f"{found['distinct_first_views']} different one(s) in {args.restores} restores")
        booted = found["booted_first_views"]
        print(f"  the same view in {args.boots} fresh boots: {found['distinct_booted_first_views']} different"
              f" one(s); local timer interrupts {[_count('LOC:', view) for view in booted]}, "
              f"context switches {[_count('ctxt', view) for view in booted]}")
        cv = found["between_boots_cv"]
        if cv is not None:
            print(f"  restores of {args.boots} templates from different boots: "
                  f"{[ns for ns, _ in found['boots']]} ns/iteration, CV {cv * 100:.2f} %")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
